//! `lime ask`: publish requests on `lime/request` and follow their streamed replies,
//! over one MQTT 5 connection with a private response topic and correlation data.

use crate::mqtt::BrokerAddr;
use lime_schemas::{topics, Final, Reply, Request};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;
use std::time::{Duration, Instant};

/// What became of one request, seen from the asking side.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    pub outcome: Result<Final, lime_schemas::ErrorReply>,
    /// When the request was published and when its first and last replies came.
    pub sent: Instant,
    pub first: Option<Instant>,
    pub last: Instant,
    /// Pieces whose `seq` was not the next expected one.
    pub gaps: u32,
}

/// Publishes `requests` at once and waits for every answer (or `timeout`).
/// `on_reply(index, reply)` sees every message as it arrives.
pub async fn ask_all(
    broker: &BrokerAddr,
    requests: &[Request],
    timeout: Duration,
    on_reply: impl FnMut(usize, &Reply),
) -> anyhow::Result<Vec<Answer>> {
    let payloads = requests
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<Vec<_>, _>>()?;
    ask_raw(broker, &payloads, timeout, on_reply).await
}

/// As [`ask_all`] with payloads sent as given, valid requests or not.
pub async fn ask_raw(
    broker: &BrokerAddr,
    requests: &[Vec<u8>],
    timeout: Duration,
    mut on_reply: impl FnMut(usize, &Reply),
) -> anyhow::Result<Vec<Answer>> {
    let (client, mut eventloop, client_id) = broker.connect("lime-ask");
    let reply_topic = lime_schemas::topics::tool_replies(broker.username.as_deref(), &client_id);
    let deadline = tokio::time::Instant::now() + timeout;
    // Subscribe first and wait for the acknowledgement so no reply is missed.
    client.subscribe(&reply_topic, QoS::AtLeastOnce).await?;
    loop {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "no answer from the broker at {}:{}",
                    broker.host,
                    broker.port
                )
            })?
            .map_err(|e| anyhow::anyhow!("broker {}:{}: {e}", broker.host, broker.port))?;
        if let Event::Incoming(Packet::SubAck(_)) = event {
            break;
        }
    }
    let mut answers: Vec<Option<Answer>> = vec![None; requests.len()];
    let mut partial: Vec<(String, Option<Instant>, u32, u32)> =
        vec![(String::new(), None, 0, 0); requests.len()];
    let mut sent = vec![Instant::now(); requests.len()];
    for (i, r) in requests.iter().enumerate() {
        let props = PublishProperties {
            response_topic: Some(reply_topic.clone()),
            correlation_data: Some(i.to_string().into_bytes().into()),
            ..Default::default()
        };
        sent[i] = Instant::now();
        client
            .publish_with_properties(topics::REQUEST, QoS::AtLeastOnce, false, r.clone(), props)
            .await?;
    }
    let mut left = requests.len();
    while left > 0 {
        let event = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(e) => e?,
            Err(_) => anyhow::bail!(
                "{left} of {} requests unanswered after {timeout:?}",
                requests.len()
            ),
        };
        let Event::Incoming(Packet::Publish(p)) = event else {
            continue;
        };
        let index = p
            .properties
            .as_ref()
            .and_then(|pr| pr.correlation_data.as_ref())
            .and_then(|c| std::str::from_utf8(c).ok()?.parse::<usize>().ok())
            .filter(|&i| i < requests.len());
        let Some(i) = index else { continue };
        let reply = match Reply::parse(&p.payload) {
            Ok(r) => r,
            Err(e) => anyhow::bail!(
                "unreadable reply: {e}: {}",
                String::from_utf8_lossy(&p.payload)
            ),
        };
        on_reply(i, &reply);
        let now = Instant::now();
        let (text, first, next_seq, gaps) = &mut partial[i];
        match reply {
            Reply::Text(piece) => {
                first.get_or_insert(now);
                if piece.seq != *next_seq {
                    *gaps += 1;
                }
                *next_seq = piece.seq + 1;
                text.push_str(&piece.text);
            }
            Reply::Final(f) => {
                if answers[i].is_none() {
                    left -= 1;
                }
                answers[i] = Some(Answer {
                    text: std::mem::take(text),
                    outcome: Ok(f),
                    sent: sent[i],
                    first: *first,
                    last: now,
                    gaps: *gaps,
                });
            }
            Reply::Queued(q) => {
                tracing::debug!(id = %q.id, position = q.position, waiting_for = %q.waiting_for, "request waits");
            }
            Reply::Error(e) => {
                if answers[i].is_none() {
                    left -= 1;
                }
                answers[i] = Some(Answer {
                    text: std::mem::take(text),
                    outcome: Err(e),
                    sent: sent[i],
                    first: *first,
                    last: now,
                    gaps: *gaps,
                });
            }
        }
    }
    let _ = client.disconnect().await;
    Ok(answers.into_iter().flatten().collect())
}

/// Streams one request's answer to stdout; fails on an error reply.
pub async fn ask_one(
    broker: &BrokerAddr,
    request: Request,
    timeout: Duration,
) -> anyhow::Result<Final> {
    use std::io::Write;
    let answers = ask_all(
        broker,
        std::slice::from_ref(&request),
        timeout,
        |_, reply| {
            if let Reply::Text(piece) = reply {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(piece.text.as_bytes());
                let _ = out.flush();
            }
        },
    )
    .await?;
    println!();
    let answer = answers
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no answer"))?;
    match answer.outcome {
        Ok(f) => Ok(f),
        Err(e) => anyhow::bail!("{:?}: {}", e.error.code, e.error.message),
    }
}

/// One line about a finished request, for stderr.
pub fn summary(f: &Final) -> String {
    format!(
        "{} prompt tokens, {} generated ({:?}); first token {:.0} ms, {:.1} ms/token, {:.1} tokens/s",
        f.usage.prompt_tokens,
        f.usage.completion_tokens,
        f.finish_reason,
        f.timing.ttft_ms,
        f.timing.tpot_ms,
        f.timing.tokens_per_s
    )
}
