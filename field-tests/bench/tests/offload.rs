//! Stages under memory budgets stream the layers they cannot keep, and still answer
//! exactly as the single-process reference does: for every offloaded share,
//! interleave degree and baseline mode, and without ever accounting more than the
//! budget. A budget that cannot run a stage at all stops it at start.

mod common;

use common::{ask, assert_answers, runtime, up, varied_requests, Reference};
use lime_schemas::Telemetry;
use lime_testbench::cluster::{Budget, Cluster, ClusterSpec, Mode};
use std::time::Duration;

/// The latest telemetry of every stage, newer than the answers just checked.
async fn fresh_telemetry(cluster: &Cluster) -> Vec<Telemetry> {
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut t = lime_client::status::telemetry(&cluster.broker, Duration::from_millis(300))
        .await
        .unwrap();
    t.retain(|t| t.epoch == cluster.plan.epoch);
    assert_eq!(t.len(), cluster.plan.stages.len(), "one report per stage");
    t
}

/// Checks every stage kept within its budget and streamed what it reports;
/// returns the layers offloaded at start (stages may since have kept streamed
/// layers that memory had room for, or streamed more for KV caches).
fn check_budgets(telemetry: &[Telemetry], what: &str) -> usize {
    let mut offloaded = 0;
    for t in telemetry {
        let m = &t.memory;
        let budget = m.budget_bytes.expect("a budget");
        assert!(m.overhead_bytes > 0, "the fixed overhead is reserved");
        assert!(
            m.peak_accounted_bytes <= budget - m.overhead_bytes,
            "{what}: stage {} accounted {} bytes at peak, over its budget of {budget}",
            t.stage,
            m.peak_accounted_bytes
        );
        assert_eq!(
            m.accounted_bytes,
            m.weights_bytes + m.staging_bytes + m.kv_bytes + m.activation_bytes
        );
        assert_eq!(m.kv_bytes, 0, "{what}: finished sequences hold no KV");
        let r = &t.residency;
        if !r.offloaded.is_empty() {
            assert!(r.slots >= 1);
            assert!(
                t.loads.layers_read > 0 && t.loads.streamed_bytes > 0,
                "{what}: stage {} offloads {:?} but read nothing",
                t.stage,
                r.offloaded
            );
        }
        offloaded += r.offloaded.len() + r.restorations as usize - r.evictions as usize;
    }
    offloaded
}

#[test]
fn every_offloaded_share_and_interleave_answers_bit_identically() {
    let reference = Reference::tiny();
    let requests = varied_requests(16);
    let rt = runtime();
    // (share of the 12 layers offloaded, interleave, stages)
    let cases = [
        (0.25, 1, 2),
        (0.25, 2, 3),
        (0.25, 4, 2),
        (0.5, 1, 3),
        (0.5, 2, 2),
        (0.5, 4, 3),
        (0.9, 1, 2),
        (0.9, 2, 3),
        (0.9, 4, 2),
    ];
    for (share, interleave, stages) in cases {
        let what = format!("{stages} stages, v={interleave}, {share} offloaded");
        let work = tempfile::tempdir().unwrap();
        let mut spec = ClusterSpec::new(reference.path(), stages, work.path());
        spec.interleave = interleave;
        spec.memory.budget = Budget::Offload(share);
        spec.telemetry_ms = Some(100);
        rt.block_on(async {
            let cluster = up(&spec).await;
            let one = ask(&cluster.broker, &requests[5..6]).await;
            assert_answers(&reference, &requests[5..6], &one, &what);
            let answers = ask(&cluster.broker, &requests).await;
            assert_answers(&reference, &requests, &answers, &what);
            let telemetry = fresh_telemetry(&cluster).await;
            let offloaded = check_budgets(&telemetry, &what);
            assert_eq!(
                offloaded,
                (share * 12.0_f64).round() as usize,
                "{what}: layers offloaded over the ring"
            );
        });
    }
}

