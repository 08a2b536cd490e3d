//! The planner end to end: `lime plan` on the Llama-3.3-70B Jetson scenario, its
//! explanations of what does not fit, and a cluster planned by lime-broker from its stages' profiles that
//! answers bit-identically to the single-process reference.

mod common;

use common::{ask, assert_answers, runtime, up, varied_requests, Reference};
use lime_schemas::StageProfile;
use lime_testbench::cluster::{ClusterSpec, PlannerSpec};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn profiles(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../broker/profiles")
        .join(file)
}

fn lime_plan(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(lime_client::binaries::sibling("lime").unwrap())
        .arg("plan")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn llama_70b_is_planned_on_jetsons_in_under_a_second() {
    let model = profiles("llama-3.3-70b-config.json");
    for devices in ["jetsons-4.toml", "jetsons-5.toml"] {
        for links in ["links-100mbit.toml", "links-1gbit.toml"] {
            for workload in ["sporadic", "bursty"] {
                let (ok, out, err) = lime_plan(&[
                    "--model",
                    model.to_str().unwrap(),
                    "--devices",
                    profiles(devices).to_str().unwrap(),
                    "--links",
                    profiles(links).to_str().unwrap(),
                    "--workload",
                    workload,
                ]);
                assert!(ok, "{devices} {links} {workload}: {err}");
                assert!(out.contains("predicted: TTFT"), "{out}");
                assert!(out.contains("orin64*"), "estimates are marked: {out}");
                let ms: f64 = out
                    .lines()
                    .find_map(|l| l.strip_prefix("planned in "))
                    .and_then(|l| l.trim_end_matches(" ms").parse().ok())
                    .unwrap_or_else(|| panic!("no planning time in {out}"));
                assert!(
                    ms < 1000.0,
                    "{devices} {links} {workload}: planned in {ms} ms"
                );
                // 141 GB of weights do not fit 4-5 Jetsons: some layers stream.
                let streamed: usize = out
                    .lines()
                    .skip(2)
                    .take_while(|l| !l.starts_with("predicted"))
                    .filter_map(|l| l.split_whitespace().nth(3)?.parse::<usize>().ok())
                    .sum();
                assert!(streamed > 0, "{out}");
            }
        }
    }
}

#[test]
fn infeasible_plans_say_what_does_not_fit_and_by_how_much() {
    let model = profiles("llama-3.3-70b-config.json");
    let (ok, _, err) = lime_plan(&[
        "--model",
        model.to_str().unwrap(),
        "--devices",
        profiles("jetson-orin-nano-8gb.toml").to_str().unwrap(),
        "--links",
        profiles("links-1gbit.toml").to_str().unwrap(),
        "--workload",
        "bursty",
        "--concurrency",
        "64",
        "--context",
        "8192",
    ]);
    assert!(!ok);
    assert!(err.contains("no plan fits"), "{err}");
    assert!(err.contains("short"), "{err}");
    assert!(err.contains("nano8"), "{err}");
    let (ok, _, err) = lime_plan(&[
        "--model",
        model.to_str().unwrap(),
        "--devices",
        "/nonexistent.toml",
        "--links",
        profiles("links-1gbit.toml").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("/nonexistent.toml"), "{err}");
}

/// lime-broker plans from the profiles its stages publish; the plan streams
/// layers under tight budgets and the answers are the reference's, bit for bit.
#[test]
fn a_cluster_planned_by_the_broker_answers_bit_identically() {
    let reference = Reference::tiny();
    let requests = varied_requests(8);
    let ckpt = lime_kernels::Checkpoint::open(reference.path()).unwrap();
    let memory = lime_stage::config::MemoryConfig {
        kv_reserve_tokens: Some(128),
        ..Default::default()
    };
    // Each stage has room for about three of the 12 layers and KV for 8
    // sequences over four: some layers must stream.
    let costs =
        lime_stage::memory::stage_costs(&ckpt, 4, false, &memory, lime_kernels::Placement::Cpu);
    let budget = costs.budget_for(2) + costs.footprint.kv(7 * 128, 4);
    let work = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(reference.path(), 3, work.path());
    spec.memory.stage_budget_bytes = vec![budget; 3];
    spec.memory.stage_read_mb_per_s = vec![400.0, 200.0, 300.0];
    // KV is planned for the 8 requests sent at once.
    spec.planner = Some(PlannerSpec::new("bursty", 8, 128));
    let rt = runtime();
    rt.block_on(async {
        let cluster = up(&spec).await;
        let streamed: usize = cluster
            .plan
            .stages
            .iter()
            .map(|s| s.offloaded.as_ref().map_or(0, Vec::len))
            .sum();
        assert!(
            streamed >= 1,
            "the plan streams what does not fit: {:?}",
            cluster.plan
        );
        let published = lime_client::status::retained::<StageProfile>(
            &cluster.broker,
            "lime/profile/+",
            Duration::from_millis(300),
        )
        .await
        .unwrap();
        assert_eq!(published.len(), 3, "every stage published its profile");
        for p in published.values() {
            assert!(!p.device.estimate && p.device.measured.is_some());
            assert_eq!(p.model, ckpt.shape());
        }
        let answers = ask(&cluster.broker, &requests).await;
        assert_answers(&reference, &requests, &answers, "planned by the broker");
    });
}
