//! The broker's settings: a TOML file, then `LIME_BROKER_…` environment variables
//! over it (`LIME_BROKER_V5_LISTEN=0.0.0.0:1884`,
//! `LIME_BROKER_USERS__ARM2__PASSWORD=secret`, `LIME_BROKER_USERS__ARM2__ROLE=robot`;
//! the environment spells names in lower case). They also serialize, so that
//! whoever starts a broker (the test bench, a provisioning script) builds them
//! as values and writes them with [`BrokerConfig::to_toml`]; this module and
//! [`crate::acl`]'s roles build without the `server` feature.

use crate::acl::Role;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// A plain MQTT listener (3.1.1 or 5, as each client chooses); empty to
    /// disable. Unset: port 1883 on every interface, or on loopback only when
    /// anonymous clients are allowed.
    pub v4_listen: Option<String>,
    /// Another, by custom the one MQTT 5 clients (lime's own processes) use;
    /// empty to disable. Unset: port 1884, bound as `v4_listen` is.
    pub v5_listen: Option<String>,
    /// Let clients without a login in, with every topic (as a `service`
    /// login). Off, a broker with no `users` refuses to start, since no one
    /// could connect. For a bench on one machine; unless listeners are given,
    /// such a broker listens on loopback only.
    pub allow_anonymous: bool,
    /// Largest publish accepted. Big enough for a request the starter will refuse
    /// with a clear error, and for final messages that carry logits.
    pub max_payload_bytes: usize,
    /// Unacknowledged QoS 1 messages per connection.
    pub max_inflight: usize,
    /// The router keeps each subscription's recent messages (for subscribers
    /// that lag) in segments of about this many bytes (a larger message
    /// overfills one)...
    pub log_segment_bytes: usize,
    /// ...and this many full segments besides the one filling: the most a
    /// subscription holds is about (log_segments + 1) x log_segment_bytes.
    pub log_segments: usize,
    /// What the router keeps of the requests on their way to the starter
    /// (each request filter has its own log of this size): a burst of requests
    /// the starter has not read yet must fit, or rumqttd drops the oldest
    /// without a word. The starter reads at wire speed and refuses what it has
    /// no room for, so this only has to cover a burst published faster than
    /// one router pass delivers it. Counted in requests' bytes: a small
    /// request from a robot that connects only to send it holds about 9 KiB
    /// of the broker's memory while it is in the log (see `router`).
    pub request_log_bytes: usize,
    /// How long a new connection may take to send CONNECT.
    pub connection_timeout_ms: u16,
    pub max_connections: usize,
    /// Logins by name. When set, every client must log in, and may use only
    /// the topics its role allows.
    pub users: Option<HashMap<String, User>>,
    /// MQTT over TLS, for robots on networks others share.
    pub tls: Option<TlsSettings>,
    /// The planner that turns the stages' profiles into the plan.
    pub planner: PlannerConfig,
    /// The ring key (the stages' `data.key_file`): the planner signs every
    /// plan with it, and follows no plan on the topic that is not signed with
    /// it. Without it, plans go out unsigned, and only stages that run
    /// `data.insecure` take them.
    pub ring_key_file: Option<PathBuf>,
}

/// One login.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub password: String,
    /// `service` (stages, tools: every topic), `robot` (requests and its own
    /// answers) or `monitor` (reads status, telemetry and the plan).
    pub role: Role,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// TLS listeners and the server's identity (PEM files, read and checked when
/// the gate binds its listeners at start). Clients are not asked for
/// certificates; with `users` set they log in over the encrypted link.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// MQTT 3.1.1 over TLS (e.g. `0.0.0.0:8883`); empty or absent to disable.
    #[serde(default)]
    pub v4_listen: String,
    /// MQTT 5 over TLS; empty or absent to disable.
    #[serde(default)]
    pub v5_listen: String,
    /// The certificate chain robots verify, leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, RSA or SEC1).
    pub key_file: PathBuf,
}

