//! Faults a field cluster meets: garbage on a data port, a stage that dies, a stage
//! that is stopped. The ring keeps serving and the control plane tells the truth.

mod common;

use common::{ask, assert_answers, runtime, up, varied_requests, Reference};
use lime_client::ask::ask_all;
use lime_schemas::frame::{Frame, Hello};
use lime_schemas::StageState;
use lime_testbench::cluster::ClusterSpec;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Ways to speak garbage to a data port.
fn garbage(addr: &str, epoch: u64) {
    let send = |bytes: &[u8]| {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(bytes);
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    send(b"GET / HTTP/1.1\r\nHost: lime\r\n\r\n");
    // A plausible length, then bytes that are not a frame.
    let mut bogus = 64u32.to_le_bytes().to_vec();
    bogus.extend((0..64u8).map(|i| i.wrapping_mul(37)));
    send(&bogus);
    // A frame that is not a hello.
    send(
        &Frame::Ping {
            nonce: 1,
            rooms: Vec::new(),
        }
        .encode()
        .unwrap(),
    );
    // Hellos from the wrong stage, and from the right stage on another plan.
    send(
        &Frame::Hello(Hello::new(epoch, "intruder", [1; 32]))
            .encode()
            .unwrap(),
    );
    send(
        &Frame::Hello(Hello::new(epoch + 1, "s0", [1; 32]))
            .encode()
            .unwrap(),
    );
    // A length far beyond the limit.
    send(&u32::MAX.to_le_bytes());
}

#[test]
fn garbage_on_a_data_port_is_dropped_and_the_ring_keeps_serving() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let spec = ClusterSpec::new(reference.path(), 3, work.path());
    let requests = varied_requests(16);
    runtime().block_on(async {
        let mut cluster = up(&spec).await;
        let target = cluster.plan.stages[1].data_addr.clone();
        let epoch = cluster.plan.epoch;
        let attacker = std::thread::spawn(move || {
            for _ in 0..5 {
                garbage(&target, epoch);
            }
        });
        let answers = ask(&cluster.broker, &requests).await;
        attacker.join().unwrap();
        assert_answers(&reference, &requests, &answers, "under garbage");
        // And after it.
        let again = ask(&cluster.broker, &requests[..4]).await;
        assert_answers(&reference, &requests[..4], &again, "after garbage");
        cluster.check_alive().unwrap();
        let log = std::fs::read_to_string(work.path().join("s1.log")).unwrap();
        let dropped = log.matches("dropped data-plane peer").count();
        assert!(dropped >= 25, "{dropped} drops logged:\n{log}");
        for reason in [
            "larger than the",
            "undecodable",
            "not a hello",
            "previous stage is",
            "epoch",
        ] {
            assert!(
                log.lines()
                    .any(|l| l.contains("dropped data-plane peer") && l.contains(reason)),
                "no drop logged for {reason:?}:\n{log}"
            );
        }
    });
}

#[test]
fn a_killed_stage_goes_offline_by_its_last_will_and_a_stopped_one_says_so() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let spec = ClusterSpec::new(reference.path(), 3, work.path());
    runtime().block_on(async {
        let mut cluster = up(&spec).await;
        let state = |statuses: &[lime_schemas::StageStatus], name: &str| {
            statuses.iter().find(|s| s.stage == name).map(|s| s.state)
        };
        // SIGKILL: no chance to say goodbye; the broker publishes the will.
        let pid = cluster.pid("s2").unwrap();
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let statuses =
                lime_client::status::collect(&cluster.broker, Duration::from_millis(200))
                    .await
                    .unwrap();
            if state(&statuses, "s2") == Some(StageState::Offline) {
                assert_eq!(state(&statuses, "s1"), Some(StageState::Online));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "s2 still reported {:?}",
                state(&statuses, "s2")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // SIGTERM: a clean exit that publishes offline itself.
        let pid = cluster.pid("s1").unwrap();
        let started = Instant::now();
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        let statuses = loop {
            let statuses =
                lime_client::status::collect(&cluster.broker, Duration::from_millis(200))
                    .await
                    .unwrap();
            if state(&statuses, "s1") == Some(StageState::Offline) {
                break statuses;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "s1 did not go offline"
            );
        };
        assert_eq!(state(&statuses, "s0"), Some(StageState::Online));
        let err = cluster.check_alive().unwrap_err().to_string();
        assert!(
            err.contains("s1 exited (exit status: 0)") || err.contains("s2"),
            "{err}"
        );
        let broker_log = std::fs::read_to_string(work.path().join("broker.log")).unwrap();
        assert!(broker_log.contains("stage left"), "{broker_log}");
        assert!(broker_log.contains("stage joined"), "{broker_log}");
    });
}

