//! The soak: robots keep a cluster busy for a bounded time with bursts of
//! requests (a few of them malformed), and some hang up abruptly mid-answer.
//! Every request whose robot stayed gets exactly one outcome, an answer or a
//! refusal with a reason; no piece is missing or repeated; and the processes'
//! memory stays flat once warm. `lime bench soak` and `field-tests/bench/tests/soak.rs` run it.

use crate::cluster::Cluster;
use lime_client::mqtt::BrokerAddr;
use lime_schemas::{topics, Reply, Request, Telemetry};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How hard and how long.
#[derive(Debug, Clone)]
pub struct SoakSpec {
    pub duration: Duration,
    /// Robots asking at once, each on its own MQTT connection.
    pub robots: usize,
    /// Requests a robot publishes at once.
    pub burst: usize,
    /// One burst in this many is abandoned: the robot drops its connection
    /// after the first reply, without an MQTT DISCONNECT.
    pub hang_up_every: usize,
    /// One request in this many is malformed and must be refused.
    pub malformed_every: usize,
    pub max_tokens: u32,
    /// When memory counts as warm: the broker's per-subscription logs fill to
    /// their bound (`log_segments`, `log_segment_bytes`) in the first minute
    /// or so of this load.
    pub warm_after: Duration,
}

impl SoakSpec {
    pub fn new(duration: Duration) -> Self {
        Self {
            warm_after: (duration / 4).max(Duration::from_secs(60)).min(duration),
            duration,
            robots: 4,
            burst: 4,
            hang_up_every: 5,
            malformed_every: 7,
            max_tokens: 24,
        }
    }
}

/// What the robots saw.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    pub bursts: u64,
    pub sent: u64,
    pub answered: u64,
    pub refused: u64,
    /// Requests of bursts whose robot hung up, or whose connection the broker
    /// closed (not checked).
    pub abandoned: u64,
    /// Connections the broker closed under a robot (one reconnecting under
    /// its name can race the broker's cleanup of its previous connection).
    pub dropped: u64,
    /// Requests of kept bursts with no outcome in time.
    pub lost: Vec<String>,
    /// Outcomes beyond the first for one request.
    pub duplicated: Vec<String>,
    /// Pieces out of order or missing.
    pub gaps: u64,
    /// Refusals of well-formed requests, or answers to malformed ones.
    pub wrong: Vec<String>,
    /// RSS per process (MiB) once warm and at the end.
    pub rss_mib: Vec<(String, f64, f64)>,
    /// Bursts (each a robot connection) begun after memory counted as warm.
    pub bursts_since_warm: u64,
}

impl SoakReport {
    /// Whether the contract held: nothing lost, duplicated, out of order or
    /// wrongly answered.
    pub fn held(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.gaps == 0
            && self.wrong.is_empty()
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "{} bursts, {} requests: {} answered, {} refused with a reason, {} abandoned by robots that hung up\n\
             connections the broker closed under a robot {}\n\
             lost {}, duplicated {}, pieces out of order {}, wrongly handled {}\n",
            self.bursts,
            self.sent,
            self.answered,
            self.refused,
            self.abandoned,
            self.dropped,
            self.lost.len(),
            self.duplicated.len(),
            self.gaps,
            self.wrong.len()
        );
        out.push_str("RSS once warm -> at the end:\n");
        for (name, warm, end) in &self.rss_mib {
            out.push_str(&format!(
                "  {name:<8} {warm:8.1} MiB -> {end:8.1} MiB ({:+.1}%)\n",
                (end / warm - 1.0) * 100.0
            ));
        }
        out
    }
}

/// One burst's fate.
#[derive(Default)]
struct Burst {
    dropped: bool,
    answered: u64,
    refused: u64,
    abandoned: u64,
    lost: Vec<String>,
    duplicated: Vec<String>,
    gaps: u64,
    wrong: Vec<String>,
}

