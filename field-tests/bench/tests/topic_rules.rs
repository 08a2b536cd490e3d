//! Logins and topic rules at lime-broker's gate, tried with real MQTT clients:
//! strangers are refused, a robot asks and reads its own answers and nothing
//! else (not the plan, not another robot's answers), a monitor only watches,
//! and lime's own stages and tools (services) run as before.

mod common;

use common::mosquitto::{publish, read_stream, robot_request, Sub};
use common::{ask, assert_answers, assert_identical, runtime, varied_requests, Reference};
use lime_schemas::{ErrorCode, Plan, Reply, Request};
use lime_testbench::cluster::{Cluster, ClusterSpec};
use std::process::Command;
use std::time::Duration;

/// (name, password, role) of every login the broker knows.
const USERS: [(&str, &str, &str); 4] = [
    ("fleet", "fleet-pw", "service"),
    ("arm1", "arm1-pw", "robot"),
    ("arm2", "arm2-pw", "robot"),
    ("ops", "ops-pw", "monitor"),
];

fn broker_env() -> Vec<(String, String)> {
    USERS
        .iter()
        .flat_map(|(name, pw, role)| {
            let key = |field: &str| format!("LIME_BROKER_USERS__{}__{field}", name.to_uppercase());
            [
                (key("PASSWORD"), pw.to_string()),
                (key("ROLE"), role.to_string()),
            ]
        })
        .collect()
}

/// mosquitto client arguments that log in as `user` (by its password in
/// [`USERS`]) on `port`, speaking MQTT `version` ("mqttv311" or "mqttv5").
fn login(port: &str, user: &str, version: &str, rest: &[&str]) -> Vec<String> {
    let pw = USERS.iter().find(|u| u.0 == user).map_or("", |u| u.1);
    ["-V", version, "-p", port, "-u", user, "-P", pw]
        .iter()
        .chain(rest)
        .map(|s| s.to_string())
        .collect()
}

