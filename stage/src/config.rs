//! A stage's settings: a TOML file, then `LIME_STAGE_…` environment variables
//! (`LIME_STAGE_NAME=s1`, `LIME_STAGE_BROKER__PORT=1884`) over it.

use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Unique in the cluster; the plan and the status topic use it.
    pub name: String,
    /// Checkpoint directory (the same files on every stage).
    pub model: PathBuf,
    /// Where the plan comes from: this file, else the retained `lime/control/plan`.
    #[serde(default)]
    pub plan_file: Option<PathBuf>,
    #[serde(default)]
    pub broker: BrokerConfig,
    #[serde(default)]
    pub data: DataConfig,
    /// Used only when this stage is the plan's starter.
    #[serde(default)]
    pub starter: StarterConfig,
}

/// How to reach the MQTT broker (lime-broker's v5 listener or any MQTT 5 broker).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive_s: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1884,
            username: None,
            password: None,
            keep_alive_s: 10,
        }
    }
}

/// The data-plane listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Address to bind; the plan's `data_addr` for this stage when absent.
    pub listen: Option<String>,
    /// Longest wait for a connecting peer's hello.
    pub hello_timeout_ms: u64,
    /// Reconnection backoff to the next stage: first and longest wait.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            listen: None,
            hello_timeout_ms: 5_000,
            backoff_min_ms: 50,
            backoff_max_ms: 5_000,
        }
    }
}

/// Request admission and batching at the starter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StarterConfig {
    /// Larger request payloads are refused with `payload_too_large`.
    pub max_request_bytes: usize,
    /// Sequences generating at once; later requests wait in the queue.
    pub max_sequences: usize,
    /// Requests waiting beyond this are refused with `overloaded`.
    pub max_queued: usize,
    /// Tokens in one micro-batch; longer prompts are prefilled over several passes.
    pub max_batch_tokens: usize,
    /// Micro-batches travelling the ring at once; 0 means one per stage.
    pub max_inflight: usize,
    /// A micro-batch not back after this long is given up, its requests failed.
    pub stall_timeout_ms: u64,
}

impl Default for StarterConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: 256 << 10,
            max_sequences: 64,
            max_queued: 1024,
            max_batch_tokens: 512,
            max_inflight: 0,
            stall_timeout_ms: 60_000,
        }
    }
}

impl StageConfig {
    /// Reads `file` (optional) and the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        let cfg = builder
            .add_source(
                config::Environment::with_prefix("LIME_STAGE")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?;
        let cfg: Self = cfg.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            lime_schemas::topics::is_topic_level(&self.name),
            "stage name {:?} must be 1 to 128 characters without '/', '+' or '#'",
            self.name
        );
        let s = &self.starter;
        anyhow::ensure!(
            s.max_sequences > 0,
            "starter.max_sequences must be positive"
        );
        anyhow::ensure!(
            s.max_batch_tokens > 0,
            "starter.max_batch_tokens must be positive"
        );
        anyhow::ensure!(
            self.data.backoff_min_ms > 0 && self.data.backoff_min_ms <= self.data.backoff_max_ms,
            "data.backoff_min_ms must be positive and at most data.backoff_max_ms"
        );
        Ok(())
    }
}
