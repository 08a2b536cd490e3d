//! `lime synth`: write a random-weight checkpoint in the Hugging Face layout.

use crate::progress::Progress;
use anyhow::Context;
use lime_kernels::synth::{self, Preset, StoredDtype, SynthSpec};
use std::path::Path;

/// Synthesises `preset` into `out` and prints what was written.
pub fn run(preset: Preset, dtype: StoredDtype, seed: u64, out: &Path) -> anyhow::Result<()> {
    let spec = SynthSpec::preset(preset, dtype, seed);
    let mut progress = Progress::new(format!("synthesising {preset:?} into {}", out.display()));
    let cfg = synth::synthesize(&spec, out, &mut |done, total| {
        progress.update(done >> 20, total >> 20, "MB")
    })
    .with_context(|| format!("writing a synthetic checkpoint to {}", out.display()))?;
    println!(
        "wrote {}: {} layers, hidden {}, vocab {}, {:?}",
        out.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        dtype
    );
    Ok(())
}

/// Synthesises `preset` into `dir` unless a checkpoint is already there.
pub fn ensure(preset: Preset, dir: &Path) -> anyhow::Result<()> {
    if dir.join("config.json").exists() {
        return Ok(());
    }
    run(preset, StoredDtype::F32, 0, dir)
}
