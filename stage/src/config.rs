//! A stage's settings: a TOML file, then `LIME_STAGE_…` environment variables
//! (`LIME_STAGE_NAME=s1`, `LIME_STAGE_BROKER__PORT=1884`) over it. They also
//! serialize, so that whoever starts stages (the test bench, a provisioning
//! script) builds them as values and writes them with [`StageConfig::to_toml`].

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything one stage process is started with.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Unique in the cluster; the plan and the status topic use it.
    pub name: String,
    /// Checkpoint directory (the same files on every stage).
    pub model: PathBuf,
    /// Where the plan comes from: this file, else the retained `lime/control/plan`.
    #[serde(default)]
    pub plan_file: Option<PathBuf>,
    /// The control plane: plans, requests and replies go through it.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// The TCP links of the ring, which carry the activations.
    #[serde(default)]
    pub data: DataConfig,
    /// Used only when this stage is the plan's starter.
    #[serde(default)]
    pub starter: StarterConfig,
    /// What this device may hold, and how the layers it cannot hold are read.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// How often the stage publishes `lime/telemetry/<name>`.
    #[serde(default = "default_telemetry_ms")]
    pub telemetry_ms: u64,
    /// This device's profile for the broker's planner (written by
    /// `lime-stage --profile`, or by hand). Absent, a stage without a `plan_file`
    /// measures itself at start. Under `emulate`, the stage computes at its
    /// figures, with a `plan_file` too.
    #[serde(default)]
    pub profile_file: Option<PathBuf>,
    /// Threads the layers compute on; absent, one per core. Fewer leave cores to
    /// the loader and the network (or, emulating several devices on one machine,
    /// to the other stages).
    #[serde(default)]
    pub compute_threads: Option<usize>,
    /// What the layers compute on: `cpu` (f32), or `cuda`/`cuda:N` (the
    /// checkpoint's own dtype; needs a build with the `cuda` feature).
    #[serde(default)]
    pub device: lime_kernels::DeviceSpec,
    /// On SIGTERM, how long requests in flight may take to finish before they
    /// end with an error and the stage exits (systemd's `TimeoutStopSec` must
    /// leave room for it).
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Emulating a slower device on this machine, for benchmarks only.
    #[serde(default)]
    pub emulate: EmulateConfig,
}

fn default_telemetry_ms() -> u64 {
    2_000
}

fn default_shutdown_grace_ms() -> u64 {
    10_000
}

/// The memory budget and how offloaded layers are streamed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Bytes for resident weights, layer slots, KV caches and the activation
    /// workspace; absent, every layer stays resident and nothing is limited.
    pub budget_bytes: Option<u64>,
    /// Most streamed layers in memory at once; each slot comes out of the budget.
    pub max_slots: usize,
    /// Read the next offloaded layer before a micro-batch needs it. Off, layers
    /// are read on demand (the `naive` and `mdi` baselines).
    pub prefetch: bool,
    /// Read offloaded layers with `O_DIRECT`, bypassing the page cache.
    pub direct_io: bool,
    /// Emulated storage bandwidth in MB/s (10^6 bytes), for benchmarks on machines
    /// whose page cache is far faster than a Jetson's eMMC or NVMe.
    pub read_mb_per_s: Option<f64>,
    /// Largest micro-batch in tokens the stage computes at once; its activation
    /// workspace is reserved in the budget. The starter batches no more than this.
    pub activation_tokens: usize,
    /// KV room kept for one sequence of this many tokens when the budget is split;
    /// absent, the model's whole context.
    pub kv_reserve_tokens: Option<usize>,
    /// Bytes of the budget reserved for the process itself and not split: the
    /// executable, the async runtime and MQTT client, the tokenizer, thread
    /// stacks and allocator slack. With it the stage's RSS stays within
    /// `budget_bytes`; profiles offer the planner the budget less this.
    pub overhead_bytes: u64,
}

/// The fixed overhead reserved by default: a CPU stage of the bench preset
/// peaked 31 MiB above what it accounted; the rest is margin.
pub const DEFAULT_OVERHEAD_BYTES: u64 = 40 << 20;

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            budget_bytes: None,
            max_slots: 2,
            prefetch: true,
            direct_io: false,
            read_mb_per_s: None,
            activation_tokens: 512,
            kv_reserve_tokens: None,
            overhead_bytes: DEFAULT_OVERHEAD_BYTES,
        }
    }
}

impl MemoryConfig {
    /// What the budget leaves for weights, caches and workspace once the fixed
    /// overhead is reserved; `None` without a budget.
    pub fn accountable_bytes(&self) -> Option<u64> {
        self.budget_bytes
            .map(|b| b.saturating_sub(self.overhead_bytes))
    }

    /// The emulated read bandwidth in bytes per second.
    pub fn read_bytes_per_s(&self) -> Option<u64> {
        self.read_mb_per_s.map(|mb| (mb * 1e6) as u64)
    }
}

