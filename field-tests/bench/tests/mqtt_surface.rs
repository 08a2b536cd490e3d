//! The MQTT surface as robots use it: plain `mosquitto_pub`/`mosquitto_sub` with
//! MQTT 3.1.1 and 5, an external mosquitto broker, TLS, and bad requests that get
//! clear errors while good ones run on. Logins and topic rules: `topic_rules.rs`.

mod common;

use common::mosquitto::{issue_certificate, publish, read_stream, robot_request, Sub};
use common::{
    ask, assert_answers, assert_identical, require, runtime, up, varied_requests, Reference,
};
use lime_client::ask::ask_raw;
use lime_schemas::{ErrorCode, Reply, Request};
use lime_testbench::cluster::ClusterSpec;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Publishes a request as a robot with an MQTT 3.1.1 client does (QoS 1 on
/// `lime/request`), failing on a client error.
fn publish_request_v311(port: &str, body: &str) {
    let out = publish(&[
        "-V",
        "mqttv311",
        "-p",
        port,
        "-t",
        "lime/request",
        "-q",
        "1",
        "-m",
        body,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn mosquitto_clients_with_mqtt_311_and_5() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let spec = ClusterSpec::new(reference.path(), 2, work.path());
    runtime().block_on(async {
        let cluster = up(&spec).await;
        let v4 = cluster.v4_port.unwrap().to_string();
        let v5 = cluster.broker.port.to_string();
        let request = robot_request("robot-7", 12);
        let body = serde_json::to_string(&request).unwrap();

        // MQTT 3.1.1, default reply topic lime/response/<id>.
        let sub = Sub::start(&["-V", "mqttv311", "-p", &v4, "-t", "lime/response/robot-7"]);
        publish_request_v311(&v4, &body);
        let (text, f) = read_stream(&sub.until_done());
        assert_identical(&reference, &request, &f, "mosquitto v3.1.1");
        assert_eq!(
            text,
            reference
                .tokenizer
                .decode(f.token_ids.as_ref().unwrap())
                .unwrap()
        );

        // MQTT 3.1.1 with reply_to.
        let mut with_reply_to = request.clone();
        with_reply_to.reply_to = Some("robots/7/answers".into());
        let sub = Sub::start(&["-V", "mqttv311", "-p", &v4, "-t", "robots/7/answers"]);
        let body2 = serde_json::to_string(&with_reply_to).unwrap();
        publish_request_v311(&v4, &body2);
        let (_, f) = read_stream(&sub.until_done());
        assert_identical(&reference, &request, &f, "mosquitto reply_to");

        // MQTT 5: the response topic wins over reply_to, correlation data is echoed.
        let sub = Sub::start(&[
            "-V",
            "mqttv5",
            "-p",
            &v5,
            "-t",
            "robots/7/v5",
            "-F",
            "%D %p",
        ]);
        let out = publish(&[
            "-V",
            "mqttv5",
            "-p",
            &v5,
            "-t",
            "lime/request",
            "-q",
            "1",
            "-D",
            "publish",
            "response-topic",
            "robots/7/v5",
            "-D",
            "publish",
            "correlation-data",
            "c0ffee",
            "-m",
            &body2,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = sub.until_done();
        let payloads: Vec<String> = lines
            .iter()
            .map(|l| {
                let (corr, payload) = l.split_once(' ').expect("correlation data and payload");
                assert_eq!(corr, "c0ffee", "correlation data echoed on every reply");
                payload.to_owned()
            })
            .collect();
        let (_, f) = read_stream(&payloads);
        assert_identical(&reference, &request, &f, "mosquitto v5");

        // A request that names no reply topic and cannot be parsed: lime/error.
        let sub = Sub::start(&["-p", &v4, "-t", "lime/error"]);
        publish(&[
            "-p",
            &v4,
            "-t",
            "lime/request",
            "-q",
            "1",
            "-m",
            "{\"prompt\": oops",
        ]);
        let lines = sub.until_done();
        let reply = Reply::parse(lines[0].as_bytes()).unwrap();
        let Reply::Error(e) = reply else {
            panic!("{lines:?}")
        };
        assert_eq!(e.error.code, ErrorCode::BadJson);
    });
}

#[test]
fn bad_requests_get_clear_errors_while_good_ones_complete() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let spec = ClusterSpec::new(reference.path(), 3, work.path());
    let good = varied_requests(8);
    let long_prompt = format!(
        "{{\"prompt\":{:?},\"max_tokens\":8}}",
        "robot arm ".repeat(3000)
    );
    let huge = format!("{{\"prompt\":\"{}\"}}", "a".repeat(1 << 20));
    let bad: Vec<(Vec<u8>, ErrorCode, &str)> = vec![
        (
            b"this is not json".to_vec(),
            ErrorCode::BadJson,
            "not valid",
        ),
        (
            br#"{"max_tokens":5}"#.to_vec(),
            ErrorCode::InvalidRequest,
            "prompt",
        ),
        (
            br#"{"prompt":"hi","max_tokens":-4}"#.to_vec(),
            ErrorCode::InvalidRequest,
            "-4",
        ),
        (
            br#"{"prompt":"hi","max_tokens":99999999}"#.to_vec(),
            ErrorCode::InvalidRequest,
            "max_tokens",
        ),
        (
            br#"{"prompt":"hi","max_tokens":100000}"#.to_vec(),
            ErrorCode::ContextLengthExceeded,
            "context",
        ),
        (
            long_prompt.into_bytes(),
            ErrorCode::ContextLengthExceeded,
            "context",
        ),
        (
            br#"{"prompt":"hi","colour":"red"}"#.to_vec(),
            ErrorCode::InvalidRequest,
            "colour",
        ),
        (
            br#"{"prompt":"hi","temperature":"hot"}"#.to_vec(),
            ErrorCode::InvalidRequest,
            "temperature",
        ),
        (
            br#"{"messages":[{"role":"user"}]}"#.to_vec(),
            ErrorCode::InvalidRequest,
            "content",
        ),
        (
            br#"{"prompt":"hi","stop":[""]}"#.to_vec(),
            ErrorCode::InvalidRequest,
            "stop",
        ),
        (huge.into_bytes(), ErrorCode::PayloadTooLarge, "larger than"),
        (Vec::new(), ErrorCode::BadJson, "not valid"),
    ];
    // Interleave: good, bad, good, bad, ...
    let mut payloads = Vec::new();
    let mut expect: Vec<Result<&Request, (ErrorCode, &str)>> = Vec::new();
    for i in 0..good.len().max(bad.len()) {
        if let Some(g) = good.get(i) {
            payloads.push(serde_json::to_vec(g).unwrap());
            expect.push(Ok(g));
        }
        if let Some((b, code, needle)) = bad.get(i) {
            payloads.push(b.clone());
            expect.push(Err((*code, needle)));
        }
    }
    runtime().block_on(async {
        let mut cluster = up(&spec).await;
        let answers = ask_raw(
            &cluster.broker,
            &payloads,
            Duration::from_secs(120),
            |_, _| {},
        )
        .await
        .unwrap();
        for (want, got) in expect.iter().zip(&answers) {
            match (want, &got.outcome) {
                (Ok(r), Ok(f)) => assert_identical(&reference, r, f, "beside bad requests"),
                (Err((code, needle)), Err(e)) => {
                    assert_eq!(e.error.code, *code, "{}", e.error.message);
                    assert!(
                        e.error.message.contains(needle),
                        "{:?} should mention {needle:?}",
                        e.error.message
                    );
                }
                (want, got) => panic!("expected {want:?}, got {got:?}"),
            }
        }
        cluster.check_alive().unwrap();
        // A chat works when well formed.
        let chat = Request {
            messages: Some(vec![lime_schemas::ChatMessage {
                role: "user".into(),
                content: "Where is the exit?".into(),
            }]),
            max_tokens: Some(6),
            ..Default::default()
        };
        let a = ask(&cluster.broker, &[chat]).await;
        let f = a[0].outcome.as_ref().expect("chat answered");
        assert!(f.usage.prompt_tokens > 5, "the template added its headers");
    });
}

#[test]
fn an_external_mosquitto_broker_works_the_same() {
    require("mosquitto");
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = work.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_packet_size 4194304\n"),
    )
    .unwrap();
    let mut broker = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut broker);
    let mut spec = ClusterSpec::new(reference.path(), 3, work.path().join("cluster"));
    spec.external_broker =
        Some(lime_client::mqtt::BrokerAddr::parse(&format!("127.0.0.1:{port}")).unwrap());
    spec.plan_over_mqtt = true;
    spec.interleave = 2;
    let requests = varied_requests(16);
    runtime().block_on(async {
        let cluster = up(&spec).await;
        let answers = ask(&cluster.broker, &requests).await;
        assert_answers(&reference, &requests, &answers, "via mosquitto");
        let p = port.to_string();
        let sub = Sub::start(&["-V", "mqttv311", "-p", &p, "-t", "lime/response/m1"]);
        let body = r#"{"id":"m1","prompt":"Hafen Straße","max_tokens":5,"ignore_eos":true}"#;
        publish_request_v311(&p, body);
        let (_, f) = read_stream(&sub.until_done());
        assert_eq!(f.usage.completion_tokens, 5);
    });
}

#[test]
fn a_request_delivered_twice_is_served_once_and_its_id_is_refused_to_another_until_answered() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let spec = ClusterSpec::new(reference.path(), 2, work.path());
    runtime().block_on(async {
        let cluster = up(&spec).await;
        let v4 = cluster.v4_port.unwrap().to_string();
        // Long enough to be still generating when the others arrive.
        let request = robot_request("robot-dup", 400);
        let other = Request {
            max_tokens: Some(3),
            ..request.clone()
        };
        let (body, other_body) = (
            serde_json::to_string(&request).unwrap(),
            serde_json::to_string(&other).unwrap(),
        );
        let sub = Sub::start(&["-V", "mqttv311", "-p", &v4, "-t", "lime/response/robot-dup"]);
        let send = |body: &str| publish_request_v311(&v4, body);
        // What a robot does when its QoS 1 publish is not acknowledged in
        // time, then another request under the same id while it runs.
        send(&body);
        send(&body);
        send(&other_body);
        let mut pieces = Vec::new();
        let mut errors = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = sub
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("no final message");
            if !line.contains("{\"") {
                continue;
            }
            match Reply::parse(line.as_bytes()).unwrap() {
                Reply::Error(e) => errors.push(e),
                Reply::Queued(_) => {}
                Reply::Final(_) => {
                    pieces.push(line);
                    break;
                }
                Reply::Text(_) => pieces.push(line),
            }
        }
        let (_, f) = read_stream(&pieces);
        assert_identical(&reference, &request, &f, "a redelivered request");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].error.code, ErrorCode::DuplicateId, "{errors:?}");
        // No second answer to the redelivery.
        std::thread::sleep(Duration::from_millis(500));
        let extra: Vec<String> = sub.lines.try_iter().filter(|l| l.contains("{\"")).collect();
        assert!(extra.is_empty(), "a second answer: {extra:?}");
        // Once answered, the id is free for the next request.
        send(&other_body);
        let (_, f) = read_stream(&sub.until_done());
        assert_identical(&reference, &other, &f, "the id reused after its answer");
        let log = std::fs::read_to_string(work.path().join("s0.log")).unwrap();
        assert_eq!(log.matches("request done").count(), 2, "{log}");
    });
}

