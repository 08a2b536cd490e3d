//! No acknowledged request vanishes: robots burst maximum-size requests mixed
//! with small ones at the starter, as fast as MQTT carries them, and every id
//! gets an answer or a refusal with a reason. Before the starter read requests
//! off its MQTT loop without waiting on tokenization, rumqttd's log for the
//! request topic overran under such a burst and dropped requests unheard.

mod common;

use common::{runtime, up, Reference};
use lime_client::mqtt::BrokerAddr;
use lime_schemas::{ErrorCode, Reply, Request};
use lime_testbench::cluster::ClusterSpec;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

const ROBOTS: [(&str, &str); 3] = [("arm1", "pw-1"), ("arm2", "pw-2"), ("arm3", "pw-3")];
const EACH: usize = 24;

/// What one robot heard for each of its ids.
#[derive(Debug, Default, Clone)]
struct Heard {
    done: bool,
    error: Option<ErrorCode>,
    /// Messages after the outcome (a piece or a second outcome).
    after: u32,
}

/// Publishes `EACH` requests as `user`, every other one just under the
/// starter's size limit, and reads until every id has its outcome.
async fn robot(broker: BrokerAddr, user: &str, limit: usize) -> BTreeMap<String, Heard> {
    let broker = BrokerAddr {
        username: Some(user.into()),
        password: ROBOTS.iter().find(|r| r.0 == user).map(|r| r.1.into()),
        ..broker
    };
    let (client, mut events, _) = broker.connect(user);
    let mine = lime_schemas::topics::user_responses(user);
    client
        .subscribe(format!("{mine}#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .subscribe(lime_schemas::topics::user_errors(user), QoS::AtLeastOnce)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut subscribed = 0;
    while subscribed < 2 {
        if let Event::Incoming(Packet::SubAck(_)) = poll(&mut events, deadline).await {
            subscribed += 1;
        }
    }
    let mut heard: BTreeMap<String, Heard> = BTreeMap::new();
    for i in 0..EACH {
        let id = format!("{user}-{i}");
        let request = Request {
            id: Some(id.clone()),
            prompt: Some(if i % 2 == 0 {
                // Words the tokenizer must work through, filling the limit.
                let word = "obstacle ";
                word.repeat((limit - 200) / word.len())
            } else {
                format!("Robot {user}, report {i}.")
            }),
            max_tokens: Some(4),
            ..Default::default()
        };
        let payload = serde_json::to_vec(&request).unwrap();
        assert!(payload.len() < limit);
        heard.insert(id, Heard::default());
        client
            .publish(
                lime_schemas::topics::REQUEST,
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < EACH || heard.values().any(|h| !h.done && h.error.is_none()) {
        match poll(&mut events, deadline).await {
            Event::Incoming(Packet::PubAck(_)) => acked += 1,
            Event::Incoming(Packet::Publish(p)) => {
                let (id, outcome) = match Reply::parse(&p.payload) {
                    Ok(Reply::Final(f)) => (Some(f.id), Some(None)),
                    Ok(Reply::Error(e)) => (e.id, Some(Some(e.error.code))),
                    Ok(Reply::Text(t)) => (Some(t.id), None),
                    Ok(Reply::Queued(_)) => continue,
                    Err(e) => panic!("{user} got an unreadable reply: {e}"),
                };
                let id = id.unwrap_or_else(|| panic!("{user}: an error without an id"));
                let h = heard
                    .get_mut(&id)
                    .unwrap_or_else(|| panic!("{user}: a reply for {id}"));
                if h.done || h.error.is_some() {
                    h.after += 1;
                }
                match outcome {
                    Some(None) => h.done = true,
                    Some(Some(code)) => h.error = Some(code),
                    None => {}
                }
            }
            _ => {}
        }
    }
    heard
}

async fn poll(events: &mut rumqttc::v5::EventLoop, deadline: Instant) -> Event {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(left, events.poll())
        .await
        .expect("every request's outcome within 240 s")
        .expect("the MQTT connection stays up")
}

#[test]
fn a_burst_of_maximum_size_requests_from_several_robots_loses_none() {
    let reference = Reference::tiny();
    let work = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(reference.path(), 2, work.path());
    spec.broker_env = ROBOTS
        .iter()
        .flat_map(|(name, pw)| {
            let key = |field: &str| format!("LIME_BROKER_USERS__{}__{field}", name.to_uppercase());
            [
                (key("PASSWORD"), pw.to_string()),
                (key("ROLE"), "robot".to_string()),
            ]
        })
        .chain([
            (
                "LIME_BROKER_USERS__FLEET__PASSWORD".to_string(),
                "fleet-pw".to_string(),
            ),
            (
                "LIME_BROKER_USERS__FLEET__ROLE".to_string(),
                "service".to_string(),
            ),
        ])
        .collect();
    spec.login = Some(("fleet".into(), "fleet-pw".into()));
    let limit = lime_stage::config::StarterConfig::default().max_request_bytes;
    runtime().block_on(async {
        let mut cluster = up(&spec).await;
        let started = Instant::now();
        let robots: Vec<_> = ROBOTS
            .iter()
            .map(|(user, _)| {
                let broker = cluster.broker.clone();
                tokio::spawn(async move { robot(broker, user, limit).await })
            })
            .collect();
        let mut outcomes: HashMap<String, u32> = HashMap::new();
        for (r, (user, _)) in robots.into_iter().zip(ROBOTS) {
            let heard = r.await.unwrap();
            assert_eq!(heard.len(), EACH, "{user}");
            for (id, h) in &heard {
                assert!(h.done || h.error.is_some(), "{id} got no outcome");
                assert_eq!(h.after, 0, "{id} was answered twice: {h:?}");
                let what = match h.error {
                    None => "answered".to_string(),
                    Some(code) => format!("{code:?}"),
                };
                *outcomes.entry(what).or_default() += 1;
                // Small requests fit the model: each is answered, unless the
                // starter had no room to read it and said so.
                let index: usize = id.rsplit('-').next().unwrap().parse().unwrap();
                if index % 2 == 1 {
                    assert!(
                        h.done || h.error == Some(ErrorCode::Overloaded),
                        "{id}: {h:?}"
                    );
                }
            }
        }
        eprintln!(
            "{} requests from {} robots in {:.1} s: {outcomes:?}",
            EACH * ROBOTS.len(),
            ROBOTS.len(),
            started.elapsed().as_secs_f64()
        );
        assert!(outcomes.get("answered").copied().unwrap_or(0) > 0);
        cluster.check_alive().unwrap();
        let log = std::fs::read_to_string(work.path().join("broker.log")).unwrap();
        assert!(
            !log.contains("jumping to head"),
            "rumqttd skipped part of a log"
        );
    });
}
