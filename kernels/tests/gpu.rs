//! The CUDA path on a real GPU, run by `field-tests/gpu.sh`: the GPU against the
//! CPU within floating-point tolerance, greedy tokens alike, split-equals-whole
//! on the GPU, and streamed GPU slots against resident layers.
//!
//! Built only with the `cuda` feature. Without a GPU these tests fail; they never
//! skip. `LIME_TEST_GPU` picks the device (default `cuda:0`).
#![cfg(feature = "cuda")]

mod common;

use common::split::{partitions, split, whole};
use common::{bits, prompt, Fixture};
use lime_kernels::synth::StoredDtype;
use lime_kernels::{
    sampling::argmax, DecoderLayer, Device, DeviceSpec, KvCache, MicroBatch, Rope, SeqSpan, Tensor,
};

fn gpu() -> Device {
    let spec = std::env::var("LIME_TEST_GPU").unwrap_or_else(|_| "cuda:0".into());
    spec.parse::<DeviceSpec>()
        .and_then(DeviceSpec::open)
        .unwrap_or_else(|e| panic!("these tests need a GPU: {e}"))
}

/// How far GPU logits may be from the CPU's, as a share of the largest CPU logit.
/// The CPU widens every weight to f32 exactly and accumulates in f32; the GPU keeps
/// the checkpoint's dtype, so after every op its activations are rounded to 8 (bf16)
/// or 11 (f16) significant bits and its matmuls accumulate in another order. Over
/// 12 layers that compounds to a few percent for bf16.
fn tolerance(dtype: StoredDtype) -> f32 {
    match dtype {
        StoredDtype::F32 => 1e-4,
        StoredDtype::F16 => 1e-2,
        StoredDtype::BF16 => 5e-2,
    }
}

/// Prefill and 24 greedy steps, teacher-forced with the CPU's tokens so both see
/// the same inputs: logits within tolerance at every step, and the same argmax
/// wherever the CPU's choice is clear by more than the tolerance.
fn gpu_against_cpu(dtype: StoredDtype) {
    let fx = Fixture::tiny(dtype);
    let (_, cpu) = fx.model();
    let (_, gpu) = fx.model_on(&gpu());
    let vocab = cpu.config().vocab_size;
    let (mut decisive, mut agreed) = (0, 0);
    for salt in 0..4 {
        let p = prompt(9 + salt, vocab, salt);
        let mut cpu_cache = cpu.new_cache(64).unwrap();
        let mut gpu_cache = gpu.new_cache(64).unwrap();
        let (mut input, mut pos) = (p.clone(), 0);
        for step in 0..=24 {
            let run = |model: &lime_kernels::Model, cache: &mut KvCache| -> Vec<f32> {
                model
                    .forward(&[&input], &[pos], &mut [cache])
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let want = run(&cpu, &mut cpu_cache);
            let got = run(&gpu, &mut gpu_cache);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
            let worst = common::max_abs_diff(&want, &got) / scale;
            assert!(
                worst <= tolerance(dtype),
                "{dtype:?} prompt {salt} step {step}: GPU logits {worst:.2e} from the CPU's"
            );
            let mut sorted = want.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if (sorted[0] - sorted[1]) / scale > 2.0 * tolerance(dtype) {
                decisive += 1;
                agreed += usize::from(argmax(&got) == argmax(&want));
            }
            pos += input.len();
            input = vec![argmax(&want)];
        }
    }
    assert_eq!(agreed, decisive, "{dtype:?}: greedy tokens differ");
    assert!(
        decisive >= 50,
        "{dtype:?}: only {decisive} of 100 steps had a clear greedy choice; the check would be empty"
    );
}

#[test]
fn gpu_matches_cpu_f32() {
    gpu_against_cpu(StoredDtype::F32);
}

#[test]
fn gpu_matches_cpu_bf16() {
    gpu_against_cpu(StoredDtype::BF16);
}

#[test]
fn gpu_matches_cpu_f16() {
    gpu_against_cpu(StoredDtype::F16);
}

/// Losslessness on the GPU: any partition of the layers gives the single GPU
/// process's logits bit for bit.
fn split_equals_whole_on_gpu(dtype: StoredDtype) {
    let dev = gpu();
    let fx = Fixture::tiny(dtype);
    let (ckpt, model) = fx.model_on(&dev);
    let p = prompt(11, ckpt.config().vocab_size, 1);
    let reference = whole(&model, &p);
    for ranges in partitions(ckpt.config().num_hidden_layers) {
        let got = split(&ckpt, &ranges, &p, &dev);
        for (step, (a, b)) in reference.iter().zip(&got).enumerate() {
            assert!(
                bits(a) == bits(b),
                "{dtype:?}: partition {ranges:?} differs from the whole GPU model at step {step}"
            );
        }
    }
}

#[test]
fn split_equals_whole_on_gpu_bf16() {
    split_equals_whole_on_gpu(StoredDtype::BF16);
}

#[test]
fn split_equals_whole_on_gpu_f16() {
    split_equals_whole_on_gpu(StoredDtype::F16);
}

#[test]
fn split_equals_whole_on_gpu_f32() {
    split_equals_whole_on_gpu(StoredDtype::F32);
}

/// A slot refilled through the page-locked loader, layer after layer, computes
/// exactly what the same layer loaded resident does.
#[test]
fn streamed_gpu_slots_equal_resident_layers() {
    let dev = gpu();
    for dtype in [StoredDtype::BF16, StoredDtype::F32] {
        let fx = Fixture::tiny(dtype);
        let ckpt = fx.open();
        let cfg = ckpt.config();
        let layer_dtype = ckpt.layer_dtype(&dev);
        let mut slot = DecoderLayer::empty(cfg, layer_dtype, &dev).unwrap();
        let mut staging = ckpt.layer_staging(&dev).unwrap();
        let rope = Rope::new(cfg, 32, &dev).unwrap();
        let spans = [SeqSpan { pos: 0, len: 5 }];
        let batch = MicroBatch::new(cfg, &rope, &spans, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, cfg.hidden_size), &dev)
            .unwrap()
            .to_dtype(layer_dtype)
            .unwrap();
        // Backwards, so every refill overwrites a different layer's weights.
        for l in (0..cfg.num_hidden_layers).rev() {
            slot.reload(&ckpt, l, &mut staging).unwrap();
            let resident = DecoderLayer::load(&ckpt, l, &dev).unwrap();
            let out = |layer: &DecoderLayer| -> Vec<u32> {
                let mut cache = KvCache::new(cfg, [l], 32, layer_dtype, &dev).unwrap();
                let y = layer.forward(&x, &batch, &mut [&mut cache]).unwrap();
                bits(
                    &y.to_dtype(lime_kernels::DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                )
            };
            assert_eq!(out(&slot), out(&resident), "{dtype:?} layer {l}");
        }
    }
}
