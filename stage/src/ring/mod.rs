//! The data plane's TCP links: the listener that takes frames from the previous
//! stage, and the long-lived connection to the next one.
//!
//! Both ends exchange a `Hello` first (magic, protocol version, plan epoch, stage
//! name, a nonce), and with a ring key prove they hold it ([`crate::ring::auth`]); a
//! peer that sends anything else, the wrong hello or no proof is logged and
//! dropped while the ring goes on serving. After the hellos frames flow forwards,
//! and the receiver answers each large one with an `Ack` saying how long its bytes
//! took to arrive, which is how the sender measures its link ([`LinkGauge`]). When
//! the link has been quiet for a while the sender probes it.
//!
//! The listener outlives plans: which epoch and predecessor it accepts is a
//! [`Route`] the pipeline changes when the ring moves to a new plan.

pub mod auth;
pub mod connection;
pub mod link;
pub mod topology;

use crate::pipeline::Event;
use auth::{Handshake, RingKey, Side};
use connection::{read_frame, read_handshake, read_timed, write_bytes};
use lime_schemas::frame::{Frame, MAGIC, PROTOCOL_VERSION};
use lime_schemas::Hello;
use link::{LinkGauge, MIN_TIMED_BYTES};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;

/// Who this stage is, for hellos.
#[derive(Debug, Clone)]
pub struct LinkIdentity {
    /// This stage's name in the plan; the peer checks it against its own plan.
    pub me: String,
    /// The plan this stage runs: a peer under another plan is refused.
    pub epoch: u64,
    /// Longest wait for a connection to open and for the peer's hello.
    pub hello_timeout: Duration,
    /// The ring's pre-shared key, when links must authenticate.
    pub key: Option<RingKey>,
}

/// Whom the listener accepts: the plan's epoch and this stage's predecessor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// A hello under any other plan is refused.
    pub epoch: u64,
    /// Name of the only stage whose hello is taken.
    pub prev: String,
}

/// When and how the sender probes a quiet link.
#[derive(Debug, Clone, Copy)]
pub struct Probing {
    /// Probe when the newest bandwidth sample is older than this and nothing is
    /// waiting to be sent.
    pub every: Duration,
    /// Time a probe should occupy the link at the last measured bandwidth.
    pub target: Duration,
}

/// Probe sizes: at least enough to time past a first burst, at most what a
/// multi-gigabit link carries in a few milliseconds.
const PROBE_MIN_BYTES: usize = 128 << 10;
const PROBE_MAX_BYTES: usize = 8 << 20;
/// A probe not acked within this is taken as lost (the link broke or stalled).
const PROBE_ACK_PATIENCE: Duration = Duration::from_secs(10);

/// Accepts the previous stage and feeds its frames to the pipeline. A newer
/// accepted connection replaces the older one.
pub async fn listen(
    listener: TcpListener,
    me: String,
    hello_timeout: Duration,
    key: Option<RingKey>,
    route: watch::Receiver<Route>,
    events: std::sync::mpsc::Sender<Event>,
    mut stopping: crate::shutdown::Shutdown,
) {
    let generation = Arc::new(AtomicU64::new(0));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.fired() => return,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "data-plane accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (me, route, events, generation, key) = (
            me.clone(),
            route.clone(),
            events.clone(),
            generation.clone(),
            key.clone(),
        );
        tokio::spawn(async move {
            let id = LinkIdentity {
                me,
                epoch: 0,
                hello_timeout,
                key,
            };
            let served = serve_peer(stream, &id, &route, &events, &generation);
            if let Err(reason) = served.await {
                tracing::error!(%peer, %reason, "dropped data-plane peer");
            }
        });
    }
}

/// The listener's side of the handshake: the peer's hello, our hello (with our
/// proof when the ring has a key), then the peer's proof.
async fn accept_peer(
    stream: &mut TcpStream,
    id: &LinkIdentity,
    accepted: &Route,
) -> Result<Hello, String> {
    let first = tokio::time::timeout(id.hello_timeout, read_handshake(stream))
        .await
        .map_err(|_| "no hello within the timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let hello = match first {
        Some(Frame::Hello(h)) => h,
        Some(_) => return Err("first frame is not a hello".into()),
        None => return Err("closed before saying hello".into()),
    };
    check_hello(&hello, accepted.epoch, &accepted.prev)?;
    let mut reply = Hello::new(accepted.epoch, &id.me, auth::nonce());
    reply.proof = id
        .key
        .as_ref()
        .map(|k| k.proof(Side::Listener, &hello, &reply));
    let bytes = Frame::Hello(reply.clone())
        .encode()
        .map_err(|e| e.to_string())?;
    write_bytes(stream, &bytes)
        .await
        .map_err(|e| e.to_string())?;
    let Some(key) = &id.key else {
        return Ok(hello);
    };
    let answer = tokio::time::timeout(id.hello_timeout, read_handshake(stream))
        .await
        .map_err(|_| format!("{} sent no proof of the ring key in time", hello.from))?
        .map_err(|e| e.to_string())?;
    match answer {
        Some(Frame::Proof { mac })
            if auth::plausible(&hello.nonce)
                && key.verify(Side::Connector, &hello, &reply, &mac) =>
        {
            Ok(hello)
        }
        Some(Frame::Proof { .. }) => Err(format!(
            "failed authentication: a peer calling itself {} does not hold the ring key",
            hello.from
        )),
        _ => Err(format!(
            "failed authentication: a peer calling itself {} sent no proof of the ring key",
            hello.from
        )),
    }
}

