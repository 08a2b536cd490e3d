//! A stage's life in phases: settings (the ring key, systemd, the MQTT link, a
//! `starting` status), the plan, the ring, the weights, serving, and the drain
//! when the shutdown fires. The ring's phase comes before the weights so that
//! the previous stage's link is up by the time this stage has loaded. Each
//! phase says what it waits for (systemd status, a `phase` span), so that a
//! stage stuck in start-up tells where.

use crate::config::StageConfig;
use crate::control::{self, Inbox, RequestSink};
use crate::pipeline::{self, Event, Note};
use crate::ring::{self, auth, topology};
use crate::service::Service;
use crate::shutdown::{self, Shutdown, Trigger};
use crate::starter::{self, chat, inflow, intake, recent};
use crate::worker;
use anyhow::Context;
use lime_kernels::{Checkpoint, ReadOptions, TextTokenizer};
use lime_schemas::signing::RingKey;
use lime_schemas::{Frame, LayerRange, MemoryUse, Plan, Role, StageState, StageStatus};
use rumqttc::v5::AsyncClient;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc::UnboundedSender, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// How long the MQTT loop and the reply publisher get to flush the last
/// replies, the offline status and the disconnect.
const FLUSH: Duration = Duration::from_secs(2);

/// One stage from its settings to its exit.
pub struct Stage {
    cfg: StageConfig,
    key: Option<RingKey>,
    service: Service,
    client: AsyncClient,
    inbox: Arc<Inbox>,
    status: StageStatus,
    /// Fired by SIGTERM or SIGINT: serving drains, start-up gives up.
    signalled: Shutdown,
    /// Fired once the stage stops: the ring's listener, the MQTT loop and
    /// the plan forwarder end.
    stop: Trigger,
    stopping: Shutdown,
    mqtt: JoinHandle<()>,
    /// systemd's watchdog kept fed while start-up takes long.
    starting: JoinHandle<()>,
    plan_rx: Option<watch::Receiver<Option<Plan>>>,
}

/// The plan this stage runs first, and what it needs of the checkpoint.
struct Adopted {
    plan: Plan,
    updates: Option<watch::Receiver<Option<Plan>>>,
    ckpt: Arc<Checkpoint>,
    starter: bool,
    /// This device's measured compute, when it has a profile: an emulated
    /// device computes at its figures ([`worker::pace`]).
    figures: Option<lime_schemas::MeasuredCompute>,
}

/// The ring as this stage sees it: what arrives from the previous stage, and
/// the link to the next.
struct Ring {
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    topology: topology::Topology,
    next: Option<UnboundedSender<Frame>>,
}

/// What serving runs: the pipeline thread and, at the starter, the replies.
struct Engine {
    thread: std::thread::JoinHandle<()>,
    notes: tokio::sync::mpsc::UnboundedReceiver<Note>,
    events: mpsc::Sender<Event>,
    /// Fired once the pipeline has ended: the reply publisher sends what is
    /// left and stops.
    replies_done: Option<(Trigger, JoinHandle<()>)>,
}

impl Stage {
    /// Runs a stage through its phases until the shutdown fires (SIGTERM or
    /// SIGINT) and it has drained.
    pub async fn run(cfg: StageConfig) -> anyhow::Result<()> {
        let mut stage = Self::connect(cfg)
            .instrument(tracing::info_span!("phase", name = "settings"))
            .await?;
        let adopted = stage
            .plan()
            .instrument(tracing::info_span!("phase", name = "plan"))
            .await?;
        let ring = stage
            .ring(&adopted)
            .instrument(tracing::info_span!("phase", name = "ring"))
            .await?;
        let worker = stage
            .weights(&adopted)
            .instrument(tracing::info_span!("phase", name = "weights"))
            .await?;
        let plan = adopted.plan.clone();
        let engine = stage.start(adopted, worker, ring).await?;
        stage
            .serve(engine, plan)
            .instrument(tracing::info_span!("phase", name = "serving"))
            .await
    }