/// When and for what the broker plans.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlannerConfig {
    /// Plan once this many stages have published their profiles; 0 leaves
    /// planning to a plan file or `lime plan`.
    pub stages: usize,
    /// The network (`lime plan --links` format); absent, every link is taken to
    /// have the default speed below.
    pub links_file: Option<PathBuf>,
    pub default_mbit_per_s: f64,
    pub default_latency_ms: f64,
    /// `sporadic` (minimise time per token) or `bursty` (maximise tokens/s).
    pub workload: String,
    /// Sequences at once for the bursty workload (KV is planned for them all).
    pub concurrency: usize,
    /// Tokens of context each sequence's KV cache is planned for.
    pub context: usize,
    pub prompt_tokens: usize,
    /// The stages' settings the plan assumes (their defaults).
    pub max_slots: usize,
    pub activation_tokens: usize,
    pub max_interleave: usize,
    /// Re-plan when measured conditions change for good; off, the first plan
    /// stays (the baseline the adaptive planner is measured against).
    pub adapt: bool,
    /// A measured link or read bandwidth this many times off (either way) the
    /// one the plan assumed is a change...
    pub change_factor: f64,
    /// ...once every report for this long says so.
    pub sustain_ms: u64,
    /// Then the planner waits up to this long for every link to be measured
    /// since the change began (stages probe each link about once a second), so
    /// that one plan covers every link the event moved.
    pub settle_ms: u64,
    /// A new plan is published only if predicted at least this much better
    /// (0.05: 5% more tokens/s, or 5% less time per token)...
    pub min_gain: f64,
    /// ...if what it gains repays, within this many seconds, the output lost
    /// while every sequence's cache is recomputed on the new ring...
    pub payback_s: f64,
    /// ...and not sooner than this after the last one.
    pub switch_interval_ms: u64,
    /// A stage of the running plan offline this long is planned around, if
    /// the others can hold the model; until then its return is waited for
    /// (a supervised restart takes seconds).
    pub lost_after_ms: u64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            stages: 0,
            links_file: None,
            default_mbit_per_s: 1000.0,
            default_latency_ms: 0.2,
            workload: "sporadic".into(),
            concurrency: 16,
            context: 4096,
            prompt_tokens: 128,
            max_slots: 2,
            activation_tokens: 512,
            max_interleave: 8,
            adapt: true,
            change_factor: 1.5,
            sustain_ms: 1_000,
            settle_ms: 2_000,
            min_gain: 0.05,
            payback_s: 30.0,
            switch_interval_ms: 5_000,
            lost_after_ms: 15_000,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            v4_listen: None,
            v5_listen: None,
            allow_anonymous: false,
            max_payload_bytes: 4 << 20,
            max_inflight: 256,
            log_segment_bytes: 256 << 10,
            log_segments: 2,
            request_log_bytes: 16 << 20,
            connection_timeout_ms: 10_000,
            max_connections: 1024,
            users: None,
            tls: None,
            planner: PlannerConfig::default(),
            ring_key_file: None,
        }
    }
}

