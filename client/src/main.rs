//! `lime`: the user's command line. Parsing only; the work is in the library.

mod generate;
mod plan;
mod up;

use clap::{Args, Parser, Subcommand};
use generate::GenerateArgs;
use lime_kernels::synth::{Preset, StoredDtype};
use lime_schemas::SamplingParams;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "lime",
    version,
    about = "Lossless LLM inference on memory-constrained edge devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a random-weight Llama checkpoint in the Hugging Face layout.
    Synth {
        /// tiny (~3 MB, tests), small (~100 MB), bench (~750 MB, benchmarks).
        #[arg(long, default_value = "tiny")]
        preset: Preset,
        /// Stored dtype: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: StoredDtype,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Directory to write (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate from a checkpoint in this one process (the reference output).
    Generate(GenerateCli),
    /// Start a local cluster: lime-broker and N lime-stage processes on loopback.
    Up(UpCli),
    /// Send a prompt to a cluster and stream the answer.
    Ask(AskCli),
    /// Plan a model's partition over devices: chunks, order, interleave, resident
    /// sets, with the predicted TTFT, time per token and tokens/s.
    Plan(PlanCli),
    /// Show the stages of a cluster, from their retained status.
    Status {
        /// MQTT 5 listener of the cluster's broker.
        #[arg(long, default_value = "127.0.0.1:1884")]
        broker: String,
        #[command(flatten)]
        login: LoginCli,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Keep a local cluster busy for a bounded time (bursts of requests, some
    /// malformed, robots that hang up mid-answer) and check that every request
    /// was answered or refused once and memory stayed flat.
    Soak {
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        #[arg(long, default_value_t = 4)]
        robots: usize,
        #[arg(long, default_value_t = 3)]
        stages: usize,
        /// Checkpoint to serve (the tiny preset is written there if missing).
        #[arg(long, default_value = "models/tiny")]
        model: PathBuf,
        /// Configs and logs of the cluster.
        #[arg(long, default_value = "target/soak")]
        dir: PathBuf,
    },
    /// A cluster of N stages against one process serving the same model, sporadic
    /// and bursty requests, through the whole MQTT path.
    Serving {
        /// Checkpoint directory; the `bench` preset is synthesised there if empty.
        #[arg(long, default_value = "models/bench")]
        model: PathBuf,
        #[arg(long, default_value_t = 4)]
        stages: usize,
        /// Sporadic requests, sent one at a time.
        #[arg(long, default_value_t = 8)]
        sporadic: usize,
        /// Bursty requests, sent at once.
        #[arg(long, default_value_t = 32)]
        burst: usize,
        #[arg(long, default_value_t = 32)]
        max_tokens: u32,
        /// Starter's micro-batches in flight (0: one per stage).
        #[arg(long, default_value_t = 0)]
        max_inflight: usize,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Throughput through a bandwidth swing (1 Gb/s, 50 Mb/s, 1 Gb/s) on four
    /// stages in network namespaces (needs root): the adaptive planner against
    /// the first plan held fixed. Writes swing.svg and swing.md to --out.
    Swing {
        /// Checkpoint directory; the `small` preset is synthesised there if empty.
        #[arg(long, default_value = "models/small")]
        model: PathBuf,
        #[arg(long, default_value = "swing")]
        out: PathBuf,
        /// The bandwidth of the middle phase, Mb/s.
        #[arg(long, default_value_t = 50.0)]
        low_mbit: f64,
        /// How long the middle phase lasts, seconds.
        #[arg(long, default_value_t = 16.0)]
        low_s: f64,
    },
    /// The cost model against measurement: for several emulated device setups,
    /// the planner's plan, an even split and a memory-proportional split,
    /// predicted and measured side by side.
    ValidatePlan {
        /// Checkpoint directory; the `bench` preset is synthesised there if empty.
        #[arg(long, default_value = "models/bench")]
        model: PathBuf,
        /// Only the setups whose names contain one of these.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Sporadic requests per measurement.
        #[arg(long, default_value_t = 2)]
        requests: usize,
        #[arg(long, default_value_t = 10)]
        max_tokens: u32,
        /// Sequences at once in bursty setups.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Tokens of KV per sequence planned for.
        #[arg(long, default_value_t = 256)]
        context: usize,
        /// Compute threads per stage.
        #[arg(long, default_value_t = 1)]
        compute_threads: usize,
        #[arg(long)]
        json: bool,
    },
    /// lime against the naive and mdi baselines on a model that does not fit its
    /// stages' memory budgets, with emulated storage bandwidth.
    Offload {
        /// Checkpoint directory; the `bench` preset is synthesised there if empty.
        #[arg(long, default_value = "models/bench")]
        model: PathBuf,
        #[arg(long, default_value_t = 4)]
        stages: usize,
        /// lime's interleave degree (the baselines are contiguous).
        #[arg(long, default_value_t = 4)]
        interleave: usize,
        /// Each stage's memory budget as a share of its weights.
        #[arg(long, default_value_t = 0.5)]
        share: f64,
        /// Emulated storage: reading a layer takes this many times computing it at batch 1.
        #[arg(long, default_value_t = 3.0)]
        read_ratio: f64,
        /// Emulated read bandwidth in MB/s, instead of deriving it from --read-ratio.
        #[arg(long)]
        read_mb_s: Option<f64>,
        #[arg(long, default_value_t = 4)]
        sporadic: usize,
        #[arg(long, default_value_t = 32)]
        burst: usize,
        #[arg(long, default_value_t = 32)]
        max_tokens: u32,
        /// Largest micro-batch in tokens (its activation workspace is budgeted).
        #[arg(long, default_value_t = 64)]
        activation_tokens: usize,
        /// lime's micro-batches in flight (0: one per stage).
        #[arg(long, default_value_t = 1)]
        max_inflight: usize,
        /// Compute threads per stage (the emulated devices share this machine).
        #[arg(long, default_value_t = 1)]
        compute_threads: usize,
        /// Modes to run, of lime, mdi and naive.
        #[arg(long, value_delimiter = ',', default_value = "naive,mdi,lime")]
        modes: Vec<lime_testbench::cluster::Mode>,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Single-process decode and prefill throughput against the memory roofline.
    Kernels {
        /// Checkpoint directory; the `bench` preset is synthesised there if empty.
        #[arg(long, default_value = "models/bench")]
        model: PathBuf,
        /// Decode steps timed per batch size.
        #[arg(long, default_value_t = 24)]
        steps: usize,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Batch-1 decode on one device (`cpu`, or `cuda:N` in a build with the
    /// `cuda` feature) against its memory roofline, then with the last layers
    /// streamed from storage: tokens/s and loading bubbles.
    Device {
        /// Checkpoint directory; the `bench` preset is synthesised there (in
        /// --dtype) if empty.
        #[arg(long, default_value = "models/bench-bf16")]
        model: PathBuf,
        #[arg(long, default_value = "bf16")]
        dtype: StoredDtype,
        #[arg(long, default_value = "cpu")]
        device: lime_kernels::DeviceSpec,
        /// Decode steps timed per run.
        #[arg(long, default_value_t = 32)]
        steps: usize,
        /// Share of the layers offloaded in the streaming run.
        #[arg(long, default_value_t = 0.5)]
        offload_share: f64,
        #[arg(long, default_value_t = 2)]
        slots: usize,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct UpCli {
    /// Checkpoint directory; the preset is synthesised there if it is empty.
    #[arg(long, default_value = "models/small")]
    model: PathBuf,
    /// Preset to synthesise when the model is missing.
    #[arg(long, default_value = "small")]
    preset: Preset,
    /// Stage processes.
    #[arg(long, default_value_t = 4)]
    stages: usize,
    /// Skip the planner: split the layers evenly (with --interleave chunks per
    /// stage) or at --cuts.
    #[arg(long)]
    even: bool,
    /// Chunks per stage (interleave degree) of an even split.
    #[arg(long, requires = "even")]
    interleave: Option<usize>,
    /// Cut the layers at these indices (e.g. 3,7,9) instead of planning.
    #[arg(long, value_delimiter = ',', requires = "even")]
    cuts: Option<Vec<usize>>,
    /// What the planner optimises: sporadic (time per token) or bursty (tokens/s).
    #[arg(long, default_value = "sporadic")]
    workload: String,
    /// Sequences at once the planner provisions KV for (bursty).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Tokens of context per sequence the planner provisions KV for.
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// lime-broker's MQTT 3.1.1 and MQTT 5 ports.
    #[arg(long, default_value_t = 1883)]
    mqtt_port: u16,
    #[arg(long, default_value_t = 1884)]
    mqtt5_port: u16,
    /// Use this MQTT 5 broker (host:port) instead of starting lime-broker.
    #[arg(long)]
    external_broker: Option<String>,
    /// First data-plane port (stage i listens on port + i).
    #[arg(long, default_value_t = 7100)]
    data_port: u16,
    /// Give stages the plan through the retained lime/control/plan topic.
    #[arg(long)]
    plan_over_mqtt: bool,
    /// Micro-batches in flight (0: one per stage).
    #[arg(long, default_value_t = 0)]
    max_inflight: usize,
    /// Configs, plan and logs (default: a directory under the system's temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Ask these prompts once the cluster is up, print the answers and stop.
    #[arg(long)]
    ask: Vec<String>,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// lime, or one of the baselines it is measured against: mdi, naive.
    #[arg(long, default_value = "lime")]
    mode: lime_testbench::cluster::Mode,
    /// Each stage's memory budget in MiB (layers beyond it are streamed from storage).
    #[arg(long, conflicts_with = "budget_share")]
    budget_mib: Option<u64>,
    /// Each stage's memory budget as a share of its weights (e.g. 0.5).
    #[arg(long)]
    budget_share: Option<f64>,
    /// Emulated storage read bandwidth in MB/s (for trying offloading on a fast disk).
    #[arg(long)]
    read_mb_s: Option<f64>,
    /// Read streamed layers with O_DIRECT, bypassing the page cache.
    #[arg(long)]
    direct_io: bool,
    /// No logins and no ring key: anonymous MQTT on loopback
    /// (allow_anonymous) and an unauthenticated data plane (data.insecure).
    /// Without it the cluster gets a service and a robot login and a ring key
    /// of its own, printed when it is up.
    #[arg(long)]
    insecure: bool,
}

/// A login at the broker (what `lime up` prints, or one of lime-broker's
/// `[users]`).
#[derive(Args)]
struct LoginCli {
    /// User name at the broker.
    #[arg(long)]
    user: Option<String>,
    /// Its password; else the LIME_MQTT_PASSWORD environment variable, which
    /// keeps it out of the shell's history and `ps`.
    #[arg(long, requires = "user")]
    password: Option<String>,
}

impl LoginCli {
    fn apply(self, broker: &mut lime_client::mqtt::BrokerAddr) -> anyhow::Result<()> {
        let Some(user) = self.user else {
            return Ok(());
        };
        let password = match self.password {
            Some(p) => p,
            None => std::env::var("LIME_MQTT_PASSWORD").map_err(|_| {
                anyhow::anyhow!("--user {user} needs --password or LIME_MQTT_PASSWORD")
            })?,
        };
        broker.username = Some(user);
        broker.password = Some(password);
        Ok(())
    }
}

#[derive(Args)]
struct AskCli {
    prompt: String,
    /// MQTT 5 listener of the cluster's broker.
    #[arg(long, default_value = "127.0.0.1:1884")]
    broker: String,
    #[command(flatten)]
    login: LoginCli,
    /// Send the prompt as a one-message chat (rendered with the model's template).
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings.
    #[arg(long)]
    stop: Vec<String>,
    /// Seconds to wait for the whole answer.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Args)]
struct GenerateCli {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (tokenized with the checkpoint's tokenizer, BOS added).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as token ids, comma or space separated, used as given.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print generated token ids instead of text.
    #[arg(long)]
    print_ids: bool,
    /// Write every step's logits (f32 little-endian, vocab per step) to this file.
    #[arg(long)]
    logits_out: Option<PathBuf>,
}

#[derive(Args)]
struct PlanCli {
    /// A checkpoint directory, or a `config.json` alone.
    #[arg(long)]
    model: PathBuf,
    /// Device profiles: one profile, or a list of `[[device]]` entries (TOML or JSON).
    #[arg(long)]
    devices: PathBuf,
    /// The network: a default link and exceptions (TOML or JSON).
    #[arg(long)]
    links: PathBuf,
    /// sporadic (minimise time per token) or bursty (maximise tokens/s).
    #[arg(long, default_value = "sporadic")]
    workload: lime_plan::WorkloadKind,
    /// Sequences generating at once, for the bursty workload.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Tokens of context each sequence's KV cache is planned for.
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Prompt length for the predicted time to first token.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Most layer slots a stage streams through.
    #[arg(long, default_value_t = 2)]
    max_slots: usize,
    /// The stages' activation workspace in tokens.
    #[arg(long, default_value_t = 512)]
    activation_tokens: usize,
    /// Largest interleave degree considered.
    #[arg(long, default_value_t = 8)]
    max_interleave: usize,
    /// Also print the plan document as JSON.
    #[arg(long)]
    json: bool,
    /// Write the plan document here.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("lime: error: {e:#}");
        std::process::exit(1);
    }
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// A benchmark's report as a table, and as JSON when asked.
fn print_report(
    report: &(impl std::fmt::Display + serde::Serialize),
    json: bool,
) -> anyhow::Result<()> {
    println!("{report}");
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Synth {
            preset,
            dtype,
            seed,
            out,
        } => lime_client::synth::run(preset, dtype, seed, &out),
        Command::Generate(g) => generate::run(&GenerateArgs {
            model: g.model,
            prompt: g.prompt,
            prompt_ids: g.prompt_ids,
            max_tokens: g.max_tokens,
            sampling: SamplingParams {
                temperature: g.temperature,
                top_p: g.top_p,
                top_k: g.top_k,
                repetition_penalty: g.repetition_penalty,
                seed: g.seed,
            },
            ignore_eos: g.ignore_eos,
            print_ids: g.print_ids,
            logits_out: g.logits_out,
        }),
        Command::Up(u) => {
            let dir = u.dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("lime-up-{}", std::process::id()))
            });
            let mut spec = lime_testbench::cluster::ClusterSpec::new(u.model, u.stages, dir);
            spec.interleave = u.interleave.unwrap_or(1);
            spec.cuts = u.cuts;
            // The broker's planner decides unless told otherwise (the baselines and
            // share budgets are defined on even splits; an outside broker runs none).
            let planned = !u.even
                && u.mode == lime_testbench::cluster::Mode::Lime
                && u.budget_share.is_none()
                && u.external_broker.is_none()
                && !u.plan_over_mqtt;
            if planned {
                u.workload
                    .parse::<lime_plan::WorkloadKind>()
                    .map_err(anyhow::Error::msg)?;
                spec.planner = Some(lime_testbench::cluster::PlannerSpec::new(
                    &u.workload,
                    u.concurrency,
                    u.context,
                ));
            }
            spec.mqtt_ports = (u.mqtt_port, u.mqtt5_port);
            spec.external_broker = u
                .external_broker
                .as_deref()
                .map(lime_client::mqtt::BrokerAddr::parse)
                .transpose()?;
            spec.data_port = u.data_port;
            spec.plan_over_mqtt = u.plan_over_mqtt;
            spec.max_inflight = u.max_inflight;
            spec.mode = u.mode;
            spec.memory.budget = match (u.budget_mib, u.budget_share) {
                (Some(mib), _) => lime_testbench::cluster::Budget::Bytes(mib << 20),
                (None, Some(share)) => lime_testbench::cluster::Budget::ShareFraction(share),
                (None, None) => lime_testbench::cluster::Budget::Unlimited,
            };
            spec.memory.read_mb_per_s = u.read_mb_s;
            spec.memory.direct_io = u.direct_io;
            spec.security = if u.insecure {
                lime_testbench::cluster::Security::Open
            } else {
                lime_testbench::cluster::Security::Locked
            };
            block_on(up::run(up::UpArgs {
                spec,
                preset: u.preset,
                asks: u.ask,
                max_tokens: u.max_tokens,
            }))
        }
        Command::Ask(a) => {
            let mut broker = lime_client::mqtt::BrokerAddr::parse(&a.broker)?;
            a.login.apply(&mut broker)?;
            let mut request = lime_schemas::Request {
                max_tokens: Some(a.max_tokens),
                temperature: a.temperature,
                top_p: a.top_p,
                top_k: a.top_k,
                seed: a.seed,
                stop: (!a.stop.is_empty()).then_some(lime_schemas::request::Stop::Many(a.stop)),
                ..Default::default()
            };
            if a.chat {
                request.messages = Some(vec![lime_schemas::ChatMessage {
                    role: "user".into(),
                    content: a.prompt,
                }]);
            } else {
                request.prompt = Some(a.prompt);
            }
            let timeout = std::time::Duration::from_secs(a.timeout);
            let done = block_on(lime_client::ask::ask_one(&broker, request, timeout))?;
            eprintln!("{}", lime_client::ask::summary(&done));
            Ok(())
        }
        Command::Plan(p) => plan::run(&plan::PlanArgs {
            model: p.model,
            devices: p.devices,
            links: p.links,
            workload: p.workload,
            concurrency: p.concurrency,
            context: p.context,
            prompt_tokens: p.prompt_tokens,
            runtime: lime_plan::Runtime {
                max_slots: p.max_slots,
                activation_tokens: p.activation_tokens,
                max_interleave: p.max_interleave,
            },
            json: p.json,
            out: p.out,
        }),
        Command::Status { broker, login } => {
            let mut broker = lime_client::mqtt::BrokerAddr::parse(&broker)?;
            login.apply(&mut broker)?;
            let stages = block_on(lime_client::status::collect(
                &broker,
                std::time::Duration::from_millis(500),
            ))?;
            if stages.is_empty() {
                println!("no stages have reported to {}:{}", broker.host, broker.port);
            } else {
                print!("{}", lime_client::status::table(&stages));
            }
            Ok(())
        }
        Command::Bench { what } => match what {
            BenchCommand::Soak {
                seconds,
                robots,
                stages,
                model,
                dir,
            } => {
                lime_client::synth::ensure(Preset::Tiny, &model)?;
                let spec = lime_testbench::cluster::ClusterSpec::new(&model, stages, &dir);
                let mut soak =
                    lime_testbench::soak::SoakSpec::new(std::time::Duration::from_secs(seconds));
                soak.robots = robots;
                let report = block_on(async {
                    let mut cluster = lime_testbench::cluster::Cluster::start(&spec).await?;
                    cluster
                        .wait_online(std::time::Duration::from_secs(120))
                        .await?;
                    eprintln!("soak: {stages} stages online; {robots} robots for {seconds} s");
                    let report =
                        lime_testbench::soak::run(&cluster, &soak, |m| eprintln!("soak: {m}"))
                            .await;
                    cluster.check_alive()?;
                    cluster.stop();
                    report
                })?;
                print!("{}", report.render());
                anyhow::ensure!(
                    report.held(),
                    "the soak found lost, duplicated or wrongly handled replies"
                );
                Ok(())
            }
            BenchCommand::Serving {
                model,
                stages,
                sporadic,
                burst,
                max_tokens,
                max_inflight,
                json,
            } => {
                lime_client::synth::ensure(Preset::Bench, &model)?;
                let dir = std::env::temp_dir().join(format!("lime-bench-{}", std::process::id()));
                let bench = lime_testbench::serving::ServingBench {
                    model,
                    stages,
                    sporadic,
                    burst,
                    max_tokens,
                    max_inflight,
                    dir,
                };
                let report = block_on(lime_testbench::serving::run(&bench))?;
                print_report(&report, json)
            }
            BenchCommand::Swing {
                model,
                out,
                low_mbit,
                low_s,
            } => {
                lime_client::synth::ensure(Preset::Small, &model)?;
                let model = std::fs::canonicalize(&model)?;
                let report = block_on(lime_testbench::swing::bench(&model, &out, low_mbit, low_s))?;
                println!("{report}");
                Ok(())
            }
            BenchCommand::ValidatePlan {
                model,
                only,
                requests,
                max_tokens,
                concurrency,
                context,
                compute_threads,
                json,
            } => {
                lime_client::synth::ensure(Preset::Bench, &model)?;
                let setups = lime_testbench::validation::default_setups()
                    .into_iter()
                    .filter(|s| only.is_empty() || only.iter().any(|o| s.name.contains(o.as_str())))
                    .collect();
                let bench = lime_testbench::validation::ValidateBench {
                    model,
                    setups,
                    requests,
                    max_tokens,
                    concurrency,
                    context,
                    compute_threads,
                    dir: std::env::temp_dir().join(format!("lime-validate-{}", std::process::id())),
                };
                let report = block_on(lime_testbench::validation::run(&bench))?;
                print_report(&report, json)
            }
            BenchCommand::Offload {
                model,
                stages,
                interleave,
                share,
                read_ratio,
                read_mb_s,
                sporadic,
                burst,
                max_tokens,
                activation_tokens,
                max_inflight,
                compute_threads,
                modes,
                json,
            } => {
                let bench = lime_testbench::offloading::OffloadBench {
                    model,
                    stages,
                    interleave,
                    share,
                    read_ratio,
                    read_mb_per_s: read_mb_s,
                    sporadic,
                    burst,
                    max_tokens,
                    activation_tokens,
                    modes,
                    max_inflight,
                    compute_threads,
                    dir: std::env::temp_dir()
                        .join(format!("lime-bench-offload-{}", std::process::id())),
                };
                let report = block_on(lime_testbench::offloading::run(&bench))?;
                print_report(&report, json)
            }
            BenchCommand::Device {
                model,
                dtype,
                device,
                steps,
                offload_share,
                slots,
                json,
            } => {
                if !model.join("config.json").exists() {
                    lime_client::synth::run(Preset::Bench, dtype, 0, &model)?;
                }
                let report = lime_testbench::device_bench::run(
                    &lime_testbench::device_bench::DeviceBench {
                        model,
                        device,
                        steps,
                        offload_share,
                        slots,
                    },
                )?;
                print_report(&report, json)
            }
            BenchCommand::Kernels { model, steps, json } => {
                lime_client::synth::ensure(Preset::Bench, &model)?;
                let report = lime_testbench::kernels::kernels(&model, steps)?;
                print_report(&report, json)
            }
        },
    }
}