#[test]
fn micro_batches_in_flight_share_reads_and_answer_bit_identically() {
    let reference = Reference::tiny();
    let requests = varied_requests(12);
    let rt = runtime();
    // (share offloaded, interleave, stages, micro-batches in flight, slots)
    let cases = [
        (0.5, 1, 2, 4, 4),
        (0.5, 2, 3, 3, 2),
        (0.25, 2, 2, 2, 3),
        (0.9, 4, 2, 4, 3),
    ];
    for (share, interleave, stages, inflight, slots) in cases {
        let what = format!(
            "{stages} stages, v={interleave}, {share} offloaded, {inflight} in flight, {slots} slots"
        );
        let work = tempfile::tempdir().unwrap();
        let mut spec = ClusterSpec::new(reference.path(), stages, work.path());
        spec.interleave = interleave;
        spec.max_inflight = inflight;
        spec.memory.budget = Budget::Offload(share);
        spec.memory.max_slots = Some(slots);
        spec.telemetry_ms = Some(100);
        rt.block_on(async {
            let cluster = up(&spec).await;
            let answers = ask(&cluster.broker, &requests).await;
            assert_answers(&reference, &requests, &answers, &what);
            let telemetry = fresh_telemetry(&cluster).await;
            check_budgets(&telemetry, &what);
            let shared: u64 = telemetry.iter().map(|t| t.residency.shared_visits).sum();
            assert!(
                shared > 0,
                "{what}: no micro-batch found a layer kept for it"
            );
            for t in &telemetry {
                assert_eq!(
                    t.residency.slots,
                    slots.min(t.residency.offloaded.len()),
                    "{what}"
                );
            }
        });
    }
}

#[test]
fn baselines_and_paced_direct_reads_answer_bit_identically() {
    let reference = Reference::tiny();
    let requests = varied_requests(12);
    let rt = runtime();
    // A budget in bytes that leaves the starter room for two of its four layers.
    let ckpt = lime_kernels::Checkpoint::open(reference.path()).unwrap();
    let costs = lime_stage::memory::stage_costs(
        &ckpt,
        4,
        true,
        &lime_stage::config::MemoryConfig::default(),
        lime_kernels::Placement::Cpu,
    );
    let two_of_four = Budget::Bytes(costs.budget_for(2) + costs.layer() / 2);
    // The last case leaves the choice of offloaded layers to the stages' budgets.
    for (mode, direct, read_mb_per_s, budget) in [
        (Mode::Naive, false, None, Budget::Offload(0.5)),
        (Mode::Mdi, false, None, Budget::Offload(0.5)),
        (Mode::Lime, true, Some(200.0), Budget::Offload(0.5)),
        (Mode::Lime, false, None, two_of_four),
    ] {
        let what = format!("{mode}, direct I/O {direct}, {read_mb_per_s:?} MB/s");
        let work = tempfile::tempdir().unwrap();
        let mut spec = ClusterSpec::new(reference.path(), 3, work.path());
        spec.interleave = 2;
        spec.mode = mode;
        spec.memory.budget = budget;
        spec.memory.direct_io = direct;
        spec.memory.read_mb_per_s = read_mb_per_s;
        spec.telemetry_ms = Some(100);
        rt.block_on(async {
            let cluster = up(&spec).await;
            let answers = ask(&cluster.broker, &requests).await;
            assert_answers(&reference, &requests, &answers, &what);
            let telemetry = fresh_telemetry(&cluster).await;
            let offloaded = check_budgets(&telemetry, &what);
            match budget {
                Budget::Offload(_) => assert_eq!(offloaded, 6, "{what}"),
                _ => assert!(offloaded >= 2, "{what}: only {offloaded} offloaded"),
            }
            for t in &telemetry {
                assert_eq!(t.residency.prefetch, mode == Mode::Lime, "{what}");
                assert_eq!(
                    t.residency.read_limit_bytes_per_s,
                    read_mb_per_s.map(|r| (r * 1e6) as u64)
                );
                // Baselines keep the contiguous partition whatever was asked.
                let chunks = cluster.plan.chunks_of(&t.stage).len();
                assert_eq!(chunks, if mode == Mode::Lime { 2 } else { 1 }, "{what}");
            }
        });
    }
}

#[test]
fn a_budget_that_cannot_hold_a_layer_and_a_sequence_is_refused_at_start() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(reference.path(), 2, work.path());
    spec.memory.budget = Budget::Bytes(1 << 20);
    runtime().block_on(async {
        let mut cluster = Cluster::start(&spec).await.unwrap();
        let err = cluster
            .wait_online(Duration::from_secs(60))
            .await
            .expect_err("a stage cannot start in 1 MiB");
        let err = format!("{err:#}");
        assert!(err.contains("exited"), "{err}");
        assert!(
            err.contains("cannot run in its memory budget")
                && err.contains("cannot hold the process's fixed overhead")
                && err.contains("plus one layer")
                && err.contains("it needs at least"),
            "the stage says why and how much it needs: {err}"
        );
    });
}
