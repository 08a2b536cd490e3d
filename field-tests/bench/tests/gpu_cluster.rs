//! The CUDA path through real processes, run by `field-tests/gpu.sh`: lime-stage
//! processes computing on the GPU answer bit for bit as one process on that GPU
//! does, for several partitions, in bf16 and f32, with layers resident and
//! streamed through the GPU loader.
//!
//! Requests go one at a time: on a GPU the contract holds for the same
//! micro-batch shapes (DESIGN.md), and one sequence alone is batched alike by
//! the cluster and by the single process. Built only with the `cuda` feature;
//! without a GPU these tests fail, they never skip. `LIME_TEST_GPU` picks the
//! device (default `cuda:0`); every stage shares it.
#![cfg(feature = "cuda")]

mod common;

use common::{ask, assert_identical, runtime, up, varied_requests, Reference};
use lime_kernels::synth::{Preset, StoredDtype, SynthSpec};
use lime_kernels::DeviceSpec;
use lime_testbench::cluster::{Budget, ClusterSpec};

fn gpu() -> (DeviceSpec, lime_kernels::Device) {
    let name = std::env::var("LIME_TEST_GPU").unwrap_or_else(|_| "cuda:0".into());
    let spec = name
        .parse::<DeviceSpec>()
        .unwrap_or_else(|e| panic!("LIME_TEST_GPU: {e}"));
    let dev = spec
        .open()
        .unwrap_or_else(|e| panic!("these tests need a GPU: {e}"));
    (spec, dev)
}

/// (stages, interleave, cuts, share of the layers streamed) over the tiny
/// preset's 12 layers.
const PARTITIONS: &[(usize, usize, Option<&[usize]>, f64)] = &[
    (1, 1, None, 0.0),
    (2, 1, Some(&[5]), 0.0),
    (3, 2, None, 0.0),
    (4, 1, Some(&[2, 3, 11]), 0.0),
    (2, 2, None, 0.5),
    (3, 1, None, 0.75),
];

fn distributed_equals_one_gpu_process(dtype: StoredDtype) {
    let (device, dev) = gpu();
    let reference = Reference::synthesized_on(&SynthSpec::preset(Preset::Tiny, dtype, 11), &dev);
    let requests = varied_requests(6);
    let rt = runtime();
    for &(stages, interleave, cuts, streamed) in PARTITIONS {
        let what = format!(
            "{dtype:?}: {stages} stages, v={interleave}, cuts {cuts:?}, {streamed} streamed"
        );
        eprintln!("gpu cluster: {what}");
        let work = tempfile::tempdir().unwrap();
        let mut spec = ClusterSpec::new(reference.path(), stages, work.path());
        spec.interleave = interleave;
        spec.cuts = cuts.map(<[usize]>::to_vec);
        spec.device = device;
        if streamed > 0.0 {
            // The plan names the streamed layers; each budget holds the rest
            // and one slot, sized for the GPU.
            spec.memory.budget = Budget::Offload(streamed);
        }
        rt.block_on(async {
            let cluster = up(&spec).await;
            for r in &requests {
                let answer = ask(&cluster.broker, std::slice::from_ref(r)).await;
                let f = answer[0]
                    .outcome
                    .as_ref()
                    .unwrap_or_else(|e| panic!("{what}: {:?} failed: {e:?}", r.id));
                assert_identical(&reference, r, f, &what);
            }
        });
    }
}

#[test]
fn stages_on_the_gpu_answer_as_one_gpu_process_bf16() {
    distributed_equals_one_gpu_process(StoredDtype::BF16);
}

#[test]
fn stages_on_the_gpu_answer_as_one_gpu_process_f32() {
    distributed_equals_one_gpu_process(StoredDtype::F32);
}
