//! `lime up`: a local cluster (broker + N stages on loopback) on the synthetic model,
//! created if missing. Stays up until Ctrl-C, or answers `--ask` prompts and stops.

use lime_client::ask;
use lime_kernels::synth::Preset;
use lime_schemas::Request;
use lime_testbench::cluster::{Budget, Cluster, ClusterSpec, Mode, PlannerSpec, Security};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How to start the cluster and what to ask it (`lime up`'s arguments).
#[derive(clap::Args)]
pub struct UpArgs {
    /// Checkpoint directory; the preset is synthesised there if it is empty.
    #[arg(long, default_value = "models/small")]
    pub model: PathBuf,
    /// Preset to synthesise when the model is missing.
    #[arg(long, default_value = "small")]
    pub preset: Preset,
    /// Stage processes.
    #[arg(long, default_value_t = 4)]
    pub stages: usize,
    /// Skip the planner: split the layers evenly (with --interleave chunks per
    /// stage) or at --cuts.
    #[arg(long)]
    pub even: bool,
    /// Chunks per stage (interleave degree) of an even split.
    #[arg(long, requires = "even")]
    pub interleave: Option<usize>,
    /// Cut the layers at these indices (e.g. 3,7,9) instead of planning.
    #[arg(long, value_delimiter = ',', requires = "even")]
    pub cuts: Option<Vec<usize>>,
    /// What the planner optimises: sporadic (time per token) or bursty (tokens/s).
    #[arg(long, default_value = "sporadic")]
    pub workload: String,
    /// Sequences at once the planner provisions KV for (bursty).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Tokens of context per sequence the planner provisions KV for.
    #[arg(long, default_value_t = 1024)]
    pub context: usize,
    /// lime-broker's MQTT 3.1.1 and MQTT 5 ports.
    #[arg(long, default_value_t = 1883)]
    pub mqtt_port: u16,
    #[arg(long, default_value_t = 1884)]
    pub mqtt5_port: u16,
    /// Use this MQTT 5 broker (host:port) instead of starting lime-broker.
    #[arg(long)]
    pub external_broker: Option<String>,
    /// First data-plane port (stage i listens on port + i).
    #[arg(long, default_value_t = 7100)]
    pub data_port: u16,
    /// Give stages the plan through the retained lime/control/plan topic.
    #[arg(long)]
    pub plan_over_mqtt: bool,
    /// Micro-batches in flight (0: one per stage).
    #[arg(long, default_value_t = 0)]
    pub max_inflight: usize,
    /// Configs, plan and logs (default: a directory under the system's temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Ask these prompts once the cluster is up, print the answers and stop.
    #[arg(long)]
    pub ask: Vec<String>,
    /// Tokens each `--ask` answer generates at most.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// lime, or one of the baselines it is measured against: mdi, naive.
    #[arg(long, default_value = "lime")]
    pub mode: Mode,
    /// Each stage's memory budget in MiB (layers beyond it are streamed from storage).
    #[arg(long, conflicts_with = "budget_share")]
    pub budget_mib: Option<u64>,
    /// Each stage's memory budget as a share of its weights (e.g. 0.5).
    #[arg(long)]
    pub budget_share: Option<f64>,
    /// Emulated storage read bandwidth in MB/s (for trying offloading on a fast disk).
    #[arg(long)]
    pub read_mb_s: Option<f64>,
    /// Read streamed layers with O_DIRECT, bypassing the page cache.
    #[arg(long)]
    pub direct_io: bool,
    /// No logins and no ring key: anonymous MQTT on loopback
    /// (allow_anonymous) and an unauthenticated data plane (data.insecure).
    /// Without it the cluster gets a service and a robot login and a ring key
    /// of its own, printed when it is up.
    #[arg(long)]
    pub insecure: bool,
}

impl UpArgs {
    /// The cluster these arguments describe.
    fn spec(&self) -> anyhow::Result<ClusterSpec> {
        let dir = self.dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("lime-up-{}", std::process::id()))
        });
        let mut spec = ClusterSpec::new(&self.model, self.stages, dir);
        spec.interleave = self.interleave.unwrap_or(1);
        spec.cuts = self.cuts.clone();
        // The broker's planner decides unless told otherwise (the baselines and
        // share budgets are defined on even splits; an outside broker runs none).
        let planned = !self.even
            && self.mode == Mode::Lime
            && self.budget_share.is_none()
            && self.external_broker.is_none()
            && !self.plan_over_mqtt;
        if planned {
            self.workload
                .parse::<lime_plan::WorkloadKind>()
                .map_err(anyhow::Error::msg)?;
            spec.planner = Some(PlannerSpec::new(
                &self.workload,
                self.concurrency,
                self.context,
            ));
        }
        spec.mqtt_ports = (self.mqtt_port, self.mqtt5_port);
        spec.external_broker = self
            .external_broker
            .as_deref()
            .map(lime_client::mqtt::BrokerAddr::parse)
            .transpose()?;
        spec.data_port = self.data_port;
        spec.plan_over_mqtt = self.plan_over_mqtt;
        spec.max_inflight = self.max_inflight;
        spec.mode = self.mode;
        spec.memory.budget = match (self.budget_mib, self.budget_share) {
            (Some(mib), _) => Budget::Bytes(mib << 20),
            (None, Some(share)) => Budget::ShareFraction(share),
            (None, None) => Budget::Unlimited,
        };
        spec.memory.read_mb_per_s = self.read_mb_s;
        spec.memory.direct_io = self.direct_io;
        spec.security = if self.insecure {
            Security::Open
        } else {
            Security::Locked
        };
        Ok(spec)
    }
}

