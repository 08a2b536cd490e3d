//! A lime cluster on this machine: lime-broker (or an existing broker) and N
//! lime-stage processes on loopback. `lime up`, the benchmarks and the tests all
//! start clusters this way, so they exercise the real binaries.

use anyhow::Context;
use lime_broker::acl::Role;
use lime_broker::config::{BrokerConfig, PlannerConfig, TlsSettings, User};
use lime_client::binaries::sibling;
use lime_client::mqtt::BrokerAddr;
use lime_kernels::{Checkpoint, DeviceSpec, Placement};
use lime_schemas::{topics, Plan, PlanStage, StageState};
use lime_stage::config::{MemoryConfig, StageConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub model: PathBuf,
    pub stages: usize,
    /// Chunks per stage.
    pub interleave: usize,
    /// Layer indices where chunks are cut (instead of an even split).
    pub cuts: Option<Vec<usize>>,
    /// Use this broker instead of starting lime-broker.
    pub external_broker: Option<BrokerAddr>,
    /// MQTT ports for lime-broker (v4, v5); 0 picks free ones.
    pub mqtt_ports: (u16, u16),
    /// First data-plane port; 0 picks free ones.
    pub data_port: u16,
    /// Publish the plan retained on `lime/control/plan` instead of giving stages a file.
    pub plan_over_mqtt: bool,
    /// Starter's micro-batches in flight (0: one per stage).
    pub max_inflight: usize,
    /// Configs, the plan and logs go here.
    pub dir: PathBuf,
    /// `RUST_LOG` for the processes (`LIME_CLUSTER_LOG`, else `info`).
    pub log: String,
    /// Extra environment for lime-broker (`LIME_BROKER_…` settings).
    pub broker_env: Vec<(String, String)>,
    /// Extra environment for every stage (`LIME_STAGE_…` settings).
    pub stage_env: Vec<(String, String)>,
    /// The login (username, password) the stages and the cluster's own client
    /// use at the broker, when it requires one.
    pub login: Option<(String, String)>,
    /// Serve MQTT only over TLS with this identity; lime-broker gets no plain
    /// listeners.
    pub tls: Option<TlsIdentity>,
    /// lime itself or a baseline.
    pub mode: Mode,
    /// Memory budgets and streaming.
    pub memory: MemorySpec,
    /// How often stages publish telemetry.
    pub telemetry_ms: Option<u64>,
    /// Compute threads per stage (absent: one per core).
    pub compute_threads: Option<usize>,
    /// Every stage computes this many times slower than this machine
    /// (`emulate.compute_slowdown`), so that stages sharing its cores overlap
    /// like separate devices; 1 is off.
    pub compute_slowdown: f64,
    /// Where every stage computes; budgets are sized for it.
    pub device: DeviceSpec,
    /// Let lime-broker's planner make the plan from the stages' profiles
    /// (instead of `interleave`, `cuts` and the budget's offloaded sets).
    pub planner: Option<PlannerSpec>,
    /// Each stage's profile file, in every mode: emulated devices compute at
    /// its figures, so that clusters given the same files run on the same
    /// devices (the planner's own files, if it has them, come first).
    pub profiles: Option<Vec<PathBuf>>,
    /// Run stage `i` in network namespace `stages[i]`, reaching the broker
    /// (listening on every address) at `host_ip`.
    pub namespaces: Option<Namespaces>,
    /// Who may use the cluster.
    pub security: Security,
}

/// How a cluster's processes tell friend from stranger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// The test bench on one machine: lime-broker admits clients without a
    /// login (`allow_anonymous`, unless [`ClusterSpec::login`] is set) and the
    /// ring runs without a key (`data.insecure`), each said in so many words
    /// in the processes' settings.
    Open,
    /// What `lime up` runs: a service and a robot login and a ring key made
    /// for this cluster ([`Credentials`]); nothing anonymous.
    Locked,
}

/// The logins and ring key a [`Security::Locked`] cluster was given.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The stages' and lime tools' login.
    pub service: (String, String),
    /// A robot's login: asks on `lime/request`, reads `lime/response/<user>/#`.
    pub robot: (String, String),
    /// The ring key every stage holds (`data.key_file`).
    pub ring_key: PathBuf,
}

impl Credentials {
    /// Fresh passwords and a fresh ring key (written, owner-only, into `dir`).
    fn make(dir: &Path) -> anyhow::Result<Self> {
        let secret = |bytes: usize| -> anyhow::Result<String> {
            let mut b = vec![0u8; bytes];
            getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            Ok(b.iter().map(|x| format!("{x:02x}")).collect())
        };
        let ring_key = dir.join("ring.key");
        write_private(&ring_key, &format!("{}\n", secret(32)?))?;
        Ok(Self {
            service: ("lime".into(), secret(16)?),
            robot: ("robot".into(), secret(12)?),
            ring_key,
        })
    }