/// Device emulation, for benchmarks: several stages on one machine behave
/// like separate, slower devices. Off by default; a field device never sets it.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmulateConfig {
    /// Compute as if on a device this many times slower than this machine:
    /// after each layer (and the starter's ends) the stage waits until the
    /// computation has taken this many times as long. Stages sharing a few cores
    /// then mostly wait instead of competing for them, so that N of them overlap
    /// like N devices. 1 is off. The profile reports the emulated speed, and the
    /// stage then keeps to the profile's figures, so that what other tenants of
    /// this machine do later does not change the emulated device.
    pub compute_slowdown: f64,
}

impl Default for EmulateConfig {
    fn default() -> Self {
        Self {
            compute_slowdown: 1.0,
        }
    }
}

/// How to reach the MQTT broker (lime-broker's v5 listener or any MQTT 5 broker).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Name or address of the broker.
    pub host: String,
    /// The broker's MQTT port (1884 is lime-broker's v5 listener).
    pub port: u16,
    /// Login for a broker that checks them; sent only with `password`.
    pub username: Option<String>,
    /// The login's password; `LIME_STAGE_BROKER__PASSWORD` keeps it out of the file.
    pub password: Option<String>,
    /// Speak MQTT over TLS, trusting this CA (PEM); `host` must be a name or
    /// address the broker's certificate holds.
    pub ca_file: Option<PathBuf>,
    /// MQTT keep-alive in seconds: how soon the broker notices a stage gone.
    pub keep_alive_s: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1884,
            username: None,
            password: None,
            ca_file: None,
            keep_alive_s: 10,
        }
    }
}

/// The data-plane listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Address to bind; the plan's `data_addr` for this stage when absent.
    pub listen: Option<String>,
    /// Address other stages reach this one at, published with its profile so the
    /// broker's plan can name it; `listen` when absent.
    pub advertise: Option<String>,
    /// Longest wait for a connecting peer's hello.
    pub hello_timeout_ms: u64,
    /// Reconnection backoff to the next stage: first and longest wait.
    pub backoff_min_ms: u64,
    /// The wait the backoff grows to and stays at (ms).
    pub backoff_max_ms: u64,
    /// Probe the link to the next stage when its newest bandwidth sample is older
    /// than this and nothing waits to be sent.
    pub probe_every_ms: u64,
    /// How long a probe should occupy the link at its last measured bandwidth.
    pub probe_target_ms: u64,
    /// The ring's pre-shared key (hex, at least 16 bytes: `openssl rand -hex
    /// 32`), the same file on every stage. With it, every link proves both ends
    /// hold the key before any activation moves; without it, any host that can
    /// reach the data port can join.
    pub key_file: Option<std::path::PathBuf>,
    /// Run a ring of several stages without `key_file`. Off, such a stage
    /// refuses to start: a stranger's hello could take a link, and the plan
    /// could not be checked. For a bench on one machine.
    pub insecure: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            listen: None,
            advertise: None,
            hello_timeout_ms: 5_000,
            backoff_min_ms: 50,
            backoff_max_ms: 5_000,
            probe_every_ms: 1_000,
            probe_target_ms: 20,
            key_file: None,
            insecure: false,
        }
    }
}

/// Request admission and batching at the starter.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StarterConfig {
    /// Larger request payloads are refused with `payload_too_large`.
    pub max_request_bytes: usize,
    /// Sequences generating at once; later requests wait in the queue.
    pub max_sequences: usize,
    /// Requests waiting beyond this are refused with `overloaded`...
    pub max_queued: usize,
    /// ...and so are those beyond this many prompt tokens waiting in all:
    /// what the queue holds for requests is bounded in bytes as well as in
    /// number (4 bytes a token).
    pub max_queued_tokens: usize,
    /// Request payloads received and not yet checked and tokenized, in bytes.
    /// The MQTT loop hands requests to the intake thread and never waits on it
    /// (rumqttd drops what a lagging subscriber has not read); beyond this a
    /// request is refused with `overloaded`.
    pub max_intake_bytes: usize,
    /// Tokens in one micro-batch; longer prompts are prefilled over several passes.
    pub max_batch_tokens: usize,
    /// Micro-batches travelling the ring at once; 0 means one per stage.
    pub max_inflight: usize,
    /// A micro-batch not back after this long is taken as lost on the ring,
    /// and every sequence is replayed as after a broken link.
    pub stall_timeout_ms: u64,
    /// A request that names no `deadline_ms` gets this one: its answer must be
    /// complete this long after it arrived (waiting for room, or for a broken
    /// ring to be whole again, included), or it ends with `deadline_exceeded`.
    pub default_deadline_ms: u64,
    /// A request's id is taken while it is answered: the same request again is
    /// served once (QoS 1 redelivers), another under that id is refused with
    /// `duplicate_id`. The same request arriving this long after its answer
    /// is still taken for a late redelivery...
    pub redelivery_grace_ms: u64,
    /// ...and at most this many ids are remembered (the oldest go first).
    pub max_remembered_ids: usize,
}

