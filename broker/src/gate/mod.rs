//! The gate: lime-broker's MQTT front door. Clients connect here, never to
//! rumqttd itself. The gate terminates TLS, checks each login against the
//! configured users, applies the login's topic rules ([`crate::acl`]) to what it
//! publishes and subscribes to, and relays the connection to rumqttd's loopback
//! listeners under the gate's own login ([`internal`]). rumqttd 0.20 checks
//! passwords but knows no topic permissions; this is where they live.
//!
//! Either port takes MQTT 3.1.1 and 5 alike: the CONNECT says which, and the
//! gate relays to the matching internal listener.

pub mod internal;
mod packet;
mod session;
pub mod tls;

use crate::acl::Role;
use crate::config::{BrokerConfig, User};
use internal::Internal;
use packet::{Connect, Protocol, Refusal};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// What every connection through the gate shares.
pub struct Gate {
    users: Option<HashMap<String, User>>,
    /// Clients without a login get in (as services).
    anonymous: bool,
    internal: Internal,
    /// The largest packet relayed either way: a publish of the payload limit
    /// with room for its topic and properties.
    max_packet: usize,
    connect_timeout: Duration,
    slots: Arc<Semaphore>,
}

impl Gate {
    pub fn new(cfg: &BrokerConfig, internal: Internal) -> Self {
        Self {
            users: cfg.users.clone(),
            anonymous: cfg.allow_anonymous,
            internal,
            max_packet: cfg.max_payload_bytes + (64 << 10),
            connect_timeout: Duration::from_millis(u64::from(cfg.connection_timeout_ms)),
            slots: Arc::new(Semaphore::new(cfg.max_connections)),
        }
    }

    /// Who a CONNECT logs in as: their role and name (empty without logins).
    fn admit(&self, connect: &Connect) -> Result<(Role, String), Refusal> {
        let login = connect.login();
        let users = match (&self.users, login) {
            (Some(users), Some(_)) => users,
            (_, None) if self.anonymous => return Ok((Role::Service, String::new())),
            (None, Some((name, _))) if self.anonymous => {
                return Ok((Role::Service, name.to_owned()))
            }
            _ => return Err(Refusal::BadLogin),
        };
        let (name, password) = login.ok_or(Refusal::BadLogin)?;
        let user = users.get(name).ok_or(Refusal::BadLogin)?;
        if !same_secret(user.password.as_bytes(), password.as_bytes()) {
            return Err(Refusal::BadLogin);
        }
        // A last will is a publish made for the client later: only logins that
        // may publish anywhere may leave one.
        if user.role != Role::Service && connect.has_will() {
            return Err(Refusal::NotAuthorized);
        }
        Ok((user.role, name.to_owned()))
    }

    fn internal_addr(&self, protocol: Protocol) -> SocketAddr {
        match protocol {
            Protocol::V4 => self.internal.v4,
            Protocol::V5 => self.internal.v5,
        }
    }
}

/// Compares without an early exit, so that timing does not tell how much of a
/// guessed password was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The gate's listening sockets, bound before anything starts so that a taken
/// port or a bad certificate fails the start.
pub struct Listeners {
    plain: Vec<std::net::TcpListener>,
    secure: Vec<std::net::TcpListener>,
    acceptor: Option<TlsAcceptor>,
}

impl Listeners {
    pub fn bind(cfg: &BrokerConfig) -> anyhow::Result<Self> {
        let bind = |addr: &str| -> anyhow::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let plain = [cfg.v4_listen(), cfg.v5_listen()]
            .into_iter()
            .filter(|a| !a.is_empty())
            .map(bind)
            .collect::<anyhow::Result<_>>()?;
        let (secure, acceptor) = match &cfg.tls {
            Some(t) => (
                [&t.v4_listen, &t.v5_listen]
                    .into_iter()
                    .filter(|a| !a.is_empty())
                    .map(|a| bind(a))
                    .collect::<anyhow::Result<_>>()?,
                Some(tls::acceptor(&t.cert_file, &t.key_file)?),
            ),
            None => (Vec::new(), None),
        };
        Ok(Self {
            plain,
            secure,
            acceptor,
        })
    }
}

/// Serves every listener until `broker_stopped` fires (rumqttd is gone) or
/// the runtime cannot start.
pub fn serve(
    gate: Arc<Gate>,
    listeners: Listeners,
    broker_stopped: tokio::sync::oneshot::Receiver<String>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gate")
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut loops = tokio::task::JoinSet::new();
        let tls = listeners.acceptor;
        for (l, tls) in listeners
            .plain
            .into_iter()
            .map(|l| (l, None))
            .chain(listeners.secure.into_iter().map(|l| (l, tls.clone())))
        {
            let listener = TcpListener::from_std(l)?;
            loops.spawn(accept(listener, tls, gate.clone()));
        }
        let why = broker_stopped
            .await
            .unwrap_or_else(|_| "the broker thread ended".into());
        anyhow::bail!("rumqttd stopped: {why}")
    })
}

async fn accept(listener: TcpListener, tls: Option<TlsAcceptor>, gate: Arc<Gate>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = gate.slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing a new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (gate, tls) = (gate.clone(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let ended = match tls {
                None => session::run(stream, peer, &gate).await,
                Some(tls) => {
                    match tokio::time::timeout(gate.connect_timeout, tls.accept(stream)).await {
                        Ok(Ok(stream)) => session::run(stream, peer, &gate).await,
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = ended {
                tracing::info!(%peer, error = %e, "MQTT connection closed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cret", b"s3cre"));
        assert!(!same_secret(b"s3cret", b"s3creT"));
        assert!(same_secret(b"", b""));
    }
}
