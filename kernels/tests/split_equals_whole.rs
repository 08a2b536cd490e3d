//! Losslessness, part one: running the layers as separate ranges, each with its
//! own KV cache as separate stages would, gives bit-identical logits to the whole
//! model, over a prefill and 64 decode steps.

mod common;

use common::split::{partitions, split, whole};
use common::{bits, prompt, Fixture};
use lime_kernels::synth::StoredDtype;
use lime_kernels::Device;

fn check(dtype: StoredDtype) {
    let fx = Fixture::tiny(dtype);
    let (ckpt, model) = fx.model();
    let n = ckpt.config().num_hidden_layers;
    let p = prompt(11, ckpt.config().vocab_size, 1);
    let reference = whole(&model, &p);
    assert!(reference.iter().flatten().all(|x| x.is_finite()));
    for ranges in partitions(n) {
        let got = split(&ckpt, &ranges, &p, &Device::Cpu);
        for (step, (a, b)) in reference.iter().zip(&got).enumerate() {
            assert!(
                bits(a) == bits(b),
                "{dtype:?}: partition {ranges:?} differs from the whole model at step {step}"
            );
        }
    }
}

#[test]
fn split_equals_whole_f32() {
    check(StoredDtype::F32);
}

#[test]
fn split_equals_whole_f16() {
    check(StoredDtype::F16);
}

#[test]
fn split_equals_whole_bf16() {
    check(StoredDtype::BF16);
}