/// A burst whose connection failed under it: its requests are abandoned.
async fn burst_or_drop(
    broker: &BrokerAddr,
    robot: usize,
    n: u64,
    spec: &SoakSpec,
    hang_up: bool,
) -> Burst {
    match burst(broker, robot, n, spec, hang_up).await {
        Ok(b) => b,
        Err(_) => Burst {
            dropped: true,
            abandoned: spec.burst as u64,
            ..Burst::default()
        },
    }
}

/// Publishes a burst and follows it; `hang_up` drops the connection after the
/// first reply.
async fn burst(
    broker: &BrokerAddr,
    robot: usize,
    n: u64,
    spec: &SoakSpec,
    hang_up: bool,
) -> anyhow::Result<Burst> {
    // A robot reconnects under its own name and reply topic: rumqttd 0.20
    // keeps every subscription filter it has ever seen (about 29 KiB each, see
    // the README), so a fresh topic per connection would grow the broker.
    let client_id = format!("lime-soak-robot-{robot}-{}", std::process::id());
    let (client, mut events) = broker.connect_as(&client_id);
    let reply_topic = lime_schemas::topics::tool_replies(broker.username.as_deref(), &client_id);
    client.subscribe(&reply_topic, QoS::AtLeastOnce).await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await? {
            break;
        }
    }
    let mut malformed = Vec::new();
    let mut ids = Vec::new();
    for k in 0..spec.burst as u64 {
        let id = format!("soak-{robot}-{n}-{k}");
        let bad = (n * spec.burst as u64 + k).is_multiple_of(spec.malformed_every.max(1) as u64);
        let payload = if bad {
            format!("{{\"id\":\"{id}\",\"prompt\":\"hi\",\"max_tokens\":\"many\"}}").into_bytes()
        } else {
            serde_json::to_vec(&Request {
                id: Some(id.clone()),
                prompt: Some(format!("robot {robot} asks {n}.{k}: where is the dock?")),
                max_tokens: Some(spec.max_tokens),
                ignore_eos: true,
                ..Default::default()
            })?
        };
        let props = PublishProperties {
            response_topic: Some(reply_topic.clone()),
            correlation_data: Some(id.clone().into_bytes().into()),
            ..Default::default()
        };
        client
            .publish_with_properties(topics::REQUEST, QoS::AtLeastOnce, false, payload, props)
            .await?;
        malformed.push(bad);
        ids.push(id);
    }
    // Per request: next piece expected, outcomes seen.
    let mut seen: HashMap<String, (u32, u32)> = HashMap::new();
    let mut out = Burst::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut done = 0;
    while done < ids.len() {
        let Ok(event) = tokio::time::timeout_at(deadline, events.poll()).await else {
            break;
        };
        let Event::Incoming(Packet::Publish(p)) = event? else {
            continue;
        };
        if hang_up {
            // Gone without a word: the rest streams to nobody.
            out.abandoned = ids.len() as u64;
            return Ok(out);
        }
        let id = p
            .properties
            .as_ref()
            .and_then(|pr| pr.correlation_data.as_ref())
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .unwrap_or_default();
        let Some(i) = ids.iter().position(|x| *x == id) else {
            continue;
        };
        let (next, outcomes) = seen.entry(id.clone()).or_default();
        match Reply::parse(&p.payload) {
            Ok(Reply::Text(piece)) => {
                if piece.seq != *next {
                    out.gaps += 1;
                }
                *next = piece.seq + 1;
            }
            Ok(outcome @ (Reply::Final(_) | Reply::Error(_))) => {
                *outcomes += 1;
                if *outcomes > 1 {
                    out.duplicated.push(id.clone());
                    continue;
                }
                done += 1;
                let refused = matches!(outcome, Reply::Error(_));
                if refused != malformed[i] {
                    out.wrong
                        .push(format!("{id}: {}", String::from_utf8_lossy(&p.payload)));
                }
                if refused {
                    out.refused += 1;
                } else {
                    out.answered += 1;
                }
            }
            Ok(Reply::Queued(_)) => {}
            Err(e) => out.wrong.push(format!("{id}: unreadable reply: {e}")),
        }
    }
    for id in &ids {
        if seen.get(id).is_none_or(|(_, o)| *o == 0) {
            out.lost.push(id.clone());
        }
    }
    // A late second outcome would still be a duplicate: listen a moment more.
    let grace = tokio::time::Instant::now() + Duration::from_millis(200);
    while let Ok(Ok(event)) = tokio::time::timeout_at(grace, events.poll()).await {
        if let Event::Incoming(Packet::Publish(p)) = event {
            if matches!(
                Reply::parse(&p.payload),
                Ok(Reply::Final(_)) | Ok(Reply::Error(_))
            ) {
                out.duplicated.push(format!(
                    "{:?}",
                    p.properties.and_then(|pr| pr.correlation_data)
                ));
            }
        }
    }
    let _ = client.disconnect().await;
    Ok(out)
}

