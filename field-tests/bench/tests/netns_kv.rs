//! Field test: four stages in four network namespaces (veth through a bridge,
//! links shaped with `tc … tbf`) serve requests whose KV caches outgrow what
//! the initial resident set leaves room for. Stages stream more layers instead
//! of running out of memory, take them back when the caches are freed, and every
//! answer equals the single-process run. What each stage accounts is held
//! against what the kernel says it uses (RSS). Skipped, saying why, where
//! namespaces cannot be made (not root, no iproute2). `LIME_KV_SERIES=1`
//! prints every telemetry report's memory figures.

mod common;

use common::{assert_answers, runtime, up, Reference};
use lime_kernels::synth::{Preset, StoredDtype, SynthSpec};
use lime_kernels::Checkpoint;
use lime_schemas::{topics, Reply, Request, Telemetry};
use lime_stage::config::MemoryConfig;
use lime_stage::memory::StageCosts;
use lime_testbench::cluster::{ClusterSpec, MemorySpec, Namespaces};
use lime_testbench::netns::Fabric;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const STAGES: usize = 4;
const LAYERS_PER_STAGE: usize = 3;
const MIB: u64 = 1 << 20;

/// What the process may hold beyond its accounted bytes: the executable, the
/// async runtime and MQTT client, the tokenizer at the starter, thread stacks
/// and allocator slack (the README's fixed overhead).
const OVERHEAD: u64 = 32 * MIB;

/// The `small` preset's width with a layer per stage more and full multi-head
/// attention: layers large enough (13 MiB) that weights, not the process, make
/// up most of the RSS, and KV caches (12 KiB per token on a stage) that outgrow
/// a layer's room within a thousand tokens.
fn model() -> SynthSpec {
    let mut spec = SynthSpec::preset(Preset::Small, StoredDtype::F32, 23);
    spec.num_hidden_layers = STAGES * LAYERS_PER_STAGE;
    spec.num_key_value_heads = spec.num_attention_heads;
    spec
}

/// Sixteen requests of 100–160 tokens: greedy and sampled, stopping at EOS or
/// not. Together their caches need about three layers' room on every stage.
fn growing_requests(n: usize) -> Vec<Request> {
    let mut requests = common::varied_requests(n);
    for (i, r) in requests.iter_mut().enumerate() {
        r.max_tokens = Some(100 + (i as u32 * 37) % 61);
    }
    requests
}

/// Every telemetry report seen, by stage: the largest gap between RSS and the
/// accounted bytes at one instant, and the latest report.
#[derive(Default)]
struct Watched {
    largest_gap: BTreeMap<String, i64>,
    reports: BTreeMap<String, u64>,
    latest: BTreeMap<String, Telemetry>,
}

async fn watch(broker: lime_client::mqtt::BrokerAddr, into: Arc<Mutex<Watched>>) {
    let (client, mut events, _) = broker.connect("lime-kv-watch");
    if client
        .subscribe(topics::TELEMETRY_ALL, QoS::AtMostOnce)
        .await
        .is_err()
    {
        return;
    }
    while let Ok(event) = events.poll().await {
        let Event::Incoming(Packet::Publish(p)) = event else {
            continue;
        };
        let Ok(t) = serde_json::from_slice::<Telemetry>(&p.payload) else {
            continue;
        };
        let mut w = into.lock().unwrap();
        if std::env::var_os("LIME_KV_SERIES").is_some() {
            let m = &t.memory;
            eprintln!(
                "{} rss {} acc {} w {} st {} kv {} act {} off {:?}",
                t.stage,
                m.rss_bytes.unwrap_or(0) >> 20,
                m.accounted_bytes >> 20,
                m.weights_bytes >> 20,
                m.staging_bytes >> 20,
                m.kv_bytes >> 20,
                m.activation_bytes >> 20,
                t.residency.offloaded
            );
        }
        if let Some(rss) = t.memory.rss_bytes {
            let gap = rss as i64 - t.memory.accounted_bytes as i64;
            let largest = w.largest_gap.entry(t.stage.clone()).or_insert(i64::MIN);
            *largest = (*largest).max(gap);
        }
        *w.reports.entry(t.stage.clone()).or_default() += 1;
        w.latest.insert(t.stage.clone(), t);
    }
}

