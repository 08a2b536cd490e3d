//! Connecting the command line to a lime cluster's broker (MQTT 5).

use rumqttc::v5::{AsyncClient, EventLoop, MqttOptions};
use std::time::Duration;

/// Where the broker is and how to log in.
#[derive(Debug, Clone)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// MQTT over TLS.
    pub tls: Option<BrokerTls>,
}

/// TLS to the broker, checked when made so that connecting cannot fail over to
/// plain MQTT.
#[derive(Clone)]
pub struct BrokerTls {
    /// The CA (PEM) the broker is verified against.
    pub ca_file: std::path::PathBuf,
    transport: rumqttc::Transport,
}

impl BrokerTls {
    pub fn new(ca_file: &std::path::Path) -> anyhow::Result<Self> {
        Ok(Self {
            ca_file: ca_file.to_owned(),
            transport: lime_stage::control::broker_tls::transport(ca_file)?,
        })
    }
}

impl std::fmt::Debug for BrokerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerTls")
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl BrokerAddr {
    /// `host:port` of an MQTT 5 listener.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("broker address {s:?} is not host:port"))?;
        Ok(Self {
            host: host.to_owned(),
            port: port
                .parse()
                .map_err(|e| anyhow::anyhow!("broker port in {s:?}: {e}"))?,
            username: None,
            password: None,
            tls: None,
        })
    }

    /// A client with a unique id (`prefix-<pid>-<n>`).
    pub fn connect(&self, prefix: &str) -> (AsyncClient, EventLoop, String) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{prefix}-{}-{n}", std::process::id());
        let (client, eventloop) = self.connect_as(&id);
        (client, eventloop, id)
    }

    /// A client with this id, as a robot that reconnects under its own name.
    pub fn connect_as(&self, id: &str) -> (AsyncClient, EventLoop) {
        let mut o = MqttOptions::new(id, self.host.clone(), self.port);
        o.set_keep_alive(Duration::from_secs(10));
        o.set_max_packet_size(Some(16 << 20));
        if let (Some(u), Some(p)) = (&self.username, &self.password) {
            o.set_credentials(u.clone(), p.clone());
        }
        if let Some(tls) = &self.tls {
            o.set_transport(tls.transport.clone());
        }
        AsyncClient::new(o, 1024)
    }
}
