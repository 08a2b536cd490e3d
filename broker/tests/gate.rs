//! The gate against clients that misbehave or are displaced: a real lime-broker
//! (run in this process, on free loopback ports) and real MQTT clients, rumqttc's
//! and raw TCP.

use lime_broker::acl::Role;
use lime_broker::config::{BrokerConfig, User};
use rumqttc::mqttbytes::v4;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A broker with a service login (`svc`) and a robot (`arm`); it runs until the
/// test process ends. Returns its plain port.
fn broker() -> u16 {
    let port = free_port();
    let cfg = BrokerConfig {
        v4_listen: Some(format!("127.0.0.1:{port}")),
        v5_listen: Some(String::new()),
        users: Some(HashMap::from([
            (
                "svc".to_owned(),
                User {
                    password: "svc-pw".into(),
                    role: Role::Service,
                },
            ),
            (
                "arm".to_owned(),
                User {
                    password: "arm-pw".into(),
                    role: Role::Robot,
                },
            ),
        ])),
        ..BrokerConfig::default()
    };
    std::thread::spawn(move || lime_broker::run(&cfg));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the broker never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    port
}

fn client(port: u16, id: &str, user: &str) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_credentials(user, format!("{user}-pw"));
    o.set_keep_alive(Duration::from_secs(30));
    AsyncClient::new(o, 16)
}

/// Polls until `want` matches an incoming packet; panics on an error or after 10 s.
async fn expect(events: &mut EventLoop, what: &str, want: impl Fn(&Packet) -> bool) {
    let wait = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(p)) if want(&p) => return,
                Ok(_) => {}
                Err(e) => panic!("waiting for {what}: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("no {what} in 10 s"));
}

/// Whether the gate closes a raw connection within 5 s of it sending `bytes`.
async fn closed_after(port: u16, bytes: &[u8]) -> bool {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = vec![0u8; 64];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or(false)
}

fn connect_packet(id: &str, user: &str, level: u8) -> Vec<u8> {
    let mut c = v4::Connect::new(id);
    c.set_login(user, format!("{user}-pw"));
    let mut out = bytes::BytesMut::new();
    c.write(&mut out).unwrap();
    // The protocol level follows the fixed header and the name "MQTT".
    let level_at = 2 + 2 + 4;
    out[level_at] = level;
    out.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_displaced_by_its_own_id_is_closed() {
    let port = broker();
    let (_a, mut a_events) = client(port, "arm-7", "arm");
    expect(&mut a_events, "CONNACK", |p| {
        matches!(p, Packet::ConnAck(_))
    })
    .await;
    let (_b, mut b_events) = client(port, "arm-7", "arm");
    expect(&mut b_events, "CONNACK", |p| {
        matches!(p, Packet::ConnAck(_))
    })
    .await;
    let displaced = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if a_events.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(displaced.is_ok(), "the displaced client was left open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_robot_cannot_take_a_service_sessions_id() {
    let port = broker();
    let (svc, mut svc_events) = client(port, "lime-stage-s0", "svc");
    expect(&mut svc_events, "CONNACK", |p| {
        matches!(p, Packet::ConnAck(_))
    })
    .await;
    svc.subscribe("lime/request", QoS::AtLeastOnce)
        .await
        .unwrap();
    expect(&mut svc_events, "SUBACK", |p| {
        matches!(p, Packet::SubAck(_))
    })
    .await;
    for _ in 0..3 {
        let (_arm, mut arm_events) = client(port, "lime-stage-s0", "arm");
        expect(&mut arm_events, "CONNACK", |p| {
            matches!(p, Packet::ConnAck(_))
        })
        .await;
    }
    // The service session was not displaced: it still gets what it asked for.
    let (probe, mut probe_events) = client(port, "probe", "svc");
    expect(&mut probe_events, "CONNACK", |p| {
        matches!(p, Packet::ConnAck(_))
    })
    .await;
    probe
        .publish("lime/request", QoS::AtLeastOnce, false, "still here")
        .await
        .unwrap();
    tokio::spawn(async move { while probe_events.poll().await.is_ok() {} });
    expect(
        &mut svc_events,
        "the publish",
        |p| matches!(p, Packet::Publish(m) if m.payload.as_ref() == b"still here"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_packets_close_only_their_own_connection() {
    let port = broker();
    let (svc, mut svc_events) = client(port, "svc-1", "svc");
    expect(&mut svc_events, "CONNACK", |p| {
        matches!(p, Packet::ConnAck(_))
    })
    .await;
    svc.subscribe("probe", QoS::AtLeastOnce).await.unwrap();
    expect(&mut svc_events, "SUBACK", |p| {
        matches!(p, Packet::SubAck(_))
    })
    .await;

    assert!(closed_after(port, b"GET / HTTP/1.1\r\nHost: lime\r\n\r\n").await);
    assert!(closed_after(port, &connect_packet("old", "arm", 3)).await);
    // A remaining length that never ends.
    assert!(closed_after(port, &[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]).await);
    // A logged-in client declaring a 200 MiB publish: refused from its header,
    // before the body is sent or anything is allocated for it.
    let mut huge = connect_packet("arm-big", "arm", 4);
    huge.extend_from_slice(&[0x30, 0x80, 0x80, 0x80, 0x64]);
    assert!(closed_after(port, &huge).await);

    // The well-behaved client never noticed.
    svc.publish("probe", QoS::AtLeastOnce, false, "still here")
        .await
        .unwrap();
    expect(
        &mut svc_events,
        "the probe",
        |p| matches!(p, Packet::Publish(m) if &m.payload[..] == b"still here"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_qos2_publish_completes_its_handshake_and_goes_nowhere() {
    let port = broker();
    let (svc, mut svc_events) = client(port, "svc-2", "svc");
    expect(&mut svc_events, "CONNACK", |p| {
        matches!(p, Packet::ConnAck(_))
    })
    .await;
    svc.subscribe("lime/control/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    expect(&mut svc_events, "SUBACK", |p| {
        matches!(p, Packet::SubAck(_))
    })
    .await;

    let (arm, mut arm_events) = client(port, "arm-2", "arm");
    expect(&mut arm_events, "CONNACK", |p| {
        matches!(p, Packet::ConnAck(_))
    })
    .await;
    for _ in 0..3 {
        arm.publish("lime/control/plan", QoS::ExactlyOnce, true, "{}")
            .await
            .unwrap();
        expect(&mut arm_events, "PUBCOMP", |p| {
            matches!(p, Packet::PubComp(_))
        })
        .await;
    }
    // The gate answered for the broker; the robot's session is still good.
    arm.subscribe("lime/response/arm/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    expect(&mut arm_events, "SUBACK", |p| {
        matches!(p, Packet::SubAck(s) if s.return_codes == [v4::SubscribeReasonCode::Success(QoS::AtLeastOnce)])
    })
    .await;
    let got = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = svc_events.poll().await {
                return p;
            }
        }
    })
    .await;
    assert!(got.is_err(), "a refused publish was delivered: {got:?}");
}
