//! A minute and a half of sustained bursty load with robots hanging up
//! mid-answer: nothing lost, nothing duplicated, malformed requests refused
//! with a reason, every process alive, and the stages' memory flat once warm
//! (the broker's per-subscription logs take about a minute to fill to their
//! bound). The broker is not flat: it keeps about 15 KiB per robot connection
//! (rumqttd's, not yet traced to its end; see README, Known limits), so its
//! growth is bounded per connection instead. `lime bench soak --seconds 600`,
//! or field-tests/soak.sh, runs the same for longer.

mod common;

use common::{runtime, up, Reference};
use lime_testbench::cluster::ClusterSpec;
use lime_testbench::soak::SoakSpec;
use std::time::Duration;

#[test]
fn bursts_and_hang_ups_lose_nothing_and_memory_stays_flat() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(reference.path(), 3, work.path());
    spec.telemetry_ms = Some(250);
    runtime().block_on(async {
        let mut cluster = up(&spec).await;
        let mut soak = SoakSpec::new(Duration::from_secs(100));
        soak.warm_after = Duration::from_secs(70);
        let report = lime_testbench::soak::run(&cluster, &soak, |m| eprintln!("soak: {m}"))
            .await
            .unwrap();
        eprint!("{}", report.render());
        cluster.check_alive().unwrap();
        assert!(report.held(), "{report:#?}");
        assert!(report.abandoned > 0, "no robot hung up");
        assert!(report.refused > 0, "no malformed request was refused");
        assert!(report.answered > 100, "only {} answers", report.answered);
        assert_eq!(report.rss_mib.len(), 4, "{:?}", report.rss_mib);
        // Measured: 0.15-0.2 MiB/s at ~10 connections/s, 400 s long.
        const BROKER_KIB_PER_CONNECTION: f64 = 24.0;
        for (name, warm, end) in &report.rss_mib {
            let known = if name == "broker" {
                report.bursts_since_warm as f64 * BROKER_KIB_PER_CONNECTION / 1024.0
            } else {
                0.0
            };
            assert!(
                *end <= warm * 1.10 + 4.0 + known,
                "{name}: RSS grew from {warm:.1} MiB once warm to {end:.1} MiB \
                 ({} robot connections since)",
                report.bursts_since_warm
            );
        }
    });
}