#[test]
fn a_restarted_stage_rejoins_the_ring() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let spec = ClusterSpec::new(reference.path(), 3, work.path());
    let requests = varied_requests(6);
    runtime().block_on(async {
        let mut cluster = up(&spec).await;
        let before = ask(&cluster.broker, &requests).await;
        assert_answers(&reference, &requests, &before, "before restart");
        cluster.restart_stage("s1").unwrap();
        cluster.wait_online(Duration::from_secs(60)).await.unwrap();
        // The starter's link to s1 notices the old connection is gone on its next
        // write and reconnects with backoff; the frame is sent again.
        let after = ask(&cluster.broker, &requests).await;
        assert_answers(&reference, &requests, &after, "after restart");
        let s0 = std::fs::read_to_string(work.path().join("s0.log")).unwrap();
        assert!(
            s0.matches("connected to the next stage").count() >= 2,
            "{s0}"
        );
    });
}

#[test]
fn requests_caught_in_a_crash_are_replayed_and_answered_in_full() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let spec = ClusterSpec::new(reference.path(), 3, work.path());
    // Long enough to be on the ring when s1 dies, greedy and sampled alike.
    let requests: Vec<_> = varied_requests(8)
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            r.max_tokens = Some(600 + 10 * i as u32);
            r.ignore_eos = true;
            r
        })
        .collect();
    runtime().block_on(async {
        let mut cluster = up(&spec).await;
        let broker = cluster.broker.clone();
        let asked = requests.clone();
        let asking = tokio::spawn(async move {
            let mut told_to_wait = 0;
            let answers = ask_all(&broker, &asked, Duration::from_secs(120), |_, reply| {
                if matches!(reply, lime_schemas::Reply::Queued(q) if q.waiting_for == "ring") {
                    told_to_wait += 1;
                }
            })
            .await;
            (answers, told_to_wait)
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        let pid = cluster.pid("s1").unwrap();
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.restart_stage("s1").unwrap();
        let (answers, told_to_wait) = asking.await.unwrap();
        let answers = answers.unwrap();
        // Every answer whole, in order, bit for bit what one process makes.
        assert_answers(&reference, &requests, &answers, "replayed after a crash");
        assert!(
            told_to_wait > 0,
            "no request heard that it waits for the ring"
        );
        let s0 = std::fs::read_to_string(work.path().join("s0.log")).unwrap();
        assert!(s0.contains("the ring broke"), "{s0}");
        assert!(s0.contains("replaying every sequence"), "{s0}");
        let after = ask(&cluster.broker, &requests[..4]).await;
        assert_answers(&reference, &requests[..4], &after, "after a crash");
    });
}

#[test]
fn a_stage_that_stays_dead_is_planned_around_and_its_requests_finish() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(reference.path(), 3, work.path());
    spec.planner = Some(lime_testbench::cluster::PlannerSpec::new(
        "sporadic", 8, 1024,
    ));
    spec.broker_env = vec![("LIME_BROKER_PLANNER__LOST_AFTER_MS".into(), "2000".into())];
    let requests: Vec<_> = varied_requests(6)
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            r.max_tokens = Some(700 + 10 * i as u32);
            r.ignore_eos = true;
            r
        })
        .collect();
    runtime().block_on(async {
        let cluster = up(&spec).await;
        let epoch = cluster.plan.epoch;
        let victim = cluster.plan.stages[2].name.clone();
        let broker = cluster.broker.clone();
        let asked = requests.clone();
        let asking = tokio::spawn(async move {
            ask_all(&broker, &asked, Duration::from_secs(120), |_, _| {}).await
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        let pid = cluster.pid(&victim).unwrap();
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        let answers = asking.await.unwrap().unwrap();
        assert_answers(
            &reference,
            &requests,
            &answers,
            "planned around a dead stage",
        );
        let plan = lime_client::status::retained::<lime_schemas::Plan>(
            &cluster.broker,
            lime_schemas::topics::PLAN,
            Duration::from_millis(300),
        )
        .await
        .unwrap()
        .into_values()
        .next()
        .expect("a plan");
        assert!(plan.epoch > epoch, "a new plan");
        assert_eq!(plan.stages.len(), 2);
        assert!(plan.position(&victim).is_none(), "{plan:?}");
        let broker_log = std::fs::read_to_string(work.path().join("broker.log")).unwrap();
        assert!(
            broker_log.contains("planning around the lost stages"),
            "{broker_log}"
        );
        let s0 = std::fs::read_to_string(work.path().join("s0.log")).unwrap();
        assert!(s0.contains("moved to the new plan"), "{s0}");
    });
}

#[test]
fn a_crashed_broker_comes_back_and_the_ring_keeps_its_plan() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(reference.path(), 3, work.path());
    spec.planner = Some(lime_testbench::cluster::PlannerSpec::new(
        "sporadic", 4, 256,
    ));
    let requests = varied_requests(6);
    runtime().block_on(async {
        let mut cluster = up(&spec).await;
        let epoch = cluster.plan.epoch;
        let before = ask(&cluster.broker, &requests).await;
        assert_answers(&reference, &requests, &before, "before the broker crashed");

        // Everything retained is gone with the broker; the stages reconnect,
        // subscribe again and publish it again, the starter the running plan.
        cluster.crash_and_restart_broker().unwrap();
        cluster.wait_online(Duration::from_secs(60)).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let plan = loop {
            let found = lime_client::status::retained::<lime_schemas::Plan>(
                &cluster.broker,
                lime_schemas::topics::PLAN,
                Duration::from_millis(300),
            )
            .await
            .unwrap_or_default();
            if let Some(p) = found.into_values().next() {
                break p;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no plan on the retained topic after the restart"
            );
        };
        assert_eq!(plan.epoch, epoch, "the ring's plan, not a new one");
        let after = ask(&cluster.broker, &requests).await;
        assert_answers(&reference, &requests, &after, "after the broker came back");
        let log = std::fs::read_to_string(work.path().join("broker.log")).unwrap();
        assert!(log.contains("the ring's plan stays"), "{log}");

        // A stage that starts after the restart finds the plan and rejoins.
        cluster.restart_stage("s2").unwrap();
        cluster.wait_online(Duration::from_secs(60)).await.unwrap();
        let again = ask(&cluster.broker, &requests).await;
        assert_answers(
            &reference,
            &requests,
            &again,
            "with a stage restarted after",
        );
    });
}

