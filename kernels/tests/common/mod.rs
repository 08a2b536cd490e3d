//! Shared fixtures: small synthetic checkpoints written to temporary directories.
#![allow(dead_code)]

pub mod split;

use lime_kernels::synth::{self, Preset, StoredDtype, SynthSpec};
use lime_kernels::{Checkpoint, Device, KvCache, Model};
use std::path::Path;
use tempfile::TempDir;

/// A freshly synthesised checkpoint that lives as long as the value.
pub struct Fixture {
    pub dir: TempDir,
}

impl Fixture {
    pub fn new(spec: &SynthSpec) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        synth::synthesize(spec, dir.path(), &mut |_, _| {}).expect("synthesize");
        Self { dir }
    }

    pub fn tiny(dtype: StoredDtype) -> Self {
        Self::new(&SynthSpec::preset(Preset::Tiny, dtype, 7))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn open(&self) -> Checkpoint {
        Checkpoint::open(self.path()).expect("open checkpoint")
    }

    pub fn model(&self) -> (Checkpoint, Model) {
        self.model_on(&Device::Cpu)
    }

    pub fn model_on(&self, device: &Device) -> (Checkpoint, Model) {
        let ckpt = self.open();
        let model = Model::load(&ckpt, device, |_, _| {}).expect("load model");
        (ckpt, model)
    }
}

/// A deterministic prompt of `len` in-vocabulary ids.
pub fn prompt(len: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 131 + salt * 977 + 5) % vocab) as u32)
        .collect()
}

pub fn cache(model: &Model, capacity: usize) -> KvCache {
    model.new_cache(capacity).expect("cache")
}

/// Largest absolute difference between two logit vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
