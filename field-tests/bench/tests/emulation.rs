//! Device emulation makes emulated stages behave like separate devices: a
//! resident 4-stage pipeline whose compute is paced to a quarter of this
//! machine's speed gains nearly 4x the tokens/s from 4 micro-batches in
//! flight over one, as 4 devices would, although the stages share 2 cores.
//! (Unpaced, the same pipeline gains under 2x: the stages compete for the
//! cores.) Alone in its binary, so that no other test shares the machine.

use lime_testbench::fill::{run, FillBench};

#[test]
fn four_paced_stages_overlap_like_four_devices() {
    let dir = tempfile::tempdir().unwrap();
    let bench = FillBench {
        model: dir.path().join("bench"),
        stages: 4,
        slowdowns: vec![4.0],
        max_tokens: 32,
        compute_threads: 1,
        dir: dir.path().join("clusters"),
    };
    let report = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(run(&bench))
        .unwrap();
    eprintln!("{report}");
    let speedup = report.emulated_speedup().unwrap();
    assert!(
        speedup >= 3.2,
        "4 micro-batches in flight gave {speedup:.2}x the tokens/s of one, under emulation"
    );
}
