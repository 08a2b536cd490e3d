//! The broker as a systemd service (`Type=notify`). Ready means every listener
//! accepts connections and the router delivers; the watchdog is fed only while
//! a message published through the router keeps coming back, so a wedged router
//! gets the unit restarted. Outside systemd (no `NOTIFY_SOCKET`) this only
//! waits.

use crate::config::BrokerConfig;
use rumqttd::local::LinkError;
use sd_notify::NotifyState;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Where the broker publishes to itself; `<pid>` keeps two brokers apart.
fn heartbeat_topic() -> String {
    format!("lime/broker/heartbeat/{}", std::process::id())
}

/// Runs until the router stops: waits for readiness, says so, then feeds the
/// watchdog (if the unit has one) with round trips through the router.
pub fn watch(
    cfg: &BrokerConfig,
    mut tx: rumqttd::local::LinkTx,
    mut rx: rumqttd::local::LinkRx,
) -> anyhow::Result<()> {
    let mut usec = 0;
    let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
        .then(|| Duration::from_micros(usec))
        .filter(|d| !d.is_zero());
    let every = watchdog.map_or(Duration::from_secs(1), |w| {
        (w / 2).max(Duration::from_millis(10))
    });
    let topic = heartbeat_topic();
    tx.subscribe(topic.clone())?;

    let listeners: Vec<SocketAddr> = cfg
        .listeners()
        .into_iter()
        .filter_map(|a| a.parse().ok())
        .map(reachable)
        .collect();
    let started = Instant::now();
    let mut ready = false;
    let mut beat = 0u64;
    loop {
        beat += 1;
        tx.publish(topic.clone(), beat.to_string().into_bytes())?;
        let deadline = Instant::now() + every;
        let mut delivered = false;
        while !delivered {
            match rx.recv_deadline(deadline) {
                Ok(Some(rumqttd::Notification::Forward(f))) => {
                    delivered = f.publish.payload.as_ref() == beat.to_string().as_bytes();
                }
                Ok(_) => {}
                Err(LinkError::RecvTimeout(_)) if Instant::now() >= deadline => break,
                Err(e) => return Err(e.into()),
            }
        }
        if !ready && delivered && listeners.iter().all(accepts) {
            ready = true;
            tracing::info!(
                after_ms = started.elapsed().as_millis() as u64,
                "broker ready"
            );
            notify(&[NotifyState::Ready, NotifyState::Status("serving MQTT")]);
        }
        if delivered && watchdog.is_some() {
            notify(&[NotifyState::Watchdog]);
        } else if ready && !delivered {
            tracing::error!("a heartbeat did not come back through the router in time");
        }
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(left);
    }
}

/// Where to connect to reach a listener (an unspecified address means this
/// host).
fn reachable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

fn accepts(addr: &SocketAddr) -> bool {
    TcpStream::connect_timeout(addr, Duration::from_millis(500)).is_ok()
}

/// Tells systemd the broker is going away (SIGTERM, Ctrl-C).
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