    /// lime-broker's logins for these credentials.
    fn broker_users(&self) -> HashMap<String, User> {
        [(&self.service, Role::Service), (&self.robot, Role::Robot)]
            .into_iter()
            .map(|((user, password), role)| {
                let login = User {
                    password: password.clone(),
                    role,
                };
                (user.clone(), login)
            })
            .collect()
    }
}

/// Writes a file only its owner can read: settings with passwords, keys.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The broker's certificate and key, and the CA that everyone verifies it
/// against (PEM files).
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Where stages run when each has a network namespace of its own.
#[derive(Debug, Clone)]
pub struct Namespaces {
    pub host_ip: String,
    /// `(namespace, address)` per stage.
    pub stages: Vec<(String, String)>,
}

/// What the broker's planner is told (see `lime_broker::config::PlannerConfig`).
#[derive(Debug, Clone)]
pub struct PlannerSpec {
    /// `sporadic` or `bursty`.
    pub workload: String,
    pub concurrency: usize,
    /// Tokens of KV each sequence is planned for (also the stages' reserve).
    pub context: usize,
    /// Each stage's profile file; absent, each stage is measured in turn before
    /// the cluster starts (`lime-stage --profile`), so that no two measurements
    /// share the machine.
    pub profiles: Option<Vec<PathBuf>>,
    /// The network the planner assumes: Mb/s and latency in ms of every hop.
    pub link_mbit_per_s: f64,
    pub link_latency_ms: f64,
    /// Re-plan on measured changes (the broker's `planner.adapt`).
    pub adapt: bool,
    /// The broker's `planner.payback_s`: how soon a switch must repay itself.
    pub payback_s: f64,
    /// Prompt length the planner predicts TTFT for (the broker's
    /// `planner.prompt_tokens`).
    pub prompt_tokens: usize,
}

impl PlannerSpec {
    /// Tokens of KV the planner provisions on every stage's layers: one sequence
    /// when sporadic, all of them when bursty.
    pub fn kv_tokens(&self) -> usize {
        match self.workload.as_str() {
            "bursty" => self.context * self.concurrency.max(1),
            _ => self.context,
        }
    }

    pub fn new(workload: &str, concurrency: usize, context: usize) -> Self {
        Self {
            workload: workload.into(),
            concurrency,
            context,
            profiles: None,
            link_mbit_per_s: 10_000.0,
            link_latency_ms: 0.05,
            adapt: true,
            payback_s: PlannerConfig::default().payback_s,
            prompt_tokens: PlannerConfig::default().prompt_tokens,
        }
    }
}

/// The system a cluster runs: lime, or a baseline built from the same binary so
/// that comparisons share every kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Interleaved chunks, recurrent pipeline with many requests in flight, prefetch.
    #[default]
    Lime,
    /// MDI-LLM: contiguous partition, recurrent pipeline, layers read on demand.
    Mdi,
    /// What exo, distributed-llama or llama.cpp RPC do with a model that does not
    /// fit: contiguous partition, one request at a time, layers read on demand.
    Naive,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lime" => Ok(Self::Lime),
            "mdi" => Ok(Self::Mdi),
            "naive" => Ok(Self::Naive),
            other => Err(format!("unknown mode {other:?}: lime, mdi or naive")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Lime => "lime",
            Self::Mdi => "mdi",
            Self::Naive => "naive",
        })
    }
}

/// How each stage's memory budget is set.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Budget {
    #[default]
    Unlimited,
    Bytes(u64),
    /// This fraction of the stage's share of the weights (its layers, plus the
    /// embedding and head at the starter), plus the fixed overhead the stage
    /// reserves for itself.
    ShareFraction(f64),
    /// This fraction of the model's layers offloaded (rounded to whole layers),
    /// named in the plan, with each stage's budget the least that holds its
    /// resident layers and `max_slots` slots (one when not set).
    Offload(f64),
}

/// Memory settings for every stage.
#[derive(Debug, Clone, Default)]
pub struct MemorySpec {
    pub budget: Budget,
    /// Emulated storage read bandwidth, MB/s.
    pub read_mb_per_s: Option<f64>,
    pub direct_io: bool,
    pub max_slots: Option<usize>,
    pub activation_tokens: Option<usize>,
    pub kv_reserve_tokens: Option<usize>,
    /// Per-stage budgets in bytes, in stage order (heterogeneous devices);
    /// overrides `budget` when not empty.
    pub stage_budget_bytes: Vec<u64>,
    /// Per-stage emulated read bandwidths in MB/s; overrides `read_mb_per_s`.
    pub stage_read_mb_per_s: Vec<f64>,
}