impl Default for StarterConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: 256 << 10,
            max_sequences: 64,
            max_queued: 1024,
            max_queued_tokens: 1 << 20,
            max_intake_bytes: 16 << 20,
            max_batch_tokens: 512,
            max_inflight: 0,
            stall_timeout_ms: 60_000,
            default_deadline_ms: 600_000,
            redelivery_grace_ms: 10_000,
            max_remembered_ids: 65_536,
        }
    }
}

impl StageConfig {
    /// Stage `name` serving the checkpoint in `model`, every other setting at
    /// its default.
    pub fn new(name: impl Into<String>, model: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            model: model.into(),
            plan_file: None,
            broker: BrokerConfig::default(),
            data: DataConfig::default(),
            starter: StarterConfig::default(),
            memory: MemoryConfig::default(),
            telemetry_ms: default_telemetry_ms(),
            profile_file: None,
            compute_threads: None,
            device: lime_kernels::DeviceSpec::default(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            emulate: EmulateConfig::default(),
        }
    }

    /// The settings as the TOML file [`StageConfig::load`] reads back.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        Ok(toml::to_string(self)?)
    }

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
            (1..=lime_schemas::request::MAX_DEADLINE_MS).contains(&s.default_deadline_ms),
            "starter.default_deadline_ms must be 1 to {} (a day)",
            lime_schemas::request::MAX_DEADLINE_MS
        );
        let m = &self.memory;
        anyhow::ensure!(
            m.activation_tokens > 0,
            "memory.activation_tokens must be positive"
        );
        anyhow::ensure!(
            m.read_mb_per_s.is_none_or(|r| r.is_finite() && r > 0.0),
            "memory.read_mb_per_s must be a positive number of MB/s"
        );
        #[cfg(not(feature = "cuda"))]
        anyhow::ensure!(
            self.device == lime_kernels::DeviceSpec::Cpu,
            "device = \"{}\" needs lime-stage built with the `cuda` feature \
             (cargo build --release --features cuda, with the CUDA toolkit)",
            self.device
        );
        let slowdown = self.emulate.compute_slowdown;
        anyhow::ensure!(
            slowdown.is_finite() && (1.0..=1000.0).contains(&slowdown),
            "emulate.compute_slowdown must be 1 (off) to 1000"
        );
        anyhow::ensure!(self.telemetry_ms >= 50, "telemetry_ms must be at least 50");
        anyhow::ensure!(
            self.shutdown_grace_ms <= 600_000,
            "shutdown_grace_ms must be at most 600000 (ten minutes)"
        );
        anyhow::ensure!(
            self.data.probe_every_ms >= 100 && self.data.probe_target_ms > 0,
            "data.probe_every_ms must be at least 100 and data.probe_target_ms positive"
        );
        anyhow::ensure!(
            self.data.backoff_min_ms > 0 && self.data.backoff_min_ms <= self.data.backoff_max_ms,
            "data.backoff_min_ms must be positive and at most data.backoff_max_ms"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load(text: &str) -> anyhow::Result<StageConfig> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        StageConfig::load(Some(f.path()))
    }

    #[test]
    fn settings_written_are_read_back() {
        let mut cfg = StageConfig::new("s1", "/models/tiny");
        cfg.memory.budget_bytes = Some(123 << 20);
        cfg.memory.read_mb_per_s = Some(250.5);
        cfg.data.key_file = Some("/etc/lime/ring.key".into());
        cfg.broker.username = Some("stage".into());
        cfg.emulate.compute_slowdown = 4.0;
        let back = load(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{cfg:?}"));
    }

    #[test]
    fn emulation_is_off_by_default_and_bounded() {
        let base = "name = \"s0\"\nmodel = \"/m\"\n";
        assert_eq!(load(base).unwrap().emulate.compute_slowdown, 1.0);
        for bad in ["0.5", "0", "1e9", "nan"] {
            let err = load(&format!("{base}[emulate]\ncompute_slowdown = {bad}\n")).unwrap_err();
            assert!(
                format!("{err:#}").contains("compute_slowdown"),
                "{bad}: {err:#}"
            );
        }
        let err = load(&format!("{base}[emulate]\nslowdown = 4\n")).unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
    }

    #[test]
    fn the_device_defaults_to_the_cpu_and_bad_names_are_refused() {
        let base = "name = \"s0\"\nmodel = \"/m\"\n";
        assert_eq!(load(base).unwrap().device, lime_kernels::DeviceSpec::Cpu);
        let err = load(&format!("{base}device = \"tpu\"\n")).unwrap_err();
        assert!(format!("{err:#}").contains("cuda:N"), "{err:#}");
        let gpu = load(&format!("{base}device = \"cuda:1\"\n"));
        #[cfg(feature = "cuda")]
        assert_eq!(gpu.unwrap().device, lime_kernels::DeviceSpec::Cuda(1));
        #[cfg(not(feature = "cuda"))]
        assert!(format!("{:#}", gpu.unwrap_err()).contains("`cuda` feature"));
    }
}