/// Every process's RSS in MiB: stages from their telemetry, the broker from
/// /proc.
async fn rss(cluster: &Cluster) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    if let Some(pid) = cluster.pid("broker") {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if let Some(kib) = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
        {
            out.push(("broker".into(), kib / 1024.0));
        }
    }
    let telemetry = lime_client::status::retained::<Telemetry>(
        &cluster.broker,
        "lime/telemetry/+",
        Duration::from_millis(500),
    )
    .await
    .unwrap_or_default();
    let mut stages: Vec<_> = telemetry.into_values().collect();
    stages.sort_by(|a, b| a.stage.cmp(&b.stage));
    for t in stages {
        if let Some(b) = t.memory.rss_bytes {
            out.push((t.stage.clone(), b as f64 / (1 << 20) as f64));
        }
    }
    out
}

/// Runs the soak against a serving cluster.
pub async fn run(
    cluster: &Cluster,
    spec: &SoakSpec,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<SoakReport> {
    let started = Instant::now();
    let warm_at = spec.warm_after;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Burst>();
    for robot in 0..spec.robots {
        let (broker, spec, tx) = (cluster.broker.clone(), spec.clone(), tx.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < spec.duration {
                let hang_up = (n as usize + robot).is_multiple_of(spec.hang_up_every.max(1));
                let result = burst_or_drop(&broker, robot, n, &spec, hang_up).await;
                if tx.send(result).is_err() {
                    return;
                }
                n += 1;
            }
        });
    }
    drop(tx);
    let mut report = SoakReport::default();
    let mut warm: Option<Vec<(String, f64)>> = None;
    let mut last_progress = Instant::now();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await;
        if warm.is_none() && started.elapsed() >= warm_at {
            warm = Some(rss(cluster).await);
        }
        match next {
            Ok(Some(b)) => {
                report.bursts += 1;
                report.bursts_since_warm += u64::from(warm.is_some());
                report.dropped += u64::from(b.dropped);
                report.sent += spec.burst as u64;
                report.answered += b.answered;
                report.refused += b.refused;
                report.abandoned += b.abandoned;
                report.gaps += b.gaps;
                report.lost.extend(b.lost);
                report.duplicated.extend(b.duplicated);
                report.wrong.extend(b.wrong);
            }
            Ok(None) => break,
            Err(_) => {}
        }
        if last_progress.elapsed() > Duration::from_secs(10) {
            last_progress = Instant::now();
            let now = rss(cluster).await;
            let rss_now: Vec<String> = now.iter().map(|(n, m)| format!("{n} {m:.1}")).collect();
            progress(&format!(
                "{:.0} s: {} bursts, {} answered, {} refused, {} abandoned, {} lost; RSS MiB: {}",
                started.elapsed().as_secs_f64(),
                report.bursts,
                report.answered,
                report.refused,
                report.abandoned,
                report.lost.len(),
                rss_now.join(", ")
            ));
        }
    }
    // Let the abandoned answers finish streaming to nobody before the last look.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = rss(cluster).await;
    let warm = warm.unwrap_or_default();
    report.rss_mib = end
        .into_iter()
        .filter_map(|(name, e)| {
            let w = warm.iter().find(|(n, _)| *n == name)?.1;
            Some((name, w, e))
        })
        .collect();
    Ok(report)
}