    /// Settings: the ring key, systemd, the MQTT link and a `starting` status.
    async fn connect(cfg: StageConfig) -> anyhow::Result<Self> {
        let key = cfg
            .data
            .key_file
            .as_deref()
            .map(auth::load_key)
            .transpose()?;
        if key.is_none() && cfg.data.insecure {
            tracing::warn!("no data.key_file (data.insecure): any host that can reach the data port can join the ring");
        }
        let service = Service::from_env();
        let starting = tokio::spawn(service.keep_alive_while_starting());
        service.status("connecting to the broker");
        let (signal, signalled) = shutdown::channel();
        tokio::spawn(async move {
            shutdown::signal().await;
            tracing::info!("shutdown signal");
            signal.fire();
        });
        let (stop, stopping) = shutdown::channel();
        let (client, eventloop) = AsyncClient::new(control::options(&cfg)?, 256);
        let (inbox, plan_rx) = Inbox::new(cfg.plan_file.is_none(), key.clone());
        let mqtt = tokio::spawn(control::drive(
            eventloop,
            client.clone(),
            inbox.clone(),
            stopping.clone(),
        ));
        let status = StageStatus {
            pid: Some(std::process::id()),
            version: Some(env!("CARGO_PKG_VERSION").into()),
            state: StageState::Starting,
            ..StageStatus::offline(&cfg.name)
        };
        control::publish_status(&client, &inbox, status.clone()).await;
        Ok(Self {
            cfg,
            key,
            service,
            client,
            inbox,
            status,
            signalled,
            stop,
            stopping,
            mqtt,
            starting,
            plan_rx,
        })
    }