/// Starts the cluster, then serves until Ctrl-C or answers the `--ask` prompts.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let spec = args.spec()?;
    lime_client::synth::ensure(args.preset, &spec.model)?;
    let started = Instant::now();
    eprintln!(
        "starting {} stages on {} (logs in {})",
        spec.stages,
        spec.model.display(),
        spec.dir.display()
    );
    let mut cluster = Cluster::start(&spec).await?;
    cluster.wait_online(Duration::from_secs(300)).await?;
    let statuses =
        lime_client::status::collect(&cluster.broker, Duration::from_millis(300)).await?;
    eprint!("{}", lime_client::status::table(&statuses));
    eprintln!(
        "cluster up in {:.1}s: MQTT 5 on {}:{}{}",
        started.elapsed().as_secs_f64(),
        cluster.broker.host,
        cluster.broker.port,
        cluster
            .v4_port
            .map(|p| format!(", MQTT 3.1.1 on 127.0.0.1:{p}"))
            .unwrap_or_default()
    );
    if args.ask.is_empty() {
        let v4 = cluster.v4_port.unwrap_or(cluster.broker.port);
        let (host, port) = (&cluster.broker.host, cluster.broker.port);
        match &cluster.credentials {
            Some(c) if spec.external_broker.is_none() => {
                let (robot, pw) = &c.robot;
                eprintln!(
                    "logins: robot {robot:?} password {pw:?}; the stages' service login {:?} password {:?}; ring key {}",
                    c.service.0,
                    c.service.1,
                    c.ring_key.display()
                );
                eprintln!(
                    "ask with:  LIME_MQTT_PASSWORD={pw} lime ask --broker {host}:{port} --user {robot} \"Hello\""
                );
                eprintln!(
                    "or:        mosquitto_sub -p {v4} -u {robot} -P {pw} -t 'lime/response/{robot}/demo' & mosquitto_pub -p {v4} -u {robot} -P {pw} -t lime/request -q 1 -m '{{\"id\":\"demo\",\"prompt\":\"Hello\"}}'"
                );
            }
            _ => {
                eprintln!("ask with:  lime ask --broker {host}:{port} \"Hello\"");
                eprintln!(
                    "or:        mosquitto_sub -p {v4} -t 'lime/response/demo' & mosquitto_pub -p {v4} -t lime/request -q 1 -m '{{\"id\":\"demo\",\"prompt\":\"Hello\"}}'"
                );
            }
        }
        eprintln!("Ctrl-C stops the cluster");
        wait_for_ctrl_c(&mut cluster).await?;
    } else {
        let requests: Vec<Request> = args
            .ask
            .iter()
            .map(|p| Request {
                prompt: Some(p.clone()),
                max_tokens: Some(args.max_tokens),
                ..Default::default()
            })
            .collect();
        let answers = ask::ask_all(
            &cluster.broker,
            &requests,
            Duration::from_secs(600),
            |_, _| {},
        )
        .await?;
        for (prompt, answer) in args.ask.iter().zip(&answers) {
            println!("> {prompt}");
            match &answer.outcome {
                Ok(f) => {
                    println!("{}", answer.text);
                    eprintln!("  [{}]", ask::summary(f));
                }
                Err(e) => println!("error {:?}: {}", e.error.code, e.error.message),
            }
        }
    }
    eprintln!("stopping the cluster");
    cluster.stop();
    Ok(())
}

async fn wait_for_ctrl_c(cluster: &mut Cluster) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut supervisor = Supervisor::default();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(250)) => supervisor.tend(cluster)?,
        }
    }
}

/// Restarts stages that die, as systemd's `Restart=on-failure` does in the
/// field: at once the first time, then after a back-off that doubles up to
/// 30 s for a stage that keeps dying within a minute of its last start. The
/// starter replays the requests the ring lost, so a death costs them time, not
/// their answers.
#[derive(Default)]
struct Supervisor {
    /// Per stage: when it was last restarted and the back-off before the next.
    restarts: std::collections::HashMap<String, (Instant, Duration)>,
}

impl Supervisor {
    const FIRST: Duration = Duration::from_millis(500);
    const MOST: Duration = Duration::from_secs(30);
    const CALM: Duration = Duration::from_secs(60);

    fn tend(&mut self, cluster: &mut Cluster) -> anyhow::Result<()> {
        for (name, how) in cluster.exited_stages()? {
            let last = self.restarts.get(&name).copied();
            // A stage in its back-off is left for a later round.
            if last.is_some_and(|(at, wait)| at.elapsed() < wait) {
                continue;
            }
            cluster.restart_stage(&name)?;
            let wait = match last {
                Some((at, wait)) if at.elapsed() < Self::CALM => (wait * 2).min(Self::MOST),
                _ => Self::FIRST,
            };
            self.restarts.insert(name.clone(), (Instant::now(), wait));
            eprintln!("{name} exited ({how}); restarted it (next back-off {wait:?})");
        }
        Ok(())
    }
}
