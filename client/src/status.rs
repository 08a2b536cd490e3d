//! `lime status`: the stages of a cluster, from their retained status documents.

use crate::mqtt::BrokerAddr;
use lime_schemas::{topics, StageStatus};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;
use std::collections::BTreeMap;
use std::time::Duration;

/// Every retained stage status, collected for `wait` after subscribing.
pub async fn collect(broker: &BrokerAddr, wait: Duration) -> anyhow::Result<Vec<StageStatus>> {
    let (client, mut eventloop, _) = broker.connect("lime-status");
    client
        .subscribe(topics::STATUS_ALL, QoS::AtLeastOnce)
        .await?;
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
                if let (Some(stage), Ok(s)) = (
                    topics::stage_of_status(&topic),
                    serde_json::from_slice::<StageStatus>(&p.payload),
                ) {
                    found.insert(stage.to_owned(), s);
                }
            }
            _ => {}
        }
    }
    let _ = client.disconnect().await;
    Ok(found.into_values().collect())
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