async fn serve_peer(
    mut stream: TcpStream,
    id: &LinkIdentity,
    route: &watch::Receiver<Route>,
    events: &std::sync::mpsc::Sender<Event>,
    generation: &AtomicU64,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let accepted = route.borrow().clone();
    let hello = accept_peer(&mut stream, id, &accepted).await?;
    let mine = generation.fetch_add(1, Ordering::SeqCst) + 1;
    tracing::info!(from = %hello.from, epoch = hello.epoch, "previous stage connected");
    let ended = relay(&mut stream, &hello, route, events, generation, mine).await;
    // Unless the ring moved to another plan, frames may have been lost with
    // the link: the starter replays what was on the ring.
    if route.borrow().epoch == hello.epoch {
        let why = match &ended {
            Ok(()) => format!("the link from {} closed", hello.from),
            Err(e) => format!("the link from {} ended: {e}", hello.from),
        };
        let _ = events.send(Event::RingBroken {
            epoch: hello.epoch,
            why,
        });
    }
    ended
}

/// Feeds one connected predecessor's frames to the pipeline until the link
/// ends, answering large ones with acks.
async fn relay(
    stream: &mut TcpStream,
    hello: &Hello,
    route: &watch::Receiver<Route>,
    events: &std::sync::mpsc::Sender<Event>,
    generation: &AtomicU64,
    mine: u64,
) -> Result<(), String> {
    loop {
        let read = read_timed(stream).await.map_err(|e| e.to_string())?;
        if generation.load(Ordering::SeqCst) != mine {
            return Err("replaced by a newer connection from the same stage".into());
        }
        if route.borrow().epoch != hello.epoch {
            tracing::info!(from = %hello.from, epoch = hello.epoch, "closing a link of the previous plan");
            return Ok(());
        }
        let Some((frame, arrival)) = read else {
            tracing::info!(from = %hello.from, "previous stage disconnected");
            return Ok(());
        };
        let nonce = match &frame {
            Frame::Probe { nonce, .. } => Some(*nonce),
            Frame::Activations(_) if arrival.bytes >= MIN_TIMED_BYTES => Some(0),
            _ => None,
        };
        if let Some(nonce) = nonce {
            let ack = Frame::Ack {
                nonce,
                bytes: arrival.bytes as u64,
                receive_us: arrival.took.as_micros() as u64,
            };
            let bytes = ack.encode().map_err(|e| e.to_string())?;
            write_bytes(stream, &bytes)
                .await
                .map_err(|e| e.to_string())?;
        }
        match frame {
            Frame::Hello(_) => return Err("a second hello".into()),
            Frame::Proof { .. } => return Err("a proof after the handshake".into()),
            Frame::Probe { .. } | Frame::Ack { .. } => {}
            f => {
                if events.send(Event::Frame(f)).is_err() {
                    return Ok(());
                }
            }
        }
    }
}

fn check_hello(h: &Hello, epoch: u64, from: &str) -> Result<(), String> {
    if h.magic != MAGIC {
        return Err("hello has the wrong magic".into());
    }
    if h.version != PROTOCOL_VERSION {
        return Err(format!(
            "peer speaks protocol {}, this stage {PROTOCOL_VERSION}",
            h.version
        ));
    }
    if h.epoch != epoch {
        return Err(format!(
            "peer runs plan epoch {}, this stage {epoch}",
            h.epoch
        ));
    }
    if h.from != from {
        return Err(format!(
            "peer is stage {:?}, the plan says the previous stage is {from:?}",
            h.from
        ));
    }
    Ok(())
}

/// The stage a link goes to.
#[derive(Debug, Clone)]
pub struct NextStage {
    /// As in the plan: its hello must say it, and breaks are reported under it.
    pub name: String,
    /// `host:port` of its data-plane listener.
    pub addr: String,
}

/// Probes sent and not yet acknowledged: when each left.
type Outstanding = Arc<Mutex<HashMap<u64, Instant>>>;