impl MemorySpec {
    /// Stage `i`'s budget when given per stage or in bytes.
    fn stage_budget(&self, i: usize) -> Option<u64> {
        self.stage_budget_bytes
            .get(i)
            .copied()
            .or(match self.budget {
                Budget::Bytes(b) => Some(b),
                _ => None,
            })
    }

    /// Stage `i`'s emulated read bandwidth.
    fn stage_read(&self, i: usize) -> Option<f64> {
        self.stage_read_mb_per_s
            .get(i)
            .copied()
            .or(self.read_mb_per_s)
    }

    /// The stage settings these give, before the budget.
    fn config(&self, mode: Mode) -> MemoryConfig {
        let defaults = MemoryConfig::default();
        MemoryConfig {
            budget_bytes: None,
            max_slots: self.max_slots.unwrap_or(defaults.max_slots),
            prefetch: mode == Mode::Lime,
            direct_io: self.direct_io,
            read_mb_per_s: self.read_mb_per_s,
            activation_tokens: self.activation_tokens.unwrap_or(defaults.activation_tokens),
            kv_reserve_tokens: self.kv_reserve_tokens,
            overhead_bytes: defaults.overhead_bytes,
        }
    }
}

/// Each stage's budget in bytes as `fraction` of its share of the weights
/// (its layers, plus the embedding and head on the first) on an even
/// contiguous split over `stages`, plus the process's fixed overhead that the
/// stage reserves: what a device of that memory lets lime use, whatever plan
/// then runs on it.
pub fn share_budgets(
    model: &Path,
    stages: usize,
    fraction: f64,
    memory: &MemorySpec,
) -> anyhow::Result<Vec<u64>> {
    let ckpt = Checkpoint::open(model)?;
    let layers = ckpt.config().num_hidden_layers;
    let config = memory.config(Mode::Lime);
    Ok((0..stages)
        .map(|i| {
            let n = layers * (i + 1) / stages - layers * i / stages;
            let costs = lime_stage::memory::stage_costs(&ckpt, n, i == 0, &config, Placement::Cpu);
            let share = (n as u64 * costs.layer() + costs.fixed_weights()) as f64 * fraction;
            costs.overhead + share as u64
        })
        .collect())
}

/// Offloaded layers per stage: `fraction` of all layers, dealt to stages in
/// proportion to their layers (largest remainder), so the whole model's offloaded
/// share is as close to `fraction` as whole layers allow.
fn offloaded_counts(layers: &[usize], fraction: f64) -> Vec<usize> {
    let total: usize = layers.iter().sum();
    let target = (fraction.clamp(0.0, 1.0) * total as f64).round() as usize;
    let exact: Vec<f64> = layers
        .iter()
        .map(|&n| target as f64 * n as f64 / total.max(1) as f64)
        .collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..layers.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let mut missing = target - counts.iter().sum::<usize>();
    for i in order {
        if missing == 0 {
            break;
        }
        if counts[i] < layers[i] {
            counts[i] += 1;
            missing -= 1;
        }
    }
    counts
}

impl ClusterSpec {
    pub fn new(model: impl Into<PathBuf>, stages: usize, dir: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            stages,
            interleave: 1,
            cuts: None,
            external_broker: None,
            mqtt_ports: (0, 0),
            data_port: 0,
            plan_over_mqtt: false,
            login: None,
            tls: None,
            max_inflight: 0,
            dir: dir.into(),
            log: std::env::var("LIME_CLUSTER_LOG").unwrap_or_else(|_| "info".into()),
            broker_env: Vec::new(),
            stage_env: Vec::new(),
            mode: Mode::Lime,
            memory: MemorySpec::default(),
            telemetry_ms: None,
            compute_threads: None,
            compute_slowdown: 1.0,
            device: DeviceSpec::Cpu,
            planner: None,
            profiles: None,
            namespaces: None,
            security: Security::Open,
        }
    }
}

/// Running processes; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Cluster {
    children: Vec<(String, Child)>,
    /// The MQTT 5 listener lime's processes use.
    pub broker: BrokerAddr,
    /// lime-broker's plain port for MQTT 3.1.1 clients, when lime-broker runs
    /// (over TLS with [`ClusterSpec::tls`]).
    pub v4_port: Option<u16>,
    pub plan: Plan,
    pub dir: PathBuf,
    stage_env: Vec<(String, String)>,
    /// lime-broker's settings file and the spec's environment over it, to
    /// start it again; `None` with an external broker.
    broker_settings: Option<(PathBuf, Vec<(String, String)>)>,
    log: String,
    /// A locked cluster's logins and ring key.
    pub credentials: Option<Credentials>,
}