fn run_pub(args: &[String]) -> std::process::Output {
    publish(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn start_sub(args: &[String]) -> Sub {
    Sub::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The SUBACK codes `mosquitto_sub` gets for `args`, and the messages it
/// prints within two seconds.
fn try_subscribe(args: &[String]) -> (Vec<u32>, Vec<String>) {
    let out = Command::new("mosquitto_sub")
        .args(args)
        .args(["-d", "-W", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let codes = stdout
        .lines()
        .find_map(|l| l.split_once("Subscribed (mid: ").map(|(_, rest)| rest))
        .and_then(|rest| rest.split_once("): "))
        .map(|(_, codes)| {
            codes
                .split(", ")
                .filter_map(|c| c.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let messages = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(str::to_owned)
        .collect();
    (codes, messages)
}

/// The retained plan, as a service reads it.
fn retained_plan(port: &str) -> Plan {
    let args = login(
        port,
        "fleet",
        "mqttv311",
        &["-t", "lime/control/plan", "-C", "1", "-W", "5"],
    );
    let out = Command::new("mosquitto_sub").args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

#[test]
fn every_login_is_held_to_its_own_topics() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(reference.path(), 2, work.path().join("anonymous"));
    spec.broker_env = broker_env();
    runtime().block_on(async {
        // Stages without a login cannot join: the ring never comes online.
        {
            let mut cluster = Cluster::start(&spec).await.unwrap();
            assert!(cluster.wait_online(Duration::from_secs(3)).await.is_err());
            let log = std::fs::read_to_string(spec.dir.join("broker.log")).unwrap();
            assert!(log.contains("connection refused"), "{log}");
        }
        spec.dir = work.path().join("run");
        // The plan is retained on its topic, for a robot to try to touch.
        spec.plan_over_mqtt = true;
        spec.login = Some(("fleet".into(), "fleet-pw".into()));
        let mut cluster = Cluster::start(&spec).await.unwrap();
        cluster.wait_online(Duration::from_secs(60)).await.unwrap();
        let port = cluster.v4_port.unwrap().to_string();
        let p = port.as_str();

        // Strangers: no login, a wrong password, a name nobody has.
        for args in [
            vec!["-p", p, "-t", "lime/request", "-m", "{}"],
            vec![
                "-p",
                p,
                "-u",
                "arm1",
                "-P",
                "guess",
                "-t",
                "lime/request",
                "-m",
                "{}",
            ],
            vec![
                "-p",
                p,
                "-u",
                "nobody",
                "-P",
                "x",
                "-t",
                "lime/request",
                "-m",
                "{}",
            ],
        ] {
            let out = publish(&args);
            assert!(!out.status.success(), "{args:?} was let in");
            let said = String::from_utf8_lossy(&out.stderr).to_lowercase();
            assert!(
                said.contains("refused") || said.contains("bad user"),
                "{said}"
            );
        }

        // A robot asks and reads its answer under its own topics.
        let arm1 = start_sub(&login(
            p,
            "arm1",
            "mqttv311",
            &["-t", "lime/response/arm1/#"],
        ));
        let arm2 = start_sub(&login(p, "arm2", "mqttv5", &["-t", "lime/response/arm2/#"]));
        let request = robot_request("r1", 12);
        let body = serde_json::to_string(&request).unwrap();
        let ask_as = |user: &str, version: &str, body: &str| {
            let out = run_pub(&login(
                p,
                user,
                version,
                &["-t", "lime/request", "-q", "1", "-m", body],
            ));
            assert!(out.status.success(), "{out:?}");
        };
        ask_as("arm1", "mqttv311", &body);
        let (_, f) = read_stream(&arm1.until_done());
        assert_identical(&reference, &request, &f, "a robot's answer");

        // Ids are each robot's own: both robots may use "same" at once.
        let long = Request {
            max_tokens: Some(200),
            ..robot_request("same", 0)
        };
        ask_as("arm1", "mqttv311", &serde_json::to_string(&long).unwrap());
        let short = robot_request("same", 3);
        ask_as("arm2", "mqttv5", &serde_json::to_string(&short).unwrap());
        let (_, f) = read_stream(&arm2.until_done());
        assert_identical(&reference, &short, &f, "another robot's id");
        let (_, f) = read_stream(&arm1.until_done());
        assert_identical(&reference, &long, &f, "the id both robots used");

        // Naming another robot's topic for the answer: refused, to the robot.
        let stolen = Request {
            reply_to: Some("lime/response/arm2/stolen".into()),
            ..robot_request("r2", 3)
        };
        ask_as("arm1", "mqttv311", &serde_json::to_string(&stolen).unwrap());
        let lines = arm1.until_done();
        let Ok(Reply::Error(e)) = Reply::parse(lines.last().unwrap().as_bytes()) else {
            panic!("not an error: {lines:?}")
        };
        assert_eq!(e.error.code, ErrorCode::ForbiddenReplyTopic, "{e:?}");
        assert_eq!(e.id.as_deref(), Some("r2"));

        // What a robot may not read: the plan, other robots' answers, all.
        let plan = retained_plan(p);
        for (version, denied) in [
            ("mqttv311", "lime/control/plan"),
            ("mqttv311", "lime/response/#"),
            ("mqttv5", "lime/response/arm2/#"),
            ("mqttv5", "#"),
            ("mqttv311", "lime/request"),
        ] {
            let (codes, messages) = try_subscribe(&login(p, "arm1", version, &["-t", denied]));
            let refused = if version == "mqttv5" { 135 } else { 128 };
            assert_eq!(codes, [refused], "{denied} over {version}");
            assert!(messages.is_empty(), "{denied}: {messages:?}");
        }

        // What a robot may not publish: over MQTT 3.1.1 the publish is
        // acknowledged and dropped (the protocol has no refusal); MQTT 5 says so.
        let out = run_pub(&login(
            p,
            "arm1",
            "mqttv311",
            &[
                "-t",
                "lime/control/plan",
                "-q",
                "1",
                "-r",
                "-m",
                "{\"epoch\":99}",
            ],
        ));
        assert!(out.status.success(), "{out:?}");
        let out = run_pub(&login(
            p,
            "arm1",
            "mqttv5",
            &["-t", "lime/status/s0", "-q", "1", "-r", "-m", "{}"],
        ));
        let said = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(said.contains("not authori"), "{out:?}");
        // Posing as another robot: its answer would go to arm2.
        let posing = serde_json::to_string(&robot_request("posing", 3)).unwrap();
        let out = run_pub(&login(
            p,
            "arm1",
            "mqttv311",
            &["-t", "lime/request/arm2", "-q", "1", "-m", &posing],
        ));
        assert!(out.status.success(), "{out:?}");
        // A last will is a publish for later: refused at CONNECT.
        let out = run_pub(&login(
            p,
            "arm1",
            "mqttv311",
            &[
                "-t",
                "lime/request",
                "-m",
                "{}",
                "--will-topic",
                "lime/control/plan",
                "--will-payload",
                "x",
                "--will-retain",
            ],
        ));
        assert!(!out.status.success(), "a robot's will was accepted");
        assert_eq!(retained_plan(p), plan, "the plan changed");

        // A monitor watches the ring and does nothing else.
        let (codes, messages) =
            try_subscribe(&login(p, "ops", "mqttv311", &["-t", "lime/status/+"]));
        assert_eq!(codes, [0]);
        assert_eq!(messages.len(), 2, "both stages' retained status");
        let (codes, _) = try_subscribe(&login(p, "ops", "mqttv5", &["-t", "lime/response/#"]));
        assert_eq!(codes, [135]);
        let out = run_pub(&login(
            p,
            "ops",
            "mqttv5",
            &["-t", "lime/request", "-q", "1", "-m", &body],
        ));
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .to_lowercase()
                .contains("not authori"),
            "{out:?}"
        );

        // Services (the stages, and `lime` as fleet) use every topic.
        let requests = varied_requests(4);
        let answers = ask(&cluster.broker, &requests).await;
        assert_answers(&reference, &requests, &answers, "as a service");

        // Nothing refused reached anyone: no stray answers, and the starter
        // took exactly the requests that were let through.
        std::thread::sleep(Duration::from_millis(500));
        let stray: Vec<String> = arm1
            .lines
            .try_iter()
            .chain(arm2.lines.try_iter())
            .filter(|l| l.contains("{\""))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
        let log = std::fs::read_to_string(spec.dir.join("s0.log")).unwrap();
        assert_eq!(log.matches("request done").count(), 3 + 4, "{log}");
        let broker_log = std::fs::read_to_string(spec.dir.join("broker.log")).unwrap();
        assert!(
            broker_log.contains("refused by the topic rules"),
            "{broker_log}"
        );
    });
}