#[test]
fn kv_growth_in_namespaces_streams_more_layers_without_oom_and_changes_no_bits() {
    if let Some(why) = Fabric::unavailable() {
        eprintln!("SKIPPED kv_growth_in_namespaces_streams_more_layers_without_oom_and_changes_no_bits: {why}");
        return;
    }
    let reference = Reference::synthesized(&model());
    let ckpt = Checkpoint::open(reference.path()).unwrap();
    let fabric = Fabric::create("kvg", STAGES).unwrap();
    fabric.shape_all(1000.0).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Each stage's budget keeps its 3 layers resident with KV room for one
    // 64-token sequence, nothing more.
    let memory = MemoryConfig {
        kv_reserve_tokens: Some(64),
        max_slots: 1,
        ..MemoryConfig::default()
    };
    let costs: Vec<StageCosts> = (0..STAGES)
        .map(|i| {
            lime_stage::memory::stage_costs(
                &ckpt,
                LAYERS_PER_STAGE,
                i == 0,
                &memory,
                lime_kernels::Placement::Cpu,
            )
        })
        .collect();
    let budgets: Vec<u64> = costs
        .iter()
        .map(|c| c.budget_for(LAYERS_PER_STAGE))
        .collect();
    let mut spec = ClusterSpec::new(reference.path(), STAGES, dir.path());
    spec.telemetry_ms = Some(100);
    spec.compute_threads = Some(1);
    spec.memory = MemorySpec {
        stage_budget_bytes: budgets.clone(),
        kv_reserve_tokens: Some(64),
        max_slots: Some(1),
        ..MemorySpec::default()
    };
    spec.namespaces = Some(Namespaces {
        host_ip: fabric.host_ip(),
        stages: (0..STAGES)
            .map(|i| (fabric.namespace(i), fabric.stage_ip(i)))
            .collect(),
    });

    runtime().block_on(async {
        let mut cluster = up(&spec).await;
        let watched = Arc::new(Mutex::new(Watched::default()));
        let watcher = tokio::spawn(watch(cluster.broker.clone(), watched.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        {
            let w = watched.lock().unwrap();
            assert_eq!(w.latest.len(), STAGES, "every stage reports");
            for t in w.latest.values() {
                assert!(
                    t.residency.offloaded.is_empty(),
                    "{} starts with every layer resident: {:?}",
                    t.stage,
                    t.residency
                );
            }
        }

        let requests = growing_requests(16);
        let mut queued = 0;
        let answers = lime_client::ask::ask_all(
            &cluster.broker,
            &requests,
            Duration::from_secs(300),
            |_, r| {
                if let Reply::Queued(q) = r {
                    queued += 1;
                    assert!(
                        ["memory", "ring", "sequences"].contains(&q.waiting_for.as_str()),
                        "{q:?}"
                    );
                }
            },
        )
        .await
        .unwrap();
        assert_answers(&reference, &requests, &answers, "under KV growth");
        assert!(queued > 0, "16 long requests cannot all fit at once");

        // A request whose cache can never fit is refused with the most that
        // fits; the cluster keeps serving.
        common::assert_never_fits(&cluster.broker, 4000).await;
        let small = &growing_requests(3)[1..];
        let answers = common::ask(&cluster.broker, small).await;
        assert_answers(&reference, small, &answers, "after a refusal");

        tokio::time::sleep(Duration::from_millis(800)).await;
        watcher.abort();
        cluster.check_alive().unwrap();
        let w = watched.lock().unwrap();
        for (i, budget) in budgets.iter().enumerate() {
            let stage = format!("s{i}");
            let t = &w.latest[&stage];
            let (r, m) = (&t.residency, &t.memory);
            let (peak_rss, gap) = (m.peak_rss_bytes.unwrap(), w.largest_gap[&stage]);
            eprintln!(
                "{stage}: {} layers streamed to make room, {} taken back; peak accounted {:.1} MiB of a {:.1} MiB budget; \
                 peak RSS {:.1} MiB; RSS beyond the account at most {:.1} MiB over {} reports",
                r.evictions,
                r.restorations,
                m.peak_accounted_bytes as f64 / MIB as f64,
                *budget as f64 / MIB as f64,
                peak_rss as f64 / MIB as f64,
                gap as f64 / MIB as f64,
                w.reports[&stage],
            );
            // Offload depth rose to make room, and fell again after.
            assert!(r.evictions > 0, "{stage} never streamed: {r:?}");
            assert!(r.restorations > 0, "{stage} never took a layer back: {r:?}");
            assert_eq!(m.kv_bytes, 0, "{stage} still holds caches");
            // The account never passed the budget, and the process never held
            // more than the account plus the fixed overhead.
            assert!(
                m.peak_accounted_bytes <= *budget,
                "{stage}: peak accounted {} over budget {budget}",
                m.peak_accounted_bytes
            );
            assert!(
                gap <= OVERHEAD as i64,
                "{stage}: RSS was {:.1} MiB beyond the accounted bytes",
                gap as f64 / MIB as f64
            );
            assert!(
                peak_rss <= budget + OVERHEAD,
                "{stage}: peak RSS {:.1} MiB over the budget of {:.1} MiB plus {} MiB of overhead",
                peak_rss as f64 / MIB as f64,
                *budget as f64 / MIB as f64,
                OVERHEAD / MIB
            );
            // The account is not a fiction either: the weights it counts are
            // really held.
            assert!(
                peak_rss >= m.peak_accounted_bytes,
                "{stage}: peak RSS {peak_rss} below the peak accounted {}",
                m.peak_accounted_bytes
            );
        }
    });
}
