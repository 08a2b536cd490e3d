//! The data plane's TCP links: the listener that takes frames from the previous
//! stage, and the long-lived connection to the next one.
//!
//! Both ends exchange a `Hello` first (magic, protocol version, plan epoch, stage
//! name); a peer that sends anything else, or the wrong hello, is logged and
//! dropped while the ring goes on serving.

use crate::connection::{read_frame, write_bytes};
use crate::pipeline::Event;
use lime_schemas::frame::{Frame, MAGIC, PROTOCOL_VERSION};
use lime_schemas::{Hello, LinkMeasurement};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedReceiver;

/// Who this stage is and whom it talks to.
#[derive(Debug, Clone)]
pub struct LinkIdentity {
    pub me: String,
    pub epoch: u64,
    pub hello_timeout: Duration,
}

/// Bytes of a link probe: enough to time on links up to a few Gb/s, small enough
/// to cost ~20 ms at 100 Mb/s once per connection.
const PROBE_BYTES: usize = 256 << 10;

/// The latest measurement of the link from the previous stage.
pub type LinkGauge = Arc<std::sync::Mutex<Option<LinkMeasurement>>>;

/// Accepts the previous stage (`from`) and feeds its frames to the pipeline.
/// A newer accepted connection replaces the older one.
pub async fn listen(
    listener: TcpListener,
    id: LinkIdentity,
    from: String,
    events: std::sync::mpsc::Sender<Event>,
    gauge: LinkGauge,
) {
    let generation = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "data-plane accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (id, from, events, generation, gauge) = (
            id.clone(),
            from.clone(),
            events.clone(),
            generation.clone(),
            gauge.clone(),
        );
        tokio::spawn(async move {
            if let Err(reason) = serve_peer(stream, &id, &from, &events, &generation, &gauge).await
            {
                tracing::error!(%peer, %reason, "dropped data-plane peer");
            }
        });
    }
}

async fn serve_peer(
    mut stream: TcpStream,
    id: &LinkIdentity,
    from: &str,
    events: &std::sync::mpsc::Sender<Event>,
    generation: &AtomicU64,
    gauge: &LinkGauge,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let first = tokio::time::timeout(id.hello_timeout, read_frame(&mut stream))
        .await
        .map_err(|_| "no hello within the timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let hello = match first {
        Some(Frame::Hello(h)) => h,
        Some(_) => return Err("first frame is not a hello".into()),
        None => return Err("closed before saying hello".into()),
    };
    check_hello(&hello, id.epoch, from)?;
    let reply = Frame::Hello(Hello::new(id.epoch, &id.me))
        .encode()
        .map_err(|e| e.to_string())?;
    write_bytes(&mut stream, &reply)
        .await
        .map_err(|e| e.to_string())?;
    let replied = Instant::now();
    let mine = generation.fetch_add(1, Ordering::SeqCst) + 1;
    tracing::info!(from = %hello.from, epoch = hello.epoch, "previous stage connected");
    loop {
        let frame = read_frame(&mut stream).await.map_err(|e| e.to_string())?;
        if generation.load(Ordering::SeqCst) != mine {
            return Err("replaced by a newer connection from the same stage".into());
        }
        match frame {
            None => {
                tracing::info!(from = %hello.from, "previous stage disconnected");
                return Ok(());
            }
            Some(Frame::Hello(_)) => return Err("a second hello".into()),
            Some(Frame::Probe { rtt_us, padding }) => {
                // The probe left when our reply arrived (half a round trip after
                // we sent it) and took another half plus its bytes' transfer.
                let rtt = Duration::from_micros(rtt_us).as_secs_f64();
                let transfer = (replied.elapsed().as_secs_f64() - rtt).max(1e-6);
                let bytes = padding.len() as u64 + 16;
                let m = LinkMeasurement {
                    from: hello.from.clone(),
                    rtt_ms: rtt * 1e3,
                    mbit_per_s: bytes as f64 * 8.0 / transfer / 1e6,
                    probe_bytes: bytes,
                };
                tracing::info!(from = %m.from, rtt_ms = m.rtt_ms, mbit_per_s = m.mbit_per_s, "link from the previous stage measured");
                if let Ok(mut g) = gauge.lock() {
                    *g = Some(m);
                }
            }
            Some(f) => {
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

/// Keeps one connection to the next stage (`to` at `addr`) and writes the frames
/// the pipeline hands it, reconnecting with exponential backoff. A frame whose
/// write failed is sent again on the new connection; one written into a socket the
/// peer had just lost is gone, and the starter's stall timeout fails its requests.
pub async fn connect(
    addr: String,
    to: String,
    id: LinkIdentity,
    backoff: (Duration, Duration),
    mut frames: UnboundedReceiver<Frame>,
) {
    let mut unsent: Option<Vec<u8>> = None;
    let mut wait = backoff.0;
    let mut probe = [0u8; 1];
    loop {
        let mut stream = match handshake(&addr, &to, &id).await {
            Ok((s, rtt)) => {
                tracing::info!(%to, %addr, rtt_us = rtt.as_micros() as u64, "connected to the next stage");
                wait = backoff.0;
                // A probe first, so the next stage can measure the link.
                if unsent.is_none() {
                    let probe = Frame::Probe {
                        rtt_us: rtt.as_micros() as u64,
                        padding: vec![0; PROBE_BYTES],
                    };
                    unsent = probe.encode().ok();
                }
                s
            }
            Err(reason) => {
                tracing::debug!(%to, %addr, %reason, "next stage not reachable; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(backoff.1);
                continue;
            }
        };
        loop {
            let bytes = match unsent.take() {
                Some(b) => b,
                // Watch the connection while idle: the next stage never writes
                // after its hello, so a readable socket means it closed (or broke
                // the protocol), and reconnecting now loses no frame.
                None => tokio::select! {
                    f = frames.recv() => match f {
                        Some(f) => match f.encode() {
                            Ok(b) => b,
                            Err(e) => {
                                tracing::error!(error = %e, "frame not sent");
                                continue;
                            }
                        },
                        None => return,
                    },
                    _ = stream.read(&mut probe) => {
                        tracing::warn!(%to, "the next stage closed the link; reconnecting");
                        break;
                    }
                },
            };
            if let Err(e) = write_bytes(&mut stream, &bytes).await {
                tracing::warn!(%to, error = %e, "link to the next stage broke; reconnecting");
                unsent = Some(bytes);
                break;
            }
        }
    }
}

/// Connects and exchanges hellos; returns the stream and the hello's round trip.
async fn handshake(
    addr: &str,
    to: &str,
    id: &LinkIdentity,
) -> Result<(TcpStream, Duration), String> {
    let mut stream = tokio::time::timeout(id.hello_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let hello = Frame::Hello(Hello::new(id.epoch, &id.me))
        .encode()
        .map_err(|e| e.to_string())?;
    let sent = Instant::now();
    write_bytes(&mut stream, &hello)
        .await
        .map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(id.hello_timeout, read_frame(&mut stream))
        .await
        .map_err(|_| "no hello back".to_string())?
        .map_err(|e| e.to_string())?;
    match reply {
        Some(Frame::Hello(h)) => {
            check_hello(&h, id.epoch, to)?;
            Ok((stream, sent.elapsed()))
        }
        _ => Err("the next stage refused the hello".into()),
    }
}