/// Each stage's budget in bytes (`None`: unlimited), following `spec.memory.budget`.
/// With [`Budget::Offload`] the plan also names each stage's offloaded layers.
fn stage_budgets(
    model: &Path,
    plan: &mut Plan,
    spec: &ClusterSpec,
) -> anyhow::Result<std::collections::HashMap<String, Option<u64>>> {
    let memory = spec.memory.config(spec.mode);
    // Sized with the stages' own read options: direct reads need a read buffer.
    let ckpt = Checkpoint::open_with(
        model,
        &lime_kernels::ReadOptions {
            direct: memory.direct_io,
            bytes_per_s: None,
        },
    )?;
    let layers: Vec<Vec<usize>> = plan
        .stages
        .iter()
        .map(|s| {
            plan.chunks_of(&s.name)
                .iter()
                .flat_map(|(_, r)| r.range())
                .collect()
        })
        .collect();
    let counts: Vec<usize> = layers.iter().map(Vec::len).collect();
    let offloaded = match spec.memory.budget {
        Budget::Offload(f) => offloaded_counts(&counts, f),
        _ => vec![0; layers.len()],
    };
    let placement = match spec.device {
        DeviceSpec::Cpu => Placement::Cpu,
        gpu => Placement::of(&gpu.open()?)?,
    };
    let mut out = std::collections::HashMap::new();
    for (i, stage) in plan.stages.iter_mut().enumerate() {
        let n = counts[i];
        let costs = lime_stage::memory::stage_costs(&ckpt, n, i == 0, &memory, placement);
        let budget = match spec.memory.budget {
            _ if !spec.memory.stage_budget_bytes.is_empty() => spec.memory.stage_budget(i),
            Budget::Unlimited => None,
            Budget::Bytes(b) => Some(b),
            Budget::ShareFraction(f) => {
                let share = n as u64 * costs.layer() + costs.fixed_weights();
                Some(costs.overhead + (share as f64 * f) as u64)
            }
            Budget::Offload(_) => {
                stage.offloaded = Some(lime_plan::memory::spread(&layers[i], offloaded[i]));
                let slots = spec
                    .memory
                    .max_slots
                    .unwrap_or(1)
                    .clamp(1, offloaded[i].max(1));
                let more = if offloaded[i] > 0 { slots - 1 } else { 0 };
                Some(costs.budget_for(n - offloaded[i]) + more as u64 * costs.layer())
            }
        };
        out.insert(stage.name.clone(), budget);
    }
    Ok(out)
}

/// A port for a child process to listen on. It is taken below Linux's ephemeral
/// range (32768 and up), so that between this check and the child's bind the
/// kernel cannot hand it to another socket bound to port 0 or connecting out (the
/// broker's internal listeners, clients of concurrent clusters). Ports are spread
/// by process and never repeat within one.
fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port between {FIRST} and {}", FIRST + SPAN)
}

/// One stage's settings file.
struct StageSettings<'a> {
    name: &'a str,
    model: &'a Path,
    plan_file: Option<&'a Path>,
    listen: Option<&'a str>,
    budget: Option<u64>,
    read_mb_per_s: Option<f64>,
    profile_file: Option<PathBuf>,
    /// The ring key; without one the ring runs `data.insecure`.
    ring_key: Option<&'a Path>,
}