    /// Plan: the plan file, else the retained plan that names this stage (after
    /// publishing this device's profile for the broker's planner).
    async fn plan(&mut self) -> anyhow::Result<Adopted> {
        let cfg = &self.cfg;
        let figures = if cfg.plan_file.is_none() {
            self.service.status("measuring this device for the planner");
            let announced = own_profile(cfg).await?;
            control::publish_profile(&self.client, &self.inbox, &announced).await;
            tracing::info!(
                memory_mb = announced.device.memory_bytes >> 20,
                read_mb_s = announced.device.read_bytes_per_s / 1e6,
                "profile published for the planner"
            );
            announced.device.measured
        } else {
            cfg.profile_file
                .as_deref()
                .map(read_profile)
                .transpose()?
                .and_then(|p| p.measured)
        };
        let mut updates = None;
        let plan = match (&cfg.plan_file, self.plan_rx.take()) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the plan {}", path.display()))?;
                serde_json::from_str::<Plan>(&text)
                    .with_context(|| format!("parsing the plan {}", path.display()))?
            }
            (None, Some(mut rx)) => {
                tracing::info!(
                    "waiting for the retained plan on {}",
                    lime_schemas::topics::PLAN
                );
                self.service
                    .status("waiting for the plan on lime/control/plan");
                let adopted = loop {
                    if let Some(p) = rx.borrow_and_update().clone() {
                        if p.position(&cfg.name).is_some() {
                            break p;
                        }
                        tracing::warn!(
                            epoch = p.epoch,
                            "the published plan has no stage {}",
                            cfg.name
                        );
                    }
                    tokio::select! {
                        changed = rx.changed() => changed?,
                        _ = self.signalled.fired() => anyhow::bail!("stopped while waiting for the plan"),
                    }
                };
                updates = Some(rx);
                adopted
            }
            (None, None) => anyhow::bail!("no plan file and no plan subscription"),
        };
        let read_options = ReadOptions {
            direct: cfg.memory.direct_io,
            bytes_per_s: cfg.memory.read_bytes_per_s(),
        };
        let ckpt = Arc::new(Checkpoint::open_with(&cfg.model, &read_options)?);
        plan.validate(ckpt.config().num_hidden_layers)?;
        let Some(position) = plan.position(&cfg.name) else {
            anyhow::bail!(
                "the plan (epoch {}) has no stage {:?}",
                plan.epoch,
                cfg.name
            );
        };
        let starter = position == 0;
        let chunks: Vec<LayerRange> = plan.chunks_of(&cfg.name).into_iter().map(|c| c.1).collect();
        tracing::info!(
            epoch = plan.epoch,
            role = if starter { "starter" } else { "secondary" },
            chunks = ?chunks.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "plan adopted"
        );
        self.status.role = Some(if starter {
            Role::Starter
        } else {
            Role::Secondary
        });
        self.status.epoch = Some(plan.epoch);
        self.status.chunks = chunks;
        self.status.data_addr = Some(plan.stages[position].data_addr.clone());
        anyhow::ensure!(
            plan.stages.len() < 2 || self.key.is_some() || cfg.data.insecure,
            "a ring of {} stages needs data.key_file (`openssl rand -hex 32 > ring.key`, the same \
             file on every stage): without it anyone who reaches the data port can join the ring. \
             Set data.insecure = true to run without one on a machine no one else can reach",
            plan.stages.len()
        );
        Ok(Adopted {
            plan,
            updates,
            ckpt,
            starter,
            figures,
        })
    }

    /// Ring: the data port listening, the link to the next stage, and later
    /// plans forwarded to the pipeline (the starter moves the ring to them).
    async fn ring(&mut self, adopted: &Adopted) -> anyhow::Result<Ring> {
        let (cfg, plan) = (&self.cfg, &adopted.plan);
        let (events_tx, events_rx) = mpsc::channel::<Event>();
        let (route_tx, route_rx) = watch::channel(topology::Topology::route(plan, &cfg.name));
        if plan.stages.len() > 1 {
            let listen_addr = cfg
                .data
                .listen
                .clone()
                .unwrap_or_else(|| self.status.data_addr.clone().unwrap_or_default());
            let listener = tokio::net::TcpListener::bind(&listen_addr)
                .await
                .with_context(|| format!("binding the data port {listen_addr}"))?;
            tracing::info!(addr = %listen_addr, "data plane listening");
            tokio::spawn(ring::listen(
                listener,
                cfg.name.clone(),
                Duration::from_millis(cfg.data.hello_timeout_ms),
                self.key.clone(),
                route_rx,
                events_tx.clone(),
                self.stopping.clone(),
            ));
        }
        let topology = topology::Topology::new(
            tokio::runtime::Handle::current(),
            &cfg.name,
            &cfg.data,
            self.key.clone(),
            route_tx,
            events_tx.clone(),
        );
        if adopted.starter {
            control::watch_stages(&self.client, &self.inbox, events_tx.clone()).await;
        }
        let next = topology.join(plan);
        if let Some(mut rx) = adopted.updates.clone() {
            let (events, mut shutdown) = (events_tx.clone(), self.stopping.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { return },
                        _ = shutdown.fired() => return,
                    }
                    let offered = rx.borrow_and_update().clone();
                    if let Some(p) = offered {
                        if events.send(Event::Plan(Box::new(p))).is_err() {
                            return;
                        }
                    }
                }
            });
        }
        Ok(Ring {
            events_tx,
            events_rx,
            topology,
            next,
        })
    }

    /// Weights: this stage's chunks loaded within its memory budget.
    async fn weights(&mut self, adopted: &Adopted) -> anyhow::Result<worker::Worker> {
        self.service.status(&format!(
            "loading layers {} (plan epoch {})",
            self.status
                .chunks
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            adopted.plan.epoch
        ));
        let (plan, name, memory, ckpt, device, slowdown, figures) = (
            adopted.plan.clone(),
            self.cfg.name.clone(),
            self.cfg.memory.clone(),
            adopted.ckpt.clone(),
            self.cfg.device,
            self.cfg.emulate.compute_slowdown,
            adopted.figures.clone(),
        );
        let worker = tokio::task::spawn_blocking(move || {
            let mut last = Instant::now();
            let device = device.open()?;
            let loaded =
                worker::Worker::load(ckpt, device, &plan, &name, &memory, |done, total| {
                    if done == total || last.elapsed() > Duration::from_secs(1) {
                        last = Instant::now();
                        tracing::info!(done, total, "loading resident layers");
                    }
                });
            let mut worker = loaded?;
            worker.emulate(slowdown, figures);
            anyhow::Ok(worker)
        })
        .await??;
        let weights = worker.weights_bytes();
        tracing::info!(weights_mb = weights >> 20, "weights loaded");
        self.status.memory = Some(MemoryUse {
            weights_bytes: weights,
            ..MemoryUse::default()
        });
        Ok(worker)
    }

    /// Starts the pipeline thread and, at the starter, the intake and the
    /// reply publisher; a secondary says it is online.
    async fn start(
        &mut self,
        adopted: Adopted,
        worker: worker::Worker,
        ring: Ring,
    ) -> anyhow::Result<Engine> {
        let cfg = &self.cfg;
        let Adopted {
            plan,
            ckpt,
            starter,
            ..
        } = adopted;
        let (notes_tx, notes) = tokio::sync::mpsc::unbounded_channel();
        let parts = pipeline::Parts {
            worker,
            next: ring.next,
            notes: notes_tx,
            stage: cfg.name.clone(),
            plan: plan.clone(),
            topology: ring.topology,
            memory: cfg.memory.clone(),
            telemetry_every: Duration::from_millis(cfg.telemetry_ms),
        };
        let events_rx = ring.events_rx;
        let mut replies_done = None;
        let thread = if starter {
            let tokenizer = Arc::new(TextTokenizer::from_path(&cfg.model)?);
            let template = chat::ChatTemplate::from_dir(&cfg.model)?;
            let eos = ckpt.eos_token_ids()?;
            let ids = recent::RecentIds::shared(
                Duration::from_millis(cfg.starter.redelivery_grace_ms),
                cfg.starter.max_remembered_ids,
            );
            let intake = Arc::new(intake::Intake::new(
                tokenizer.clone(),
                template,
                parts.worker.config().max_context(),
                cfg.starter.max_request_bytes,
                cfg.starter.default_deadline_ms,
                ids.clone(),
            ));
            let scheduler_ids = ids;
            let (outbox_tx, outbox_rx) = tokio::sync::mpsc::unbounded_channel();
            let (done, done_rx) = shutdown::channel();
            let publisher = tokio::spawn(control::publish_replies(
                self.client.clone(),
                outbox_rx,
                done_rx,
            ));
            replies_done = Some((done, publisher));
            let mut limits = cfg.starter.clone();
            if limits.max_batch_tokens > cfg.memory.activation_tokens {
                tracing::warn!(
                    max_batch_tokens = limits.max_batch_tokens,
                    activation_tokens = cfg.memory.activation_tokens,
                    "micro-batches are capped at the activation workspace"
                );
                limits.max_batch_tokens = cfg.memory.activation_tokens;
            }
            let (stages, plan_inflight) = (plan.stages.len(), plan.max_inflight);
            let outbox = outbox_tx.clone();
            let thread = std::thread::Builder::new()
                .name("lime-pipeline".into())
                .spawn(move || {
                    let scheduler = starter::Scheduler::new(
                        &tokenizer,
                        eos,
                        limits,
                        stages,
                        plan_inflight,
                        outbox,
                        scheduler_ids,
                    );
                    parts.into_pipeline(Some(scheduler)).run(events_rx)
                })?;
            let sink = RequestSink {
                intake,
                events: ring.events_tx.clone(),
                outbox: outbox_tx,
            };
            if cfg.plan_file.is_none() {
                control::remember_running_plan(&self.inbox, &plan);
            }
            let inflow = inflow::Inflow::start(sink, cfg.starter.max_intake_bytes)?;
            control::open_requests(&self.client, &self.inbox, inflow).await;
            thread
        } else {
            std::thread::Builder::new()
                .name("lime-pipeline".into())
                .spawn(move || parts.into_pipeline(None).run(events_rx))?
        };
        if !starter {
            self.status.state = StageState::Online;
            control::publish_status(&self.client, &self.inbox, self.status.clone()).await;
            tracing::info!("stage online");
        }
        self.starting.abort();
        self.service.ready(&format!(
            "{} of plan epoch {}, weights loaded{}",
            if starter { "starter" } else { "stage" },
            plan.epoch,
            if starter {
                "; waiting for the ring to close"
            } else {
                ""
            }
        ));
        Ok(Engine {
            thread,
            notes,
            events: ring.events_tx,
            replies_done,
        })
    }

    /// Serving: status and telemetry from the pipeline until the shutdown
    /// fires; then the drain (requests in flight finish, or end with an error
    /// once `shutdown_grace_ms` is over), the offline status and the exit.
    async fn serve(mut self, mut engine: Engine, plan: Plan) -> anyhow::Result<()> {
        let starter = self.status.role == Some(Role::Starter);
        let mut plan_epoch = plan.epoch;
        let mut watchdog = tokio::time::interval(self.service.tick_every());
        // Memory in the retained status is refreshed at most every 2 s.
        let mut refresh = tokio::time::interval(Duration::from_secs(2));
        let mut memory_changed = false;
        let grace = Duration::from_millis(self.cfg.shutdown_grace_ms);
        let mut draining: Option<tokio::time::Instant> = None;
        let mut signalled = self.signalled.clone();
        loop {
            // The pipeline gets the grace and a moment to end what it must.
            let give_up = draining.map(|at| at + grace + Duration::from_secs(1));
            tokio::select! {
                _ = signalled.fired(), if draining.is_none() => {
                    draining = Some(tokio::time::Instant::now());
                    tracing::info!(grace_ms = grace.as_millis() as u64, "draining: requests in flight finish or end, new ones are refused");
                    self.service.stopping();
                    let _ = engine.events.send(Event::Drain { by: Instant::now() + grace });
                }
                _ = tokio::time::sleep_until(give_up.unwrap_or_else(tokio::time::Instant::now)), if give_up.is_some() => {
                    tracing::warn!("the pipeline did not drain within shutdown_grace_ms; stopping it");
                    break;
                }
                _ = watchdog.tick() => self.service.tick(),
                _ = refresh.tick() => {
                    if memory_changed && self.status.state == StageState::Online {
                        control::publish_status(&self.client, &self.inbox, self.status.clone()).await;
                        memory_changed = false;
                    }
                }
                note = engine.notes.recv() => match note {
                    Some(Note::RingClosed) => {
                        self.status.state = StageState::Online;
                        control::publish_status(&self.client, &self.inbox, self.status.clone()).await;
                        tracing::info!("starter online: taking requests");
                        self.service.status(&format!("starter of plan epoch {plan_epoch}: taking requests"));
                    }
                    Some(Note::Switched(p)) => {
                        self.service.status(&format!("moved to plan epoch {}", p.epoch));
                        if starter && self.cfg.plan_file.is_none() {
                            control::remember_running_plan(&self.inbox, &p);
                        }
                        plan_epoch = p.epoch;
                        self.status.epoch = Some(p.epoch);
                        self.status.chunks = p.chunks_of(&self.cfg.name).into_iter().map(|c| c.1).collect();
                        control::publish_status(&self.client, &self.inbox, self.status.clone()).await;
                    }
                    Some(Note::Telemetry(t)) => {
                        self.service.pipeline_alive();
                        let use_now = MemoryUse {
                            weights_bytes: t.memory.weights_bytes,
                            kv_bytes: t.memory.kv_bytes,
                            sequences: t.memory.sequences,
                        };
                        if self.status.memory.as_ref() != Some(&use_now) {
                            self.status.memory = Some(use_now);
                            memory_changed = true;
                        }
                        control::publish_telemetry(&self.client, &t).await;
                    }
                    // The pipeline ended: drained, or it failed.
                    None => break,
                },
            }
        }
        self.stop(engine).await;
        Ok(())
    }

    /// Ends the pipeline, sends the last replies and the offline status, and
    /// disconnects.
    async fn stop(mut self, engine: Engine) {
        tracing::info!("shutting down");
        self.stop.fire();
        self.service.stopping();
        let _ = engine.events.send(Event::Stop);
        let thread = engine.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        if let Some((done, publisher)) = engine.replies_done {
            done.fire();
            if tokio::time::timeout(FLUSH, publisher).await.is_err() {
                tracing::warn!("the last replies were not all handed to the MQTT client in time");
            }
        }
        self.status.state = StageState::Offline;
        control::publish_status(&self.client, &self.inbox, self.status.clone()).await;
        let _ = self.client.disconnect().await;
        if tokio::time::timeout(FLUSH, self.mqtt).await.is_err() {
            tracing::warn!(
                "the MQTT loop did not flush the offline status and the disconnect in time"
            );
        }
    }
}