/// Keeps one connection to the next stage and writes the frames the pipeline
/// hands it, reconnecting with exponential backoff, until the pipeline drops
/// its sender (a new plan) and every frame is written, or the link is found
/// broken after that. A frame whose write failed is sent again on the new
/// connection; one written into a socket the peer had just lost is gone. Every
/// break is reported to `breaks`.
pub async fn connect(
    next: NextStage,
    id: LinkIdentity,
    backoff: (Duration, Duration),
    probing: Probing,
    gauge: LinkGauge,
    mut frames: UnboundedReceiver<Frame>,
    breaks: std::sync::mpsc::Sender<Event>,
) {
    let NextStage { name: to, addr } = next;
    let broke = |why: String| {
        let _ = breaks.send(Event::RingBroken {
            epoch: id.epoch,
            why: format!("the link to {to} {why}"),
        });
    };
    gauge.reset(&to);
    let mut unsent: Option<Vec<u8>> = None;
    let mut wait = backoff.0;
    let mut nonce = 0u64;
    let mut probe_bytes = PROBE_MIN_BYTES;
    let outstanding = Outstanding::default();
    loop {
        let (reader, mut writer) = match handshake(&addr, &to, &id).await {
            Ok((s, rtt)) => {
                tracing::info!(%to, %addr, rtt_us = rtt.as_micros() as u64, "connected to the next stage");
                gauge.round_trip(rtt);
                wait = backoff.0;
                s.into_split()
            }
            Err((reason, reached)) => {
                // The plan moved on and this link is no longer in it: what it
                // still holds was for a ring that is gone. Give it up rather
                // than knock on a stage that has moved on, for ever.
                if frames.is_closed() {
                    tracing::info!(%to, %addr, %reason, "giving up the link of a superseded plan");
                    return;
                }
                tracing::debug!(%to, %addr, %reason, "next stage not ready; retrying");
                tokio::time::sleep(wait).await;
                // A stage that answers but refuses is moving to our plan: retry
                // soon rather than backing off.
                wait = if reached {
                    backoff.0
                } else {
                    (wait * 2).min(backoff.1)
                };
                continue;
            }
        };
        let (closed_tx, mut closed) = tokio::sync::oneshot::channel::<String>();
        let acks = tokio::spawn(read_acks(
            reader,
            gauge.clone(),
            outstanding.clone(),
            closed_tx,
        ));
        let mut last_probe: Option<Instant> = None;
        loop {
            // A stale measurement is refreshed first, busy link or not: the
            // link may have changed under traffic too small to time.
            // A frame that outpaced the estimate asks for a probe sooner.
            let stale = gauge.age().is_none_or(|a| a >= probing.every);
            let since = last_probe.map(|p| p.elapsed());
            let due = (stale && since.is_none_or(|e| e >= probing.every))
                || (gauge.outpaced() && since.is_none_or(|e| e >= probing.every / 4));
            // One probe at a time: on a link that just got much slower, probes
            // sized for the old speed would otherwise queue up behind each other
            // and starve the activations.
            let probing_now = outstanding
                .lock()
                .is_ok_and(|o| o.values().any(|at| at.elapsed() < PROBE_ACK_PATIENCE));
            if unsent.is_none() && due && !probing_now {
                last_probe = Some(Instant::now());
                nonce += 1;
                if let Err(e) = probe(
                    &mut writer,
                    nonce,
                    &gauge,
                    &outstanding,
                    probing,
                    &mut probe_bytes,
                )
                .await
                {
                    tracing::warn!(%to, error = %e, "probing the next stage failed; reconnecting");
                    broke(format!("failed: {e}"));
                    break;
                }
            }
            let bytes = match unsent.take() {
                Some(b) => b,
                None => {
                    tokio::select! {
                        f = frames.recv() => match f {
                            Some(f) => match f.encode() {
                                Ok(b) => b,
                                Err(e) => {
                                    tracing::error!(error = %e, "frame not sent");
                                    continue;
                                }
                            },
                            None => {
                                acks.abort();
                                return;
                            }
                        },
                        reason = &mut closed => {
                            let reason = reason.unwrap_or_else(|_| "closed".into());
                            tracing::warn!(%to, %reason, "the link to the next stage closed; reconnecting");
                            broke(format!("closed: {reason}"));
                            break;
                        }
                        _ = tokio::time::sleep(probing.every) => continue,
                    }
                }
            };
            if let Err(e) = write_bytes(&mut writer, &bytes).await {
                if frames.is_closed() {
                    tracing::info!(%to, error = %e, "the link of a superseded plan broke; giving it up");
                    acks.abort();
                    return;
                }
                tracing::warn!(%to, error = %e, "link to the next stage broke; reconnecting");
                broke(format!("broke: {e}"));
                unsent = Some(bytes);
                break;
            }
        }
        acks.abort();
    }
}