/// Latency percentile of `times` (seconds), nearest rank.
fn percentile(times: &[f64], p: f64) -> f64 {
    let mut t = times.to_vec();
    t.sort_by(f64::total_cmp);
    t[((p * t.len() as f64).ceil() as usize).clamp(1, t.len()) - 1]
}

/// Asks `requests` at once; returns each answer with how many finals and
/// repeated pieces its reply topic carried.
async fn ask_counting(
    broker: &lime_client::mqtt::BrokerAddr,
    requests: &[lime_schemas::Request],
) -> (Vec<lime_client::ask::Answer>, Vec<(u32, u32)>) {
    let mut seen: Vec<(std::collections::HashSet<u32>, u32, u32)> =
        vec![Default::default(); requests.len()];
    let answers = ask_all(
        broker,
        requests,
        Duration::from_secs(240),
        |i, reply| match reply {
            lime_schemas::Reply::Text(t) if !seen[i].0.insert(t.seq) => seen[i].2 += 1,
            lime_schemas::Reply::Final(_) => seen[i].1 += 1,
            _ => {}
        },
    )
    .await
    .unwrap();
    (answers, seen.into_iter().map(|(_, f, d)| (f, d)).collect())
}

#[test]
fn a_fault_run_of_kills_and_a_freeze_loses_and_repeats_nothing() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(reference.path(), 4, work.path());
    spec.max_inflight = 4;
    // Interleaved: a replayed pass meets old caches on a stage more than once.
    spec.interleave = 2;
    let requests: Vec<_> = varied_requests(32)
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            r.max_tokens = Some(500 + 7 * i as u32);
            r.ignore_eos = true;
            r
        })
        .collect();
    runtime().block_on(async {
        let mut cluster = up(&spec).await;
        // Fault-free first, for the latency each request takes without faults.
        let (calm, _) = ask_counting(&cluster.broker, &requests).await;
        assert_answers(&reference, &requests, &calm, "fault-free");
        let took = |a: &lime_client::ask::Answer| a.last.duration_since(a.sent).as_secs_f64();
        let calm_s: Vec<f64> = calm.iter().map(took).collect();

        let broker = cluster.broker.clone();
        let asked = requests.clone();
        let asking = tokio::spawn(async move { ask_counting(&broker, &asked).await });
        // Three SIGKILLs of a stage that is not the starter, each restarted
        // as a supervisor would, then a SIGSTOP of 10 s.
        let mut rng = 0x9e37_79b9_u32;
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let victim = format!("s{}", 1 + (rng >> 16) % 3);
            let pid = cluster.pid(&victim).unwrap();
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            eprintln!("killed {victim}; restarting it");
            assert_eq!(cluster.revive_exited_stages().unwrap().len(), 1);
            // Back before the next fault, so that each costs a replay of its own.
            cluster.wait_online(Duration::from_secs(60)).await.unwrap();
        }
        let frozen = cluster.pid("s2").unwrap().to_string();
        std::process::Command::new("kill").args(["-STOP", &frozen]).status().unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        std::process::Command::new("kill").args(["-CONT", &frozen]).status().unwrap();
        let (faulty, counts) = asking.await.unwrap();
        let answered = faulty.iter().filter(|a| a.outcome.is_ok()).count();
        let repeated: u32 = counts.iter().map(|(finals, pieces)| finals.saturating_sub(1) + pieces).sum();
        let fault_s: Vec<f64> = faulty.iter().map(took).collect();
        let added: Vec<f64> = fault_s.iter().zip(&calm_s).map(|(f, c)| f - c).collect();
        eprintln!(
            "fault run: {answered} of {} answered, {} lost, {repeated} repeated; latency p50/p99 {:.2}/{:.2} s fault-free, {:.2}/{:.2} s with faults, added p50/p99 {:.2}/{:.2} s",
            requests.len(),
            requests.len() - answered,
            percentile(&calm_s, 0.5),
            percentile(&calm_s, 0.99),
            percentile(&fault_s, 0.5),
            percentile(&fault_s, 0.99),
            percentile(&added, 0.5),
            percentile(&added, 0.99),
        );
        assert_eq!(repeated, 0, "pieces or finals repeated: {counts:?}");
        // The fault-free answers were checked against one process: the others
        // must equal them bit for bit.
        for ((r, calm), faulty) in requests.iter().zip(&calm).zip(&faulty) {
            let (c, f) = (calm.outcome.as_ref().unwrap(), faulty.outcome.as_ref());
            let f = f.unwrap_or_else(|e| panic!("{:?} failed through the faults: {e:?}", r.id));
            assert_eq!(faulty.gaps, 0, "{:?}: pieces out of order", r.id);
            assert_eq!(f.token_ids, c.token_ids, "{:?}: tokens differ", r.id);
            let bits = |l: &Option<Vec<f32>>| l.as_ref().map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            assert_eq!(bits(&f.logits), bits(&c.logits), "{:?}: final logits differ", r.id);
        }
        let s0 = std::fs::read_to_string(work.path().join("s0.log")).unwrap();
        let replays: Vec<&str> = s0
            .lines()
            .filter(|l| l.contains("replaying every sequence"))
            .collect();
        eprintln!("replays at the starter:\n{}", replays.join("\n"));
        assert!(replays.len() >= 3, "{s0}");
    });
}