/// A profile file (`profile_file`), as `lime-stage --profile` writes it.
fn read_profile(path: &std::path::Path) -> anyhow::Result<lime_schemas::DeviceProfile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the profile {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing the profile {}", path.display()))
}

/// This stage's profile for the broker's planner: the configured file, else
/// measured now, with the address the ring reaches it at.
async fn own_profile(cfg: &StageConfig) -> anyhow::Result<lime_schemas::StageProfile> {
    let data_addr = cfg
        .data
        .advertise
        .clone()
        .or_else(|| cfg.data.listen.clone())
        .context("a stage planned by the broker needs data.listen (or data.advertise)")?;
    let mut announced = match &cfg.profile_file {
        Some(path) => {
            let device = read_profile(path)?;
            let model = Checkpoint::open(&cfg.model)?.shape();
            lime_schemas::StageProfile { device, model }
        }
        None => {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || {
                crate::control::profile::measure(&cfg, |step| {
                    tracing::info!(step, "profiling this device")
                })
            })
            .await??
            .into()
        }
    };
    announced.device.name = cfg.name.clone();
    announced.device.data_addr = Some(data_addr);
    if let Some(budget) = cfg.memory.accountable_bytes() {
        announced.device.memory_bytes = budget;
    }
    announced.device.validate()?;
    Ok(announced)
}
