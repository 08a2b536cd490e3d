//! `lime up`: a local cluster (broker + N stages on loopback) on the synthetic model,
//! created if missing. Stays up until Ctrl-C, or answers `--ask` prompts and stops.

use lime_client::ask;
use lime_kernels::synth::Preset;
use lime_schemas::Request;
use lime_testbench::cluster::{Cluster, ClusterSpec};
use std::time::{Duration, Instant};

pub struct UpArgs {
    pub spec: ClusterSpec,
    /// Synthesise this preset into `spec.model` when it holds no checkpoint.
    pub preset: Preset,
    pub asks: Vec<String>,
    pub max_tokens: u32,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    lime_client::synth::ensure(args.preset, &args.spec.model)?;
    let started = Instant::now();
    eprintln!(
        "starting {} stages on {} (logs in {})",
        args.spec.stages,
        args.spec.model.display(),
        args.spec.dir.display()
    );
    let mut cluster = Cluster::start(&args.spec).await?;
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
    if args.asks.is_empty() {
        let v4 = cluster.v4_port.unwrap_or(cluster.broker.port);
        let (host, port) = (&cluster.broker.host, cluster.broker.port);
        match &cluster.credentials {
            Some(c) if args.spec.external_broker.is_none() => {
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
            .asks
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
        for (prompt, answer) in args.asks.iter().zip(&answers) {
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
