//! Online adaptation on loopback: KV caches that outgrow the initial resident set
//! make stages stream more layers (and take them back after), admission holds
//! requests that do not fit yet and refuses those that never will, and a new plan
//! taken mid-generation changes no bits.

mod common;

use common::{assert_answers, assert_identical, runtime, up, Reference};
use lime_kernels::Checkpoint;
use lime_schemas::{topics, Plan, Reply, Request, Telemetry};
use lime_stage::config::MemoryConfig;
use lime_testbench::cluster::{ClusterSpec, MemorySpec};
use std::time::Duration;

/// Requests long enough that their KV caches together outgrow one sequence's
/// reserve several times over.
fn growing_requests(n: usize) -> Vec<Request> {
    let mut requests = common::varied_requests(n);
    for (i, r) in requests.iter_mut().enumerate() {
        r.max_tokens = Some(24 + (i as u32 * 7) % 20);
    }
    requests
}

async fn telemetry(broker: &lime_client::mqtt::BrokerAddr) -> Vec<Telemetry> {
    lime_client::status::retained::<Telemetry>(
        broker,
        "lime/telemetry/+",
        Duration::from_millis(500),
    )
    .await
    .unwrap()
    .into_values()
    .collect()
}

#[test]
fn kv_growth_streams_more_layers_without_oom_and_changes_no_bits() {
    let reference = Reference::tiny();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint::open(reference.path()).unwrap();
    // Each of 3 stages holds 4 layers; its budget keeps all 4 resident with KV
    // room for one 64-token sequence, nothing more.
    let memory = MemoryConfig {
        kv_reserve_tokens: Some(64),
        max_slots: 1,
        ..MemoryConfig::default()
    };
    let budgets: Vec<u64> = (0..3)
        .map(|i| {
            lime_stage::memory::stage_costs(&ckpt, 4, i == 0, &memory, lime_kernels::Placement::Cpu)
                .budget_for(4)
        })
        .collect();
    let mut spec = ClusterSpec::new(reference.path(), 3, dir.path());
    spec.telemetry_ms = Some(100);
    spec.memory = MemorySpec {
        stage_budget_bytes: budgets.clone(),
        kv_reserve_tokens: Some(64),
        max_slots: Some(1),
        ..MemorySpec::default()
    };
    runtime().block_on(async {
        let mut cluster = up(&spec).await;
        let before = telemetry(&cluster.broker).await;
        assert!(
            before.iter().all(|t| t.residency.offloaded.is_empty()),
            "everything starts resident: {:?}",
            before.iter().map(|t| &t.residency).collect::<Vec<_>>()
        );

        let requests = growing_requests(16);
        let mut queued = 0;
        let answers = lime_client::ask::ask_all(
            &cluster.broker,
            &requests,
            Duration::from_secs(180),
            |_, r| {
                if let Reply::Queued(q) = r {
                    assert!(["memory", "ring", "sequences"].contains(&q.waiting_for.as_str()));
                    queued += 1;
                }
            },
        )
        .await
        .unwrap();
        assert_answers(&reference, &requests, &answers, "under KV growth");
        assert!(
            queued > 0,
            "16 long requests cannot all fit at once: some wait"
        );

        // Every stage streamed layers to make room, never past its budget, and
        // took layers back once the requests finished.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let after = telemetry(&cluster.broker).await;
        assert_eq!(after.len(), 3);
        for t in &after {
            let i: usize = t.stage[1..].parse().unwrap();
            assert!(
                t.residency.evictions > 0,
                "{} never streamed: {:?}",
                t.stage,
                t.residency
            );
            assert!(
                t.residency.restorations > 0,
                "{} never took a layer back: {:?}",
                t.stage,
                t.residency
            );
            assert!(
                t.memory.peak_accounted_bytes <= budgets[i],
                "{}: peak {} over budget {}",
                t.stage,
                t.memory.peak_accounted_bytes,
                budgets[i]
            );
            assert_eq!(t.memory.kv_bytes, 0, "{} still holds caches", t.stage);
        }

        // A request whose cache can never fit is refused at once, with the
        // most that fits; the cluster keeps serving.
        common::assert_never_fits(&cluster.broker, 1900).await;
        let small = &growing_requests(2)[1..];
        let answers = common::ask(&cluster.broker, small).await;
        assert_answers(&reference, small, &answers, "after a refusal");
        cluster.check_alive().unwrap();
    });
}

#[test]
fn a_new_plan_mid_generation_changes_no_bits() {
    let reference = Reference::tiny();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(reference.path(), 3, dir.path());
    spec.plan_over_mqtt = true;
    runtime().block_on(async {
        let cluster = up(&spec).await;
        let first = cluster.plan.clone();
        let requests = growing_requests(12);
        // Two switches while the requests generate: interleaved, then uneven
        // and in another ring order (the starter stays first).
        let mut second = Plan::even(first.epoch + 1, first.stages.clone(), 2, 12).unwrap();
        second.max_inflight = Some(2);
        let mut stages = first.stages.clone();
        stages.swap(1, 2);
        let third = Plan::from_cuts(first.epoch + 2, stages, &[2, 9], 12).unwrap();
        let broker = cluster.broker.clone();
        // Each plan is published once so many text pieces have streamed.
        let (tick, mut ticks) = tokio::sync::mpsc::unbounded_channel();
        let mut pieces = 0;
        let asking =
            lime_client::ask::ask_all(&broker, &requests, Duration::from_secs(120), |_, r| {
                if matches!(r, Reply::Text(_)) {
                    pieces += 1;
                    if pieces == 40 || pieces == 160 {
                        let _ = tick.send(());
                    }
                }
            });
        let switches = async {
            for plan in [&second, &third] {
                ticks.recv().await;
                lime_testbench::cluster::publish_plan(&broker, plan)
                    .await
                    .unwrap();
            }
        };
        let (answers, ()) = tokio::join!(asking, switches);
        let answers = answers.unwrap();
        assert_answers(&reference, &requests, &answers, "across two new plans");

        let log = std::fs::read_to_string(dir.path().join("s0.log")).unwrap();
        let moves: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("moved to the new plan"))
            .collect();
        assert_eq!(moves.len(), 2, "the starter moved twice:\n{log}");
        assert!(
            moves.iter().any(|l| !l.contains("rebuilt=0")),
            "a switch happened while sequences were generating:\n{}",
            moves.join("\n")
        );
        let plan = lime_client::status::retained::<Plan>(
            &broker,
            topics::PLAN,
            Duration::from_millis(300),
        )
        .await
        .unwrap();
        assert_eq!(plan.values().next().map(|p| p.epoch), Some(third.epoch));
        // The new ring serves new requests too.
        let more = &growing_requests(3)[..];
        let answers = common::ask(&broker, more).await;
        for (r, a) in more.iter().zip(&answers) {
            assert_identical(
                &reference,
                r,
                a.outcome.as_ref().unwrap(),
                "after the switches",
            );
        }
    });
}
