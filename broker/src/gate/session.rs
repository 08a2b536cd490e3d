//! One client connection through the gate. After the CONNECT, three loops run
//! until either side closes: client → rumqttd, where a restricted login's
//! packets are checked ([`Enforcer`]); rumqttd → client; and the one writer to
//! the client, which also carries the gate's own answers to refused packets so
//! that they land between whole packets.

use super::packet::{self, read_connect, read_frame, Connect, Frame, Protocol, Publish, Subscribe};
use super::Gate;
use crate::acl::{self, Rules};
use bytes::BytesMut;
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::Instrument;

/// Relays one client connection; returns when it ends.
pub async fn run<S>(stream: S, peer: SocketAddr, gate: &Gate) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut from_client = BufReader::new(rd);
    let mut to_client = BufWriter::new(wr);
    let first = tokio::time::timeout(
        gate.connect_timeout,
        read_connect(&mut from_client, gate.max_packet),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no CONNECT in time"))??;
    let Some(first) = first else {
        return Ok(());
    };
    let mut connect = Connect::parse(first, gate.max_packet)?;
    let protocol = connect.protocol();
    let (role, user) = match gate.admit(&connect) {
        Ok(login) => login,
        Err(why) => {
            tracing::warn!(
                %peer,
                client = connect.client_id(),
                user = connect.login().map(|(u, _)| u),
                ?why,
                "connection refused"
            );
            to_client
                .write_all(&packet::connack_refused(protocol, why))
                .await?;
            return to_client.flush().await;
        }
    };
    let span = tracing::info_span!("mqtt", %peer, client = connect.client_id(), %user, ?role);
    // A robot's or monitor's session is its own: under its login's name, so
    // that no one can take a stage's id (rumqttd drops the older session of
    // an id) or another login's.
    if role != crate::acl::Role::Service && !connect.client_id().is_empty() {
        let own = crate::acl::session_id(&user, connect.client_id());
        connect.set_client_id(own);
    }
    async move {
        tracing::debug!("connected");
        let broker = TcpStream::connect(gate.internal_addr(protocol)).await?;
        broker.set_nodelay(true)?;
        let (from_broker, mut to_broker) = broker.into_split();
        let login = connect.encode_with_login(&gate.internal.username, &gate.internal.password)?;
        to_broker.write_all(&login).await?;

        let (out_tx, mut out_rx) = mpsc::channel::<Out>(32);
        let answers = out_tx.clone();
        let mut enforcer = Enforcer::new(Rules { role, user: &user }, protocol, gate.max_packet);
        let upstream = async {
            while let Some(frame) = read_frame(&mut from_client, gate.max_packet).await? {
                match enforcer.check(frame)? {
                    Verdict::Forward(bytes) => to_broker.write_all(&bytes).await?,
                    Verdict::Answer(Some(bytes)) => {
                        if answers.send(Out::Packet(bytes)).await.is_err() {
                            break;
                        }
                    }
                    Verdict::Answer(None) => {}
                }
            }
            Ok::<_, io::Error>(())
        };
        let relay = async {
            let mut from_broker = BufReader::new(from_broker);
            let read = async {
                while let Some(frame) = read_frame(&mut from_broker, gate.max_packet).await? {
                    if out_tx.send(Out::Packet(frame.bytes)).await.is_err() {
                        break;
                    }
                }
                Ok::<_, io::Error>(())
            };
            let ended = read.await;
            // Whatever rumqttd said last (a refusal, say) still reaches the client.
            let _ = out_tx.send(Out::End).await;
            ended
        };
        let write = async {
            // Packets that are already waiting go out in one flush.
            let mut next = out_rx.recv().await;
            while let Some(Out::Packet(bytes)) = next {
                to_client.write_all(&bytes).await?;
                next = match out_rx.try_recv() {
                    Ok(out) => Some(out),
                    Err(_) => {
                        to_client.flush().await?;
                        out_rx.recv().await
                    }
                };
            }
            to_client.flush().await
        };
        let downstream = async {
            let (relayed, written) = tokio::join!(relay, write);
            relayed.and(written)
        };
        let ended = tokio::select! {
            r = upstream => r,
            r = downstream => r,
        };
        tracing::debug!(refused = enforcer.refused, "disconnected");
        ended
    }
    .instrument(span)
    .await
}

/// What goes to the client.
enum Out {
    Packet(BytesMut),
    /// rumqttd closed the connection.
    End,
}

/// What becomes of one packet from the client.
enum Verdict {
    Forward(BytesMut),
    /// Not passed on; the gate answers it itself (if the protocol has an answer).
    Answer(Option<BytesMut>),
}

/// A restricted login's rules applied to one connection's packets, with what
/// that takes: topic aliases (a v5 client may name a topic once and use a
/// number after) and dropped MQTT 3.1.1 QoS 2 publishes to complete.
struct Enforcer<'a> {
    rules: Rules<'a>,
    protocol: Protocol,
    max_packet: usize,
    aliases: HashMap<u16, String>,
    dropped_qos2: HashSet<u16>,
    refused: u64,
}

impl<'a> Enforcer<'a> {
    fn new(rules: Rules<'a>, protocol: Protocol, max_packet: usize) -> Self {
        Self {
            rules,
            protocol,
            max_packet,
            aliases: HashMap::new(),
            dropped_qos2: HashSet::new(),
            refused: 0,
        }
    }

