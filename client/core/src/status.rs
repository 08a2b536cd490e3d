//! `lime status`: the stages of a cluster, from their retained status documents.

use crate::mqtt::BrokerAddr;
use lime_schemas::{topics, StageStatus, Telemetry};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;
use std::collections::BTreeMap;
use std::time::Duration;

/// Every retained stage status, collected for `wait` after subscribing.
pub async fn collect(broker: &BrokerAddr, wait: Duration) -> anyhow::Result<Vec<StageStatus>> {
    let found = retained::<StageStatus>(broker, topics::STATUS_ALL, wait).await?;
    Ok(found.into_values().collect())
}

/// Every stage's latest retained telemetry report, collected for `wait`.
pub async fn telemetry(broker: &BrokerAddr, wait: Duration) -> anyhow::Result<Vec<Telemetry>> {
    let found = retained::<Telemetry>(broker, "lime/telemetry/+", wait).await?;
    Ok(found.into_values().collect())
}

/// The documents on topics matching `filter` (retained ones and any published
/// while listening), by topic, for `wait` after subscribing.
pub async fn retained<T: serde::de::DeserializeOwned>(
    broker: &BrokerAddr,
    filter: &str,
    wait: Duration,
) -> anyhow::Result<BTreeMap<String, T>> {
    static CLIENTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = CLIENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("lime-status-{}-{n}", std::process::id());
    let (client, mut eventloop, _) = broker.connect(&id);
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    let mut found = BTreeMap::new();
    let mut subscribed = false;
    let deadline = tokio::time::Instant::now() + wait + Duration::from_secs(5);
    let mut quiet_until = None;
    loop {
        let until = quiet_until.unwrap_or(deadline).min(deadline);
        let event = match tokio::time::timeout_at(until, eventloop.poll()).await {
            Ok(e) => {
                e.map_err(|e| anyhow::anyhow!("broker {}:{}: {e}", broker.host, broker.port))?
            }
            Err(_) if subscribed => break,
            Err(_) => anyhow::bail!(
                "no answer from the broker at {}:{}",
                broker.host,
                broker.port
            ),
        };
        match event {
            Event::Incoming(Packet::SubAck(_)) => {
                subscribed = true;
                quiet_until = Some(tokio::time::Instant::now() + wait);
            }
            Event::Incoming(Packet::Publish(p)) => {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                if let Ok(doc) = serde_json::from_slice::<T>(&p.payload) {
                    found.insert(topic, doc);
                }
            }
            _ => {}
        }
    }
    let _ = client.disconnect().await;
    Ok(found)
}

/// A table of stages for the terminal.
pub fn table(stages: &[StageStatus]) -> String {
    let mut out = format!(
        "{:<12} {:<9} {:<10} {:>6} {:<16} {:>10} {:>8} {:>5}  {}\n",
        "STAGE", "STATE", "ROLE", "EPOCH", "LAYERS", "WEIGHTS", "KV", "SEQS", "DATA"
    );
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    for s in stages {
        let layers: Vec<String> = s.chunks.iter().map(ToString::to_string).collect();
        let (w, kv, n) = s
            .memory
            .as_ref()
            .map_or(("-".into(), "-".into(), "-".into()), |m| {
                (mb(m.weights_bytes), mb(m.kv_bytes), m.sequences.to_string())
            });
        out.push_str(&format!(
            "{:<12} {:<9} {:<10} {:>6} {:<16} {:>10} {:>8} {:>5}  {}\n",
            s.stage,
            format!("{:?}", s.state).to_lowercase(),
            s.role
                .map_or("-".into(), |r| format!("{r:?}").to_lowercase()),
            s.epoch.map_or("-".into(), |e| e.to_string()),
            if layers.is_empty() {
                "-".into()
            } else {
                layers.join(",")
            },
            w,
            kv,
            n,
            s.data_addr.as_deref().unwrap_or("-"),
        ));
    }
    out
}