/// A round-trip probe (empty) and a bandwidth probe sized to take about
/// `probing.target` at the last measured bandwidth.
async fn probe(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    nonce: u64,
    gauge: &LinkGauge,
    outstanding: &Outstanding,
    probing: Probing,
    last: &mut usize,
) -> std::io::Result<()> {
    let sized = gauge
        .mbit_per_s()
        .map(|m| (m * 1e6 / 8.0 * probing.target.as_secs_f64()) as usize)
        .unwrap_or(PROBE_MIN_BYTES);
    // After a transfer too quick to time, the link is faster than thought.
    let bytes = if gauge.too_quick() {
        sized.max(*last * 4)
    } else {
        sized
    }
    .clamp(PROBE_MIN_BYTES, PROBE_MAX_BYTES);
    *last = bytes;
    for (n, padding) in [(nonce << 1, Vec::new()), ((nonce << 1) | 1, vec![0; bytes])] {
        let frame = Frame::Probe { nonce: n, padding }
            .encode()
            .map_err(std::io::Error::other)?;
        if let Ok(mut o) = outstanding.lock() {
            o.retain(|_, at| at.elapsed() < PROBE_ACK_PATIENCE);
            o.insert(n, Instant::now());
        }
        write_bytes(writer, &frame).await?;
    }
    Ok(())
}

/// Reads the next stage's acks until the connection ends, feeding the gauge;
/// says why it ended.
async fn read_acks(
    mut reader: OwnedReadHalf,
    gauge: LinkGauge,
    outstanding: Outstanding,
    closed: tokio::sync::oneshot::Sender<String>,
) {
    let reason = loop {
        match read_frame(&mut reader).await {
            Ok(Some(Frame::Ack {
                nonce,
                bytes,
                receive_us,
            })) => {
                let took = Duration::from_micros(receive_us);
                gauge.transfer(bytes, took);
                let sent = outstanding.lock().ok().and_then(|mut o| o.remove(&nonce));
                // Even nonces are the empty round-trip probes.
                if let (Some(sent), true) = (sent, nonce > 0 && nonce % 2 == 0) {
                    gauge.round_trip(sent.elapsed());
                }
            }
            Ok(Some(_)) => break "the next stage sent something other than an ack".to_string(),
            Ok(None) => break "closed by the next stage".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    let _ = closed.send(reason);
}

/// Connects and exchanges hellos; returns the stream and the hello's round trip,
/// or why not and whether the stage was reached at all.
async fn handshake(
    addr: &str,
    to: &str,
    id: &LinkIdentity,
) -> Result<(TcpStream, Duration), (String, bool)> {
    let mut stream = tokio::time::timeout(id.hello_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ("connect timed out".to_string(), false))?
        .map_err(|e| (e.to_string(), false))?;
    let refused = |e: String| (e, true);
    let _ = stream.set_nodelay(true);
    let hello = Hello::new(id.epoch, &id.me, auth::nonce());
    let bytes = Frame::Hello(hello.clone())
        .encode()
        .map_err(|e| refused(e.to_string()))?;
    let sent = Instant::now();
    write_bytes(&mut stream, &bytes)
        .await
        .map_err(|e| refused(e.to_string()))?;
    let reply = tokio::time::timeout(id.hello_timeout, read_handshake(&mut stream))
        .await
        .map_err(|_| refused("no hello back".to_string()))?
        .map_err(|e| refused(e.to_string()))?;
    let Some(Frame::Hello(reply)) = reply else {
        return Err(refused("the next stage refused the hello".into()));
    };
    let round_trip = sent.elapsed();
    check_hello(&reply, id.epoch, to).map_err(refused)?;
    match (&id.key, &reply.proof) {
        (None, None) => {}
        (None, Some(_)) => {
            return Err(refused(
                "the next stage requires the ring key (data.key_file); this stage has none".into(),
            ))
        }
        (Some(_), None) => {
            return Err(refused(
                "the next stage does not authenticate (no data.key_file there); not sending it activations"
                    .into(),
            ))
        }
        (Some(key), Some(proof)) => {
            if !auth::plausible(&reply.nonce) || !key.verify(Side::Listener, &hello, &reply, proof) {
                return Err(refused(
                    "failed authentication: the next stage does not hold the ring key".into(),
                ));
            }
            let mac = key.proof(Side::Connector, &hello, &reply);
            let bytes = Frame::Proof { mac }
                .encode()
                .map_err(|e| refused(e.to_string()))?;
            write_bytes(&mut stream, &bytes)
                .await
                .map_err(|e| refused(e.to_string()))?;
        }
    }
    Ok((stream, round_trip))
}
