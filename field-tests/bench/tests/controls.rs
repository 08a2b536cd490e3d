//! A robot's controls over its requests, with real MQTT clients: a deadline
//! ends a request with `deadline_exceeded`, a cancel on `lime/cancel` ends it
//! with `cancelled` (and only its own login's cancel counts), and a
//! high-priority request is admitted before the normal ones waiting.

mod common;

use common::mosquitto::{publish, Sub};
use common::{runtime, up, Reference};
use lime_schemas::{ErrorCode, Reply, Request};
use lime_testbench::cluster::ClusterSpec;
use std::time::Duration;

fn error_of(lines: &[String]) -> Option<ErrorCode> {
    lines.iter().find_map(|l| match Reply::parse(l.as_bytes()) {
        Ok(Reply::Error(e)) => Some(e.error.code),
        _ => None,
    })
}

fn long(id: &str) -> Request {
    Request {
        id: Some(id.into()),
        prompt: Some("Robot arm, keep reporting".into()),
        max_tokens: Some(1500),
        ignore_eos: true,
        ..Default::default()
    }
}

#[test]
fn deadlines_cancels_and_priorities() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(reference.path(), 2, work.path());
    // One sequence at a time, so that the others wait their turn in the queue.
    spec.stage_env = vec![("LIME_STAGE_STARTER__MAX_SEQUENCES".into(), "1".into())];
    runtime().block_on(async {
        let cluster = up(&spec).await;
        let port = cluster.v4_port.unwrap().to_string();
        let ask = |r: &Request| {
            let body = serde_json::to_string(r).unwrap();
            let out = publish(&["-p", &port, "-t", "lime/request", "-q", "1", "-m", &body]);
            assert!(out.status.success(), "{out:?}");
        };
        let sub = |id: &str| Sub::start(&["-p", &port, "-t", &format!("lime/response/{id}")]);
        let cancel = |body: &str| {
            let out = publish(&["-p", &port, "-t", "lime/cancel", "-q", "1", "-m", body]);
            assert!(out.status.success(), "{out:?}");
        };

        // A deadline too short for 1500 tokens.
        let timed = sub("timed");
        ask(&Request {
            deadline_ms: Some(200),
            ..long("timed")
        });
        let lines = timed.until_done();
        assert_eq!(
            error_of(&lines),
            Some(ErrorCode::DeadlineExceeded),
            "{lines:?}"
        );

        // Cancelled once it streams.
        let doomed = sub("doomed");
        ask(&long("doomed"));
        // Once it streams.
        while !doomed
            .lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap()
            .contains("{\"")
        {}
        cancel(r#"{"id":"doomed"}"#);
        let lines = doomed.until_done();
        assert_eq!(error_of(&lines), Some(ErrorCode::Cancelled), "{lines:?}");

        // The starter is busy with `hog`; three normal requests wait, then a
        // high one arrives and is served first.
        let order = Sub::start(&["-p", &port, "-t", "lime/response/#"]);
        ask(&Request {
            max_tokens: Some(300),
            ..long("hog")
        });
        for id in ["n1", "n2", "n3"] {
            ask(&Request {
                max_tokens: Some(4),
                ..long(id)
            });
        }
        ask(&Request {
            max_tokens: Some(4),
            priority: Some(lime_schemas::Priority::High),
            ..long("urgent")
        });
        let mut finished = Vec::new();
        while finished.len() < 5 {
            let line = order
                .lines
                .recv_timeout(Duration::from_secs(60))
                .expect("every request finishes");
            if let Ok(Reply::Final(f)) = Reply::parse(line.as_bytes()) {
                finished.push(f.id);
            }
        }
        assert_eq!(finished, ["hog", "urgent", "n1", "n2", "n3"]);

        // A cancel of a request no one has in flight is harmless.
        cancel(r#"{"id":"ghost"}"#);
        let bad = Sub::start(&["-p", &port, "-t", "lime/error"]);
        cancel("not json");
        let lines = bad.until_done();
        assert_eq!(
            error_of(&lines),
            Some(ErrorCode::InvalidRequest),
            "{lines:?}"
        );
    });
}