#[test]
fn robots_and_stages_speak_mqtt_over_tls_and_a_plain_or_unverified_client_gets_nothing() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let identity = issue_certificate(work.path(), "broker");
    let other_ca = issue_certificate(work.path(), "stranger").ca_file;
    let ca = identity.ca_file.display().to_string();
    let mut spec = ClusterSpec::new(reference.path(), 2, work.path().join("run"));
    // TLS only: the broker has no plain listener, so the stages (and the
    // broker's planner, through its internal port) work over TLS or not at all.
    spec.tls = Some(identity);
    spec.plan_over_mqtt = true;
    let request = robot_request("tls-1", 12);
    let body = serde_json::to_string(&request).unwrap();
    runtime().block_on(async {
        let cluster = up(&spec).await;
        let tls_port = cluster.v4_port.unwrap().to_string();
        let toml = std::fs::read_to_string(spec.dir.join("s1.toml")).unwrap();
        assert!(toml.contains("ca_file"), "{toml}");
        let answers = ask(&cluster.broker, &varied_requests(3)).await;
        assert_answers(&reference, &varied_requests(3), &answers, "stages over TLS");
        let tls = |ca: &str| -> Vec<String> {
            [
                "-V",
                "mqttv311",
                "-h",
                "localhost",
                "-p",
                &tls_port,
                "--cafile",
                ca,
            ]
            .map(String::from)
            .to_vec()
        };
        let args = |extra: &[&str], ca: &str| -> Vec<String> {
            let mut a = tls(ca);
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        let sub_args = args(&["-t", "lime/response/tls-1"], &ca);
        let sub = Sub::start(&sub_args.iter().map(String::as_str).collect::<Vec<_>>());
        let pub_args = args(&["-t", "lime/request", "-q", "1", "-m", &body], &ca);
        let out = publish(&pub_args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (_, f) = read_stream(&sub.until_done());
        assert_identical(&reference, &request, &f, "over TLS");

        // Plain MQTT on the TLS port, and TLS trusting another CA: refused.
        let plain = publish(&[
            "-V",
            "mqttv311",
            "-p",
            &tls_port,
            "-t",
            "lime/request",
            "-m",
            &body,
        ]);
        assert!(
            !plain.status.success(),
            "plain MQTT was accepted on the TLS port"
        );
        let stranger_ca = other_ca.display().to_string();
        let unverified = args(&["-t", "lime/request", "-m", &body], &stranger_ca);
        let out = publish(&unverified.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            !out.status.success(),
            "a client that cannot verify the broker connected"
        );
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(
            stderr.contains("certificate") || stderr.contains("tls"),
            "{stderr}"
        );
    });
}