    fn check(&mut self, frame: Frame) -> io::Result<Verdict> {
        if !self.rules.restricted() {
            // Who changed the plan (or any control topic) is in the broker's
            // log: stages that refuse a plan can only say what it held.
            if let Some(topic) = frame
                .publish_topic()
                .filter(|t| t.starts_with(lime_schemas::topics::CONTROL_PREFIX))
            {
                tracing::info!(%topic, retain = frame.retains(), "control topic published");
            }
            return Ok(Verdict::Forward(frame.bytes));
        }
        match frame.kind() {
            packet::PUBLISH => self.publish(frame),
            packet::SUBSCRIBE => self.subscribe(frame),
            packet::PUBREL if self.protocol == Protocol::V4 => match frame.leading_pkid() {
                Some(pkid) if self.dropped_qos2.remove(&pkid) => {
                    Ok(Verdict::Answer(packet::pubcomp(pkid)))
                }
                _ => Ok(Verdict::Forward(frame.bytes)),
            },
            packet::CONNECT => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a second CONNECT",
            )),
            _ => Ok(Verdict::Forward(frame.bytes)),
        }
    }

    fn publish(&mut self, frame: Frame) -> io::Result<Verdict> {
        let publish = Publish::parse(frame, self.protocol, self.max_packet)?;
        let written = publish
            .topic()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a topic that is not UTF-8"))?
            .to_owned();
        let topic = match (written.is_empty(), publish.alias()) {
            (false, Some(alias)) => {
                self.remember_alias(alias, &written)?;
                written
            }
            (false, None) => written,
            (true, Some(alias)) => self.aliases.get(&alias).cloned().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "an unknown topic alias")
            })?,
            (true, None) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a PUBLISH without a topic",
                ))
            }
        };
        let retain = publish.retains();
        match self.rules.publish(&topic) {
            acl::Publish::Forward => Ok(Verdict::Forward(publish.encode_under(topic, retain)?)),
            acl::Publish::Retopic(to) => Ok(Verdict::Forward(publish.encode_under(to, false)?)),
            acl::Publish::Refuse => {
                self.note_refusal(&topic, "publish");
                let (qos, pkid) = publish.qos_and_pkid();
                if self.protocol == Protocol::V4 && qos == 2 {
                    self.dropped_qos2.insert(pkid);
                }
                let why = format!("{:?} may not publish on {topic:?}", self.rules.user);
                Ok(Verdict::Answer(packet::publish_refused(
                    self.protocol,
                    qos,
                    pkid,
                    &why,
                )))
            }
        }
    }

    /// Aliases are bounded as rumqttd bounds them (1 to 4096, what it offers in
    /// CONNACK), and so is the text they hold, so that a client cannot make
    /// the gate hoard topics.
    fn remember_alias(&mut self, alias: u16, topic: &str) -> io::Result<()> {
        const MOST_ALIASES: u16 = 4096;
        const MOST_ALIAS_BYTES: usize = 256 << 10;
        if alias == 0 || alias > MOST_ALIASES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("topic alias {alias} is outside 1..={MOST_ALIASES}"),
            ));
        }
        let held: usize = self.aliases.values().map(String::len).sum();
        let replaced = self.aliases.get(&alias).map_or(0, String::len);
        if held - replaced + topic.len() > MOST_ALIAS_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "topic aliases holding more than 256 KiB of topics",
            ));
        }
        self.aliases.insert(alias, topic.to_owned());
        Ok(())
    }

    fn subscribe(&mut self, frame: Frame) -> io::Result<Verdict> {
        let raw = frame.bytes.clone();
        let subscribe = Subscribe::parse(frame, self.protocol, self.max_packet)?;
        match subscribe
            .filters
            .iter()
            .find(|f| !self.rules.may_subscribe(f))
        {
            None => Ok(Verdict::Forward(raw)),
            // One packet is answered as one: a filter refused refuses them all.
            Some(denied) => {
                let denied = denied.clone();
                self.note_refusal(&denied, "subscription");
                let why = format!("{:?} may not read {denied:?}", self.rules.user);
                Ok(Verdict::Answer(subscribe.refused(self.protocol, &why)))
            }
        }
    }

    /// The first few refusals of a connection are logged as warnings; a client
    /// that keeps trying is not allowed to flood the journal.
    fn note_refusal(&mut self, topic: &str, what: &str) {
        self.refused += 1;
        if self.refused <= 3 {
            tracing::warn!(%topic, "{what} refused by the topic rules");
        } else {
            tracing::debug!(%topic, "{what} refused by the topic rules");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::Role;

    #[test]
    fn aliases_are_bounded_in_number_and_bytes() {
        let rules = Rules {
            role: Role::Robot,
            user: "arm",
        };
        let mut e = Enforcer::new(rules, Protocol::V5, 1 << 20);
        assert!(e.remember_alias(0, "a").is_err());
        assert!(e.remember_alias(4097, "a").is_err());
        let long = "t".repeat(60 << 10);
        for alias in 1..=4 {
            e.remember_alias(alias, &long).unwrap();
        }
        assert!(e.remember_alias(5, &long).is_err(), "over 256 KiB");
        // Replacing an alias frees what it held.
        e.remember_alias(4, "lime/request").unwrap();
        e.remember_alias(5, &long).unwrap();
    }
}