impl StageSettings<'_> {
    /// The stage's settings under `spec`, reaching the broker at `broker`.
    fn config(&self, spec: &ClusterSpec, broker: &BrokerAddr) -> StageConfig {
        let mut cfg = StageConfig::new(self.name, self.model);
        cfg.plan_file = self.plan_file.map(Path::to_path_buf);
        cfg.profile_file = self.profile_file.clone();
        if let Some(ms) = spec.telemetry_ms {
            cfg.telemetry_ms = ms;
        }
        cfg.compute_threads = spec.compute_threads;
        cfg.emulate.compute_slowdown = spec.compute_slowdown;
        cfg.device = spec.device;
        cfg.broker.host = broker.host.clone();
        cfg.broker.port = broker.port;
        if let (Some(u), Some(p)) = (&broker.username, &broker.password) {
            cfg.broker.username = Some(u.clone());
            cfg.broker.password = Some(p.clone());
        }
        cfg.broker.ca_file = broker.tls.as_ref().map(|tls| tls.ca_file.clone());
        cfg.data.listen = self.listen.map(str::to_owned);
        cfg.data.key_file = self.ring_key.map(Path::to_path_buf);
        cfg.data.insecure = self.ring_key.is_none();
        if spec.mode == Mode::Naive {
            cfg.starter.max_inflight = 1;
            cfg.starter.max_sequences = 1;
        } else {
            cfg.starter.max_inflight = spec.max_inflight;
        }
        cfg.memory = MemoryConfig {
            budget_bytes: self.budget,
            read_mb_per_s: self.read_mb_per_s,
            // Under a planned budget, keep the KV room the planner provisioned:
            // every sequence of the workload at the planned context.
            kv_reserve_tokens: spec
                .planner
                .as_ref()
                .map(PlannerSpec::kv_tokens)
                .or(spec.memory.kv_reserve_tokens),
            ..spec.memory.config(spec.mode)
        };
        cfg
    }

    /// The settings file's text.
    fn to_toml(&self, spec: &ClusterSpec, broker: &BrokerAddr) -> anyhow::Result<String> {
        self.config(spec, broker).to_toml()
    }
}

/// Profiles every stage `spec` describes, in turn, into files in `spec.dir`.
pub fn profile_stages(spec: &ClusterSpec) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&spec.dir)?;
    let model = std::fs::canonicalize(&spec.model)?;
    let broker = BrokerAddr::parse("127.0.0.1:1")?;
    let configs: Vec<(String, String)> = (0..spec.stages)
        .map(|i| {
            let name = format!("s{i}");
            let settings = StageSettings {
                name: &name,
                model: &model,
                plan_file: None,
                listen: None,
                budget: spec.memory.stage_budget(i),
                read_mb_per_s: spec.memory.stage_read(i),
                profile_file: None,
                ring_key: None,
            };
            let toml = settings.to_toml(spec, &broker)?;
            Ok((name, toml))
        })
        .collect::<anyhow::Result<_>>()?;
    measure_profiles(spec, &configs)
}

/// Each stage measured in turn with its own settings (`lime-stage --profile`).
fn measure_profiles(
    spec: &ClusterSpec,
    configs: &[(String, String)],
) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::with_capacity(configs.len());
    for (name, toml) in configs {
        let config = spec.dir.join(format!("{name}.profile.toml"));
        std::fs::write(&config, toml)?;
        let out = spec.dir.join(format!("{name}.profile.json"));
        eprintln!("profiling {name} (lime-stage --profile)");
        let log = std::fs::File::create(spec.dir.join(format!("{name}.profile.log")))?;
        let status = Command::new(sibling("lime-stage")?)
            .arg("--config")
            .arg(&config)
            .arg("--profile")
            .arg("--out")
            .arg(&out)
            .env("RUST_LOG", &spec.log)
            .stdout(Stdio::null())
            .stderr(log)
            .status()?;
        anyhow::ensure!(
            status.success(),
            "profiling {name} failed ({status}); see {}",
            spec.dir.join(format!("{name}.profile.log")).display()
        );
        files.push(out);
    }
    Ok(files)
}

