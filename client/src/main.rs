//! `lime`: the user's command line. Parsing only; the work is in the library.

mod generate;
mod plan;
mod up;

use clap::{Args, Parser, Subcommand};
use generate::GenerateArgs;
use lime_kernels::synth::{Preset, StoredDtype};
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
    Generate(GenerateArgs),
    /// Start a local cluster: lime-broker and N lime-stage processes on loopback.
    Up(up::UpArgs),
    /// Send a prompt to a cluster and stream the answer.
    Ask(AskCli),
    /// Plan a model's partition over devices: chunks, order, interleave, resident
    /// sets, with the predicted TTFT, time per token and tokens/s.
    Plan(plan::PlanArgs),
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
        #[command(flatten)]
        bench: lime_testbench::serving::ServingBench,
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
        #[command(flatten)]
        bench: lime_testbench::validation::ValidateBench,
        /// Only the setups whose names contain one of these.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Device emulation's proof: a resident pipeline with one micro-batch in
    /// flight against one per stage, without and with paced compute.
    Fill {
        #[command(flatten)]
        bench: lime_testbench::fill::FillBench,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// lime against the naive and mdi baselines on a model that does not fit its
    /// stages' memory budgets, with emulated storage bandwidth.
    Offload {
        #[command(flatten)]
        bench: lime_testbench::offloading::OffloadBench,
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
        #[command(flatten)]
        bench: lime_testbench::device_bench::DeviceBench,
        /// The dtype the `bench` preset is synthesised in when --model is empty.
        #[arg(long, default_value = "bf16")]
        dtype: StoredDtype,
        /// Also print the report as JSON.
        #[arg(long)]
        json: bool,
    },
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
        Command::Generate(g) => generate::run(&g),
        Command::Up(u) => block_on(up::run(u)),
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
        Command::Plan(p) => plan::run(&p),
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
            BenchCommand::Serving { bench, json } => {
                lime_client::synth::ensure(Preset::Bench, &bench.model)?;
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
                mut bench,
                only,
                json,
            } => {
                lime_client::synth::ensure(Preset::Bench, &bench.model)?;
                bench.setups.retain(|s| {
                    only.is_empty() || only.iter().any(|o| s.name.contains(o.as_str()))
                });
                let report = block_on(lime_testbench::validation::run(&bench))?;
                print_report(&report, json)
            }
            BenchCommand::Fill { bench, json } => {
                let report = block_on(lime_testbench::fill::run(&bench))?;
                print_report(&report, json)
            }
            BenchCommand::Offload { bench, json } => {
                let report = block_on(lime_testbench::offloading::run(&bench))?;
                print_report(&report, json)
            }
            BenchCommand::Device { bench, dtype, json } => {
                if !bench.model.join("config.json").exists() {
                    lime_client::synth::run(Preset::Bench, dtype, 0, &bench.model)?;
                }
                let report = lime_testbench::device_bench::run(&bench)?;
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