impl BrokerConfig {
    /// The settings as the TOML file [`BrokerConfig::load`] reads back.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        Ok(toml::to_string(self)?)
    }

    /// Reads `file` (optional) and the environment, and checks the result.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        let cfg: Self = builder
            .add_source(
                config::Environment::with_prefix("LIME_BROKER")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?
            .try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The plain MQTT listener's address (empty: none).
    pub fn v4_listen(&self) -> &str {
        self.v4_listen
            .as_deref()
            .unwrap_or(if self.allow_anonymous {
                "127.0.0.1:1883"
            } else {
                "0.0.0.0:1883"
            })
    }

    /// The second plain listener's address (empty: none).
    pub fn v5_listen(&self) -> &str {
        self.v5_listen
            .as_deref()
            .unwrap_or(if self.allow_anonymous {
                "127.0.0.1:1884"
            } else {
                "0.0.0.0:1884"
            })
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.users.is_some() || self.allow_anonymous,
            "no logins ([users.NAME] with a password and a role) and allow_anonymous is off: \
             no client could connect. Give the stages a service login and each robot a robot \
             login, or set allow_anonymous = true on a machine no one else can reach"
        );
        anyhow::ensure!(
            !(self.v4_listen().is_empty() && self.v5_listen().is_empty() && self.tls.is_none()),
            "every listener is disabled"
        );
        for addr in [self.v4_listen(), self.v5_listen()] {
            if !addr.is_empty() {
                addr.parse::<SocketAddr>()
                    .map_err(|e| anyhow::anyhow!("listen address {addr:?}: {e}"))?;
            }
        }
        anyhow::ensure!(
            (1024..=256 << 20).contains(&self.max_payload_bytes),
            "max_payload_bytes must be between 1 KiB and 256 MiB"
        );
        anyhow::ensure!(self.max_inflight > 0, "max_inflight must be positive");
        anyhow::ensure!(
            (1024..=1 << 30).contains(&self.log_segment_bytes),
            "log_segment_bytes must be between 1 KiB and 1 GiB"
        );
        anyhow::ensure!(
            (1..=1024).contains(&self.log_segments),
            "log_segments must be between 1 and 1024"
        );
        anyhow::ensure!(
            self.request_log_bytes >= 2 * self.max_payload_bytes
                && self.request_log_bytes <= 4 << 30,
            "request_log_bytes must hold at least two requests of max_payload_bytes ({}), and at most 4 GiB",
            2 * self.max_payload_bytes
        );
        let p = &self.planner;
        anyhow::ensure!(
            p.workload.parse::<lime_plan::WorkloadKind>().is_ok(),
            "planner.workload must be sporadic or bursty, not {:?}",
            p.workload
        );
        anyhow::ensure!(
            p.default_mbit_per_s.is_finite() && p.default_mbit_per_s > 0.0,
            "planner.default_mbit_per_s must be positive"
        );
        anyhow::ensure!(
            p.context > 0 && p.activation_tokens > 0 && p.max_interleave > 0,
            "planner.context, activation_tokens and max_interleave must be positive"
        );
        anyhow::ensure!(
            p.change_factor.is_finite() && p.change_factor > 1.0,
            "planner.change_factor must be above 1"
        );
        anyhow::ensure!(
            p.sustain_ms <= 60_000 && p.settle_ms <= 60_000,
            "planner.sustain_ms and planner.settle_ms must be at most 60000 (a minute)"
        );
        anyhow::ensure!(
            p.min_gain.is_finite() && (0.0..1.0).contains(&p.min_gain),
            "planner.min_gain must be in [0, 1)"
        );
        anyhow::ensure!(
            p.payback_s.is_finite() && p.payback_s > 0.0,
            "planner.payback_s must be positive"
        );
        if let Some(users) = &self.users {
            anyhow::ensure!(!users.is_empty(), "`users` is set but empty");
            for (name, user) in users {
                // A robot's name becomes a level of its topics.
                anyhow::ensure!(
                    lime_schemas::topics::is_topic_level(name),
                    "user name {name:?} must be one topic level: no `/`, `+`, `#` or control characters"
                );
                anyhow::ensure!(
                    !user.password.is_empty(),
                    "user {name:?} has an empty password"
                );
            }
        }
        if let Some(tls) = &self.tls {
            anyhow::ensure!(
                !(tls.v4_listen.is_empty() && tls.v5_listen.is_empty()),
                "tls is set but both of its listeners are disabled"
            );
            for addr in [&tls.v4_listen, &tls.v5_listen] {
                if !addr.is_empty() {
                    addr.parse::<SocketAddr>()
                        .map_err(|e| anyhow::anyhow!("tls listen address {addr:?}: {e}"))?;
                }
            }
        }
        Ok(())
    }

    /// The ring key, read from `ring_key_file`.
    pub fn ring_key(&self) -> anyhow::Result<Option<lime_schemas::signing::RingKey>> {
        let Some(path) = &self.ring_key_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading the ring key {}: {e}", path.display()))?;
        lime_schemas::signing::RingKey::from_hex(&text)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("the ring key {}: {e}", path.display()))
    }

    /// Every address the broker listens on, plain and TLS.
    pub fn listeners(&self) -> Vec<&str> {
        let tls = self.tls.as_ref();
        [
            Some(self.v4_listen()),
            Some(self.v5_listen()),
            tls.map(|t| t.v4_listen.as_str()),
            tls.map(|t| t.v5_listen.as_str()),
        ]
        .into_iter()
        .flatten()
        .filter(|a| !a.is_empty())
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> BrokerConfig {
        BrokerConfig {
            allow_anonymous: true,
            ..BrokerConfig::default()
        }
    }

    #[test]
    fn settings_written_are_read_back() {
        let mut cfg = open();
        cfg.planner.stages = 3;
        cfg.planner.default_mbit_per_s = 250.5;
        cfg.ring_key_file = Some("/etc/lime/ring.key".into());
        cfg.users = Some(HashMap::from([(
            "arm2".to_owned(),
            User {
                password: "secret".into(),
                role: Role::Robot,
            },
        )]));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("broker.toml");
        std::fs::write(&file, cfg.to_toml().unwrap()).unwrap();
        let back = BrokerConfig::load(Some(&file)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{cfg:?}"));
        let user = &back.users.as_ref().unwrap()["arm2"];
        assert_eq!((user.password.as_str(), user.role), ("secret", Role::Robot));
    }

    #[test]
    fn anonymous_clients_only_when_allowed_and_then_on_loopback() {
        let e = BrokerConfig::default().validate().unwrap_err().to_string();
        assert!(e.contains("allow_anonymous"), "{e}");
        let cfg = open();
        cfg.validate().unwrap();
        assert_eq!(cfg.listeners(), ["127.0.0.1:1883", "127.0.0.1:1884"]);
        let cfg = BrokerConfig {
            users: Some(HashMap::from([(
                "fleet".to_owned(),
                User {
                    password: "pw".into(),
                    role: Role::Service,
                },
            )])),
            ..BrokerConfig::default()
        };
        cfg.validate().unwrap();
        assert_eq!(cfg.listeners(), ["0.0.0.0:1883", "0.0.0.0:1884"]);
        let cfg = BrokerConfig {
            v4_listen: Some(String::new()),
            v5_listen: Some("0.0.0.0:9000".into()),
            ..open()
        };
        assert_eq!(cfg.listeners(), ["0.0.0.0:9000"]);
    }

    #[test]
    fn planner_timings_beyond_a_minute_are_refused() {
        assert!(open().validate().is_ok());
        let mut cfg = open();
        cfg.planner.settle_ms = u64::MAX;
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("planner.settle_ms"), "{e}");
        let mut cfg = open();
        cfg.planner.sustain_ms = 60_001;
        assert!(cfg.validate().is_err());
    }
}