impl Cluster {
    pub async fn start(spec: &ClusterSpec) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&spec.dir)
            .with_context(|| format!("creating {}", spec.dir.display()))?;
        let ckpt = Checkpoint::open(&spec.model)?;
        let layers = ckpt.config().num_hidden_layers;
        let stages: Vec<PlanStage> = (0..spec.stages)
            .map(|i| {
                let port = if spec.data_port == 0 {
                    free_port()?
                } else {
                    spec.data_port + i as u16
                };
                let ip = spec
                    .namespaces
                    .as_ref()
                    .and_then(|n| n.stages.get(i))
                    .map_or("127.0.0.1", |(_, ip)| ip.as_str());
                Ok(PlanStage {
                    name: format!("s{i}"),
                    data_addr: format!("{ip}:{port}"),
                    offloaded: None,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        // Epochs only grow, also across runs against one broker with a retained plan.
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let plan_path = spec.dir.join("plan.json");
        let (plan, budgets) = if spec.planner.is_some() {
            // The broker's plan replaces this placeholder once it is published.
            let plan = Plan::even(epoch, stages, 1, layers)?;
            let budgets = plan
                .stages
                .iter()
                .enumerate()
                .map(|(i, s)| (s.name.clone(), spec.memory.stage_budget(i)))
                .collect();
            (plan, budgets)
        } else {
            let mut plan = match &spec.cuts {
                Some(cuts) => Plan::from_cuts(epoch, stages, cuts, layers)?,
                None => Plan::even(
                    epoch,
                    stages,
                    if spec.mode == Mode::Lime {
                        spec.interleave
                    } else {
                        1
                    },
                    layers,
                )?,
            };
            let budgets = stage_budgets(&spec.model, &mut plan, spec)?;
            std::fs::write(&plan_path, serde_json::to_string_pretty(&plan)?)?;
            (plan, budgets)
        };

        let mut cluster = Self {
            children: Vec::new(),
            broker: BrokerAddr::parse("127.0.0.1:0")?,
            v4_port: None,
            plan: plan.clone(),
            dir: spec.dir.clone(),
            stage_env: spec.stage_env.clone(),
            broker_settings: None,
            log: spec.log.clone(),
            credentials: match spec.security {
                Security::Locked => Some(Credentials::make(&spec.dir)?),
                Security::Open => None,
            },
        };
        let ring_key = cluster.credentials.as_ref().map(|c| c.ring_key.clone());
        // Stage configs first: the broker's planner needs their profiles.
        let model = std::fs::canonicalize(&spec.model)?;
        let settings = |i: usize, profile_file: Option<PathBuf>| {
            let stage = &plan.stages[i];
            StageSettings {
                name: &stage.name,
                model: &model,
                plan_file: (spec.planner.is_none() && !spec.plan_over_mqtt)
                    .then_some(plan_path.as_path()),
                listen: (spec.planner.is_some() || spec.plan_over_mqtt)
                    .then_some(stage.data_addr.as_str()),
                budget: budgets.get(&stage.name).copied().flatten(),
                read_mb_per_s: spec.memory.stage_read(i),
                profile_file,
                ring_key: ring_key.as_deref(),
            }
        };
        let placeholder = BrokerAddr::parse("127.0.0.1:1")?;
        let configs: Vec<(String, String)> = (0..plan.stages.len())
            .map(|i| {
                Ok((
                    plan.stages[i].name.clone(),
                    settings(i, None).to_toml(spec, &placeholder)?,
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        let profiles = match (spec.planner.as_ref().map(|p| &p.profiles), &spec.profiles) {
            (Some(Some(files)), _) | (_, Some(files)) => Some(files.clone()),
            (Some(None), None) => Some(measure_profiles(spec, &configs)?),
            (None, None) => None,
        };
        cluster.broker = match &spec.external_broker {
            Some(b) => b.clone(),
            None => {
                let v4 = if spec.mqtt_ports.0 == 0 {
                    free_port()?
                } else {
                    spec.mqtt_ports.0
                };
                let v5 = if spec.mqtt_ports.1 == 0 {
                    free_port()?
                } else {
                    spec.mqtt_ports.1
                };
                let listen = if spec.namespaces.is_some() {
                    "0.0.0.0"
                } else {
                    "127.0.0.1"
                };
                let mut cfg = BrokerConfig {
                    v4_listen: Some(format!("{listen}:{v4}")),
                    v5_listen: Some(format!("{listen}:{v5}")),
                    ..BrokerConfig::default()
                };
                if let Some(tls) = &spec.tls {
                    cfg.v4_listen = Some(String::new());
                    cfg.v5_listen = Some(String::new());
                    cfg.tls = Some(TlsSettings {
                        v4_listen: format!("{listen}:{v4}"),
                        v5_listen: format!("{listen}:{v5}"),
                        cert_file: tls.cert_file.clone(),
                        key_file: tls.key_file.clone(),
                    });
                }
                match &cluster.credentials {
                    Some(c) => {
                        cfg.users = Some(c.broker_users());
                        cfg.ring_key_file = Some(c.ring_key.clone());
                    }
                    // A spec that gives the broker logins wants them used.
                    None => {
                        cfg.allow_anonymous = !spec
                            .broker_env
                            .iter()
                            .any(|(k, _)| k.starts_with("LIME_BROKER_USERS__"))
                    }
                }
                if let Some(p) = &spec.planner {
                    let memory = spec.memory.config(spec.mode);
                    cfg.planner = PlannerConfig {
                        stages: spec.stages,
                        workload: p.workload.clone(),
                        concurrency: p.concurrency,
                        context: p.context,
                        max_slots: memory.max_slots,
                        activation_tokens: memory.activation_tokens,
                        default_mbit_per_s: p.link_mbit_per_s,
                        default_latency_ms: p.link_latency_ms,
                        adapt: p.adapt,
                        payback_s: p.payback_s,
                        prompt_tokens: p.prompt_tokens,
                        ..PlannerConfig::default()
                    };
                }
                let file = spec.dir.join("broker.toml");
                write_private(&file, &cfg.to_toml()?)?;
                cluster.broker_settings = Some((file, spec.broker_env.clone()));
                cluster.spawn_broker()?;
                cluster.v4_port = Some(v4);
                let mut addr = BrokerAddr::parse(&format!("127.0.0.1:{v5}"))?;
                if let Some(tls) = &spec.tls {
                    addr.tls = Some(lime_client::mqtt::BrokerTls::new(&tls.ca_file)?);
                }
                addr
            }
        };
        let login = match &cluster.credentials {
            Some(c) if spec.external_broker.is_none() => Some(&c.service),
            _ => spec.login.as_ref(),
        };
        if let Some((user, password)) = login {
            cluster.broker.username = Some(user.clone());
            cluster.broker.password = Some(password.clone());
        }
        wait_for_port(&cluster.broker, Duration::from_secs(10)).await?;
        if spec.plan_over_mqtt && spec.planner.is_none() {
            let mut plan = plan.clone();
            if let Some(c) = &cluster.credentials {
                lime_stage::ring::auth::load_key(&c.ring_key)?.sign(&mut plan);
            }
            publish_plan(&cluster.broker, &plan).await?;
        }
        // Stages in namespaces reach the broker through the bridge.
        let stage_broker = match &spec.namespaces {
            Some(n) => BrokerAddr {
                host: n.host_ip.clone(),
                ..cluster.broker.clone()
            },
            None => cluster.broker.clone(),
        };
        for (i, stage) in plan.stages.iter().enumerate() {
            let config = spec.dir.join(format!("{}.toml", stage.name));
            let profile = profiles.as_ref().and_then(|p| p.get(i)).cloned();
            let settings = settings(i, profile);
            std::fs::write(&config, settings.to_toml(spec, &stage_broker)?)?;
            let namespace = spec.namespaces.as_ref().and_then(|n| n.stages.get(i));
            let mut cmd = match namespace {
                Some((ns, _)) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns]).arg(sibling("lime-stage")?);
                    c
                }
                None => Command::new(sibling("lime-stage")?),
            };
            cmd.arg("--config")
                .arg(&config)
                .envs(spec.stage_env.iter().cloned());
            cluster.spawn(&stage.name, cmd, &spec.log)?;
        }
        if spec.planner.is_some() {
            cluster.plan = cluster.planned(Duration::from_secs(120)).await?;
            std::fs::write(&plan_path, serde_json::to_string_pretty(&cluster.plan)?)?;
        }
        Ok(cluster)
    }

    /// The plan lime-broker's planner publishes, once it has.
    async fn planned(&mut self, timeout: Duration) -> anyhow::Result<Plan> {
        let started = Instant::now();
        loop {
            self.check_alive()?;
            let found = lime_client::status::retained::<Plan>(
                &self.broker,
                topics::PLAN,
                Duration::from_millis(300),
            )
            .await
            .unwrap_or_default();
            if let Some(plan) = found.into_values().next() {
                return Ok(plan);
            }
            // The broker logs why it cannot plan (what does not fit, by how much).
            let log = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
            if let Some(at) = log.find("cannot plan") {
                anyhow::bail!("lime-broker {}", log[at..].trim_end());
            }
            if started.elapsed() > timeout {
                anyhow::bail!(
                    "the broker published no plan within {timeout:?}; logs in {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn spawn(&mut self, name: &str, mut cmd: Command, log: &str) -> anyhow::Result<()> {
        let log_path = self.dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log_path)?;
        let child = cmd
            .env("RUST_LOG", log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// Waits until every stage of the plan reports `online` (the starter does once
    /// the ring is closed), failing early if a process exits.
    pub async fn wait_online(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            self.check_alive()?;
            let statuses = lime_client::status::collect(&self.broker, Duration::from_millis(300))
                .await
                .unwrap_or_default();
            let online = self
                .plan
                .stages
                .iter()
                .filter(|s| {
                    statuses.iter().any(|st| {
                        st.stage == s.name
                            && st.state == StageState::Online
                            && st.epoch == Some(self.plan.epoch)
                    })
                })
                .count();
            if online == self.plan.stages.len() {
                return Ok(());
            }
            if started.elapsed() > timeout {
                // Say which stages are not online, what they last reported and
                // how their logs end: a failure in CI leaves nothing else.
                let mut detail = String::new();
                for s in &self.plan.stages {
                    let seen = statuses.iter().find(|st| st.stage == s.name);
                    let fine = seen.is_some_and(|st| {
                        st.state == StageState::Online && st.epoch == Some(self.plan.epoch)
                    });
                    if fine {
                        continue;
                    }
                    let tail = self.log_tail(&s.name, 12);
                    detail.push_str(&format!(
                        "\n{} reports {:?} (epoch {:?}, plan epoch {}); its log ends:\n{}",
                        s.name,
                        seen.map(|st| st.state),
                        seen.and_then(|st| st.epoch),
                        self.plan.epoch,
                        tail
                    ));
                }
                anyhow::bail!(
                    "{online} of {} stages online after {timeout:?}; logs in {}{detail}",
                    self.plan.stages.len(),
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fails if any process has exited, quoting the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                let name = name.clone();
                anyhow::bail!("{name} exited ({status}):\n{}", self.log_tail(&name, 15));
            }
        }
        Ok(())
    }

    /// The last `lines` lines of a process's log.
    fn log_tail(&self, name: &str, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The stages whose process has exited, each with how it ended. The
    /// broker exiting is an error: the cluster has no control plane without it.
    pub fn exited_stages(&mut self) -> anyhow::Result<Vec<(String, String)>> {
        let mut exited = Vec::new();
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                exited.push((name.clone(), status.to_string()));
            }
        }
        if let Some((_, status)) = exited.iter().find(|(n, _)| n == "broker") {
            anyhow::bail!(
                "the broker exited ({status}):\n{}",
                self.log_tail("broker", 15)
            );
        }
        Ok(exited)
    }

    /// Starts again every stage that has exited, as a supervisor does (the
    /// starter replays what the ring lost); returns who was restarted and how
    /// each had ended.
    pub fn revive_exited_stages(&mut self) -> anyhow::Result<Vec<(String, String)>> {
        let exited = self.exited_stages()?;
        for (name, _) in &exited {
            self.restart_stage(name)?;
        }
        Ok(exited)
    }

    /// Stops a stage (SIGTERM) and starts it again with the same settings; its
    /// neighbours reconnect to it on their own.
    pub fn restart_stage(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| anyhow::anyhow!("no process {name}"))?;
        let (_, mut child) = self.children.remove(i);
        terminate(&mut child);
        let old_log = self.dir.join(format!("{name}.log"));
        let _ = std::fs::rename(
            &old_log,
            self.dir.join(format!("{name}.before-restart.log")),
        );
        let mut cmd = Command::new(sibling("lime-stage")?);
        cmd.arg("--config")
            .arg(self.dir.join(format!("{name}.toml")))
            .envs(self.stage_env.iter().cloned());
        let log = self.log.clone();
        self.spawn(name, cmd, &log)
    }

    fn spawn_broker(&mut self) -> anyhow::Result<()> {
        let (file, env) = self
            .broker_settings
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("this cluster has no lime-broker"))?;
        let mut cmd = Command::new(sibling("lime-broker")?);
        cmd.arg("--config").arg(file).envs(env.iter().cloned());
        let log = self.log.clone();
        self.spawn("broker", cmd, &log)
    }

    /// Kills lime-broker (SIGKILL: a crash, retained messages and all) and
    /// starts it again on the same ports; stages and clients reconnect on their
    /// own.
    pub fn crash_and_restart_broker(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.broker_settings.is_some(),
            "this cluster has no lime-broker"
        );
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == "broker")
            .ok_or_else(|| anyhow::anyhow!("lime-broker is not running"))?;
        let (_, mut child) = self.children.remove(i);
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::rename(
            self.dir.join("broker.log"),
            self.dir.join("broker.before-restart.log"),
        );
        self.spawn_broker()
    }

    /// Process id of a stage or of the broker, for fault injection.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
    }

    /// SIGTERM to every process, then SIGKILL to any still running after 5 s.
    pub fn stop(&mut self) {
        // Stages first so their offline status reaches the broker.
        for (_, child) in self.children.iter_mut().rev() {
            terminate(child);
        }
        self.children.clear();
    }
}

/// SIGTERM, then SIGKILL if the process is still there after 5 s.
fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn wait_for_port(broker: &BrokerAddr, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if tokio::net::TcpStream::connect((broker.host.as_str(), broker.port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "the broker at {}:{} does not accept connections",
                broker.host,
                broker.port
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `plan` retained on `lime/control/plan` and waits for the broker's ack.
pub async fn publish_plan(broker: &BrokerAddr, plan: &Plan) -> anyhow::Result<()> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::Event;
    let (client, mut eventloop, _) = broker.connect("lime-plan");
    client
        .publish(
            topics::PLAN,
            QoS::AtLeastOnce,
            true,
            serde_json::to_vec(plan)?,
        )
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .map_err(|_| anyhow::anyhow!("the broker did not acknowledge the plan"))??;
        if let Event::Incoming(Packet::PubAck(_)) = event {
            break;
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    Ok(())
}
