//! Strangers on the network: with a ring key, a peer that cannot prove it holds
//! the key is dropped at the handshake, gets nothing but the listener's hello,
//! and the ring goes on serving with unchanged bits.

mod common;

use common::{ask, assert_answers, runtime, up, varied_requests, Reference};
use lime_schemas::{Frame, Hello};
use lime_stage::ring::auth::{Handshake, RingKey, Side};
use lime_stage::ring::connection::{read_frame, write_bytes};
use lime_testbench::cluster::ClusterSpec;
use std::time::Duration;
use tokio::net::TcpStream;

/// What a stranger sends after the listener's hello, given both hellos.
type Answer = Box<dyn FnOnce(&Hello, &Hello) -> Option<Frame>>;

const KEY: &str = "5f0c0e6a4b3d2a1908f7e6d5c4b3a29180706050403020100f1e2d3c4b5a6978";

/// Connects to `addr` as stage `from`, says hello, then sends `then` (given
/// the listener's reply); returns every frame received until the listener
/// closes the connection.
async fn stranger(
    addr: &str,
    epoch: u64,
    from: &str,
    then: impl FnOnce(&Hello, &Hello) -> Option<Frame>,
) -> Vec<Frame> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let hello = Hello::new(epoch, from, [42; 32]);
    write_bytes(&mut stream, &Frame::Hello(hello.clone()).encode().unwrap())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut then = Some(then);
    let limit = Duration::from_secs(15);
    while let Ok(Ok(Some(frame))) = tokio::time::timeout(limit, read_frame(&mut stream)).await {
        if let (Frame::Hello(reply), Some(then)) = (&frame, then.take()) {
            if let Some(next) = then(&hello, reply) {
                write_bytes(&mut stream, &next.encode().unwrap())
                    .await
                    .unwrap();
            }
        }
        got.push(frame);
    }
    got
}

#[test]
fn with_a_ring_key_strangers_are_dropped_at_the_handshake_and_the_ring_serves() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let key_file = work.path().join("ring.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let mut spec = ClusterSpec::new(reference.path(), 3, work.path().join("run"));
    spec.stage_env.push((
        "LIME_STAGE_DATA__KEY_FILE".into(),
        key_file.display().to_string(),
    ));
    let requests = varied_requests(8);
    runtime().block_on(async {
        let mut cluster = up(&spec).await;
        let answers = ask(&cluster.broker, &requests).await;
        assert_answers(&reference, &requests, &answers, "with a ring key");

        // s1 accepts s0 only; strangers claim to be s0 on the right plan.
        let target = cluster.plan.stages[1].data_addr.clone();
        let epoch = cluster.plan.epoch;
        let wrong = RingKey::from_hex(&"17".repeat(32)).unwrap();
        let attempts: [(&str, Answer); 4] = [
            (
                "a made-up proof",
                Box::new(|_, _| Some(Frame::Proof { mac: [7; 32] })),
            ),
            (
                "a proof under another key",
                Box::new(move |c, l| {
                    Some(Frame::Proof {
                        mac: wrong.proof(Side::Connector, c, l),
                    })
                }),
            ),
            (
                "the listener's own proof sent back",
                Box::new(|_, l| l.proof.map(|mac| Frame::Proof { mac })),
            ),
            (
                "activations instead of a proof",
                Box::new(|_, _| Some(Frame::Release { seqs: vec![1] })),
            ),
        ];
        for (what, then) in attempts {
            let got = stranger(&target, epoch, "s0", then).await;
            // The listener's hello (with its proof, which tells the stranger
            // nothing it can use) and then the connection closes.
            assert_eq!(got.len(), 1, "{what}: the stranger got {got:?}");
            let Frame::Hello(reply) = &got[0] else {
                panic!("{what}: {got:?}")
            };
            assert!(
                reply.proof.is_some(),
                "{what}: the listener did not prove itself"
            );
        }

        // The ring is untouched: same bits, every stage alive.
        let again = ask(&cluster.broker, &requests).await;
        assert_answers(&reference, &requests, &again, "after the strangers");
        cluster.check_alive().unwrap();
        let log = std::fs::read_to_string(work.path().join("run/s1.log")).unwrap();
        let refused = log.matches("failed authentication").count();
        assert_eq!(
            refused, 4,
            "s1 logged {refused} failed authentications:\n{log}"
        );
    });
}

#[test]
fn a_ring_key_that_is_not_hex_or_too_short_stops_the_stage_with_the_reason() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let key_file = work.path().join("ring.key");
    std::fs::write(&key_file, "secret\n").unwrap();
    let config = work.path().join("s0.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"s0\"\nmodel = {:?}\n\n[data]\nkey_file = {:?}\n",
            reference.path().display().to_string(),
            key_file.display().to_string()
        ),
    )
    .unwrap();
    let plan = work.path().join("plan.json");
    let stages = vec![
        lime_schemas::PlanStage {
            name: "s0".into(),
            data_addr: "127.0.0.1:0".into(),
            offloaded: None,
        },
        lime_schemas::PlanStage {
            name: "s1".into(),
            data_addr: "127.0.0.1:1".into(),
            offloaded: None,
        },
    ];
    std::fs::write(
        &plan,
        serde_json::to_string(&lime_schemas::Plan::even(1, stages, 1, 12).unwrap()).unwrap(),
    )
    .unwrap();
    let out = std::process::Command::new(lime_client::binaries::sibling("lime-stage").unwrap())
        .args(["--config", config.to_str().unwrap()])
        .env("LIME_STAGE_PLAN_FILE", &plan)
        .env("LIME_STAGE_BROKER__PORT", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("ring key") && stderr.contains("not hex"),
        "{stderr}"
    );
}
