//! SIGTERM under load: the starter drains. Every request in flight finishes or
//! ends with an error, one that arrives while it drains is refused with a
//! reason, its status goes offline and it exits 0 within its shutdown grace.

mod common;

use common::{runtime, up, varied_requests, Reference};
use lime_client::ask::ask_all;
use lime_schemas::{ErrorCode, Reply, StageState, StageStatus};
use lime_testbench::cluster::{Budget, ClusterSpec};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GRACE_MS: u64 = 3_000;

#[test]
fn sigterm_under_load_drains_the_starter_and_exits_cleanly() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(reference.path(), 2, work.path());
    // Every layer streamed at an emulated 4 MB/s: each token takes a while, so
    // long answers outlast the grace and short ones finish within it.
    spec.memory.budget = Budget::Offload(1.0);
    spec.memory.read_mb_per_s = Some(4.0);
    spec.stage_env = vec![("LIME_STAGE_SHUTDOWN_GRACE_MS".into(), GRACE_MS.to_string())];
    let mut requests = varied_requests(6);
    for (i, r) in requests.iter_mut().enumerate() {
        r.max_tokens = Some(if i % 2 == 0 { 2 } else { 400 });
        r.ignore_eos = true;
    }
    runtime().block_on(async {
        let mut cluster = up(&spec).await;
        let broker = cluster.broker.clone();
        let streamed = Arc::new(AtomicUsize::new(0));
        let seen = streamed.clone();
        let load = tokio::spawn({
            let (broker, requests) = (broker.clone(), requests.clone());
            async move {
                ask_all(&broker, &requests, Duration::from_secs(60), |_, r| {
                    if matches!(r, Reply::Text(_)) {
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .await
            }
        });
        let waiting = Instant::now();
        while streamed.load(Ordering::Relaxed) < 3 {
            assert!(
                waiting.elapsed() < Duration::from_secs(30),
                "no tokens streamed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let starter = cluster.pid("s0").expect("the starter runs");
        let stopped = Instant::now();
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &starter.to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        // A request arriving while the starter drains is refused with a reason.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut late = varied_requests(1);
        late[0].id = Some("late".into());
        let late = ask_all(&broker, &late, Duration::from_secs(10), |_, _| {})
            .await
            .unwrap();
        let refused = late[0]
            .outcome
            .as_ref()
            .expect_err("refused while draining");
        assert_eq!(refused.error.code, ErrorCode::Overloaded, "{refused:?}");

        let answers = load.await.unwrap().unwrap();
        for (r, a) in requests.iter().zip(&answers) {
            match &a.outcome {
                Ok(f) => assert_eq!(
                    f.usage.completion_tokens,
                    r.max_tokens.unwrap(),
                    "{:?} finished whole",
                    r.id
                ),
                Err(e) => {
                    assert_eq!(e.error.code, ErrorCode::Internal, "{e:?}");
                    assert!(e.error.message.contains("shutting down"), "{e:?}");
                }
            }
        }
        let finished = answers.iter().filter(|a| a.outcome.is_ok()).count();
        assert!(finished >= 3, "the short answers finish within the grace");

        let exit = loop {
            let exited = cluster.exited_stages().unwrap();
            if let Some((_, how)) = exited.into_iter().find(|(n, _)| n == "s0") {
                break how;
            }
            assert!(
                stopped.elapsed() < Duration::from_millis(GRACE_MS + 5_000),
                "the starter did not exit within its grace"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(exit, "exit status: 0");
        let statuses = lime_client::status::retained::<StageStatus>(
            &broker,
            "lime/status/s0",
            Duration::from_millis(300),
        )
        .await
        .unwrap();
        assert_eq!(
            statuses.values().next().map(|s| s.state),
            Some(StageState::Offline),
            "{statuses:?}"
        );
        cluster.stop();
    });
}
