//! A lime cluster on this machine: lime-broker (or an existing broker) and N
//! lime-stage processes on loopback. `lime up`, the benchmarks and the tests all
//! start clusters this way, so they exercise the real binaries.

use crate::mqtt::BrokerAddr;
use anyhow::Context;
use lime_kernels::Checkpoint;
use lime_schemas::{topics, Plan, PlanStage, StageState};
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
            max_inflight: 0,
            dir: dir.into(),
            log: std::env::var("LIME_CLUSTER_LOG").unwrap_or_else(|_| "info".into()),
            broker_env: Vec::new(),
            stage_env: Vec::new(),
        }
    }
}

/// Running processes; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Cluster {
    children: Vec<(String, Child)>,
    /// The MQTT 5 listener lime's processes use.
    pub broker: BrokerAddr,
    /// lime-broker's MQTT 3.1.1 port, when lime-broker runs.
    pub v4_port: Option<u16>,
    pub plan: Plan,
    pub dir: PathBuf,
    stage_env: Vec<(String, String)>,
    log: String,
}

/// A lime binary next to this one (`target/<profile>/` for tests and `cargo run`).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        // Test binaries live one level down, in deps/.
        dir = (d.file_name().is_some_and(|n| n == "deps"))
            .then(|| d.parent().map(Path::to_path_buf))
            .flatten();
    }
    anyhow::bail!(
        "{name} was not found next to {}; build every binary first: cargo build --release",
        exe.display()
    )
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Cluster {
    pub async fn start(spec: &ClusterSpec) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&spec.dir)
            .with_context(|| format!("creating {}", spec.dir.display()))?;
        let layers = Checkpoint::open(&spec.model)?.config().num_hidden_layers;
        let stages: Vec<PlanStage> = (0..spec.stages)
            .map(|i| {
                let port = if spec.data_port == 0 {
                    free_port()?
                } else {
                    spec.data_port + i as u16
                };
                Ok(PlanStage {
                    name: format!("s{i}"),
                    data_addr: format!("127.0.0.1:{port}"),
                    offloaded: None,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        // Epochs only grow, also across runs against one broker with a retained plan.
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let plan = match &spec.cuts {
            Some(cuts) => Plan::from_cuts(epoch, stages, cuts, layers)?,
            None => Plan::even(epoch, stages, spec.interleave, layers)?,
        };
        let plan_path = spec.dir.join("plan.json");
        std::fs::write(&plan_path, serde_json::to_string_pretty(&plan)?)?;

        let mut cluster = Self {
            children: Vec::new(),
            broker: BrokerAddr::parse("127.0.0.1:0")?,
            v4_port: None,
            plan: plan.clone(),
            dir: spec.dir.clone(),
            stage_env: spec.stage_env.clone(),
            log: spec.log.clone(),
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
                let mut cmd = Command::new(sibling_binary("lime-broker")?);
                cmd.env("LIME_BROKER_V4_LISTEN", format!("127.0.0.1:{v4}"))
                    .env("LIME_BROKER_V5_LISTEN", format!("127.0.0.1:{v5}"))
                    .envs(spec.broker_env.iter().cloned());
                cluster.spawn("broker", cmd, &spec.log)?;
                cluster.v4_port = Some(v4);
                BrokerAddr::parse(&format!("127.0.0.1:{v5}"))?
            }
        };
        wait_for_port(&cluster.broker, Duration::from_secs(10)).await?;
        if spec.plan_over_mqtt {
            publish_plan(&cluster.broker, &plan).await?;
        }
        let model = std::fs::canonicalize(&spec.model)?;
        for stage in &plan.stages {
            let config = spec.dir.join(format!("{}.toml", stage.name));
            let mut toml = format!(
                "name = {:?}\nmodel = {:?}\n",
                stage.name,
                model.display().to_string()
            );
            if !spec.plan_over_mqtt {
                toml.push_str(&format!(
                    "plan_file = {:?}\n",
                    plan_path.display().to_string()
                ));
            }
            toml.push_str(&format!(
                "\n[broker]\nhost = {:?}\nport = {}\n",
                cluster.broker.host, cluster.broker.port
            ));
            if let (Some(u), Some(p)) = (&cluster.broker.username, &cluster.broker.password) {
                toml.push_str(&format!("username = {u:?}\npassword = {p:?}\n"));
            }
            toml.push_str(&format!(
                "\n[starter]\nmax_inflight = {}\n",
                spec.max_inflight
            ));
            std::fs::write(&config, toml)?;
            let mut cmd = Command::new(sibling_binary("lime-stage")?);
            cmd.arg("--config")
                .arg(&config)
                .envs(spec.stage_env.iter().cloned());
            cluster.spawn(&stage.name, cmd, &spec.log)?;
        }
        Ok(cluster)
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
            let statuses = crate::status::collect(&self.broker, Duration::from_millis(300))
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
                anyhow::bail!(
                    "{online} of {} stages online after {timeout:?}; logs in {}",
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
                let log = std::fs::read_to_string(self.dir.join(format!("{name}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                anyhow::bail!("{name} exited ({status}):\n{}", tail.join("\n"));
            }
        }
        Ok(())
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
        let mut cmd = Command::new(sibling_binary("lime-stage")?);
        cmd.arg("--config")
            .arg(self.dir.join(format!("{name}.toml")))
            .envs(self.stage_env.iter().cloned());
        let log = self.log.clone();
        self.spawn(name, cmd, &log)
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
