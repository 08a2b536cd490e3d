//! lime-stage: the runtime on one device, one stage of the pipeline ring.
//!
//! A stage joins the MQTT control plane ([`control`]), takes its part of the plan,
//! loads its chunks ([`worker`]), and runs the pipeline loop ([`pipeline`]) between
//! a TCP link from the previous stage and one to the next ([`ring`]). The plan's
//! first stage is the starter: it also checks and tokenizes requests ([`intake`]),
//! schedules sequences into micro-batches and samples ([`starter`], [`sequence`]).

pub mod adaptation;
pub mod admission;
pub mod auth;
pub mod broker_tls;
pub mod chat;
pub mod config;
pub mod connection;
pub mod control;
pub mod demand;
pub mod inflow;
pub mod intake;
pub mod link;
pub mod memory;
pub mod pipeline;
pub mod profile;
pub mod recent;
pub mod residency;
pub mod ring;
pub mod sequence;
pub mod service;
pub mod starter;
pub mod switch;
pub mod topology;
pub mod worker;

use anyhow::Context;
use config::StageConfig;
use control::{Inbox, RequestSink};
use lime_kernels::{Checkpoint, ReadOptions, TextTokenizer};
use lime_schemas::{LayerRange, MemoryUse, Plan, Role, StageState, StageStatus};
use pipeline::{Event, Note};
use std::sync::Arc;
use std::time::Duration;

/// Runs a stage until SIGTERM or SIGINT.
pub fn run(cfg: StageConfig) -> anyhow::Result<()> {
    if let Some(n) = cfg.compute_threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .thread_name(|i| format!("lime-compute-{i}"))
            .build_global()
            .context("sizing the compute thread pool")?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("lime-stage-io")
        .build()?;
    runtime.block_on(serve(cfg))
}

async fn serve(cfg: StageConfig) -> anyhow::Result<()> {
    let key = cfg
        .data
        .key_file
        .as_deref()
        .map(auth::load_key)
        .transpose()?;
    if key.is_none() && cfg.data.insecure {
        tracing::warn!("no data.key_file (data.insecure): any host that can reach the data port can join the ring");
    }
    let mut service = service::Service::from_env();
    let starting = tokio::spawn(service.keep_alive_while_starting());
    service.status("connecting to the broker");
    let (client, eventloop) = rumqttc::v5::AsyncClient::new(control::options(&cfg)?, 256);
    let (inbox, plan_rx) = Inbox::new(cfg.plan_file.is_none(), key.clone());
    tokio::spawn(control::drive(eventloop, client.clone(), inbox.clone()));
    let mut status = StageStatus {
        pid: Some(std::process::id()),
        version: Some(env!("CARGO_PKG_VERSION").into()),
        state: StageState::Starting,
        ..StageStatus::offline(&cfg.name)
    };
    control::publish_status(&client, &inbox, status.clone()).await;

    if cfg.plan_file.is_none() {
        service.status("measuring this device for the planner");
        let announced = own_profile(&cfg).await?;
        control::publish_profile(&client, &inbox, &announced).await;
        tracing::info!(
            memory_mb = announced.device.memory_bytes >> 20,
            read_mb_s = announced.device.read_bytes_per_s / 1e6,
            "profile published for the planner"
        );
    }
    let mut plan_updates = None;
    let plan = match (&cfg.plan_file, plan_rx) {
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
            service.status("waiting for the plan on lime/control/plan");
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
                rx.changed().await?;
            };
            plan_updates = Some(rx);
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
    status.role = Some(if starter {
        Role::Starter
    } else {
        Role::Secondary
    });
    status.epoch = Some(plan.epoch);
    status.chunks = chunks;
    let me = &plan.stages[position];
    let listen_addr = cfg
        .data
        .listen
        .clone()
        .unwrap_or_else(|| me.data_addr.clone());
    status.data_addr = Some(me.data_addr.clone());

    anyhow::ensure!(
        plan.stages.len() < 2 || key.is_some() || cfg.data.insecure,
        "a ring of {} stages needs data.key_file (`openssl rand -hex 32 > ring.key`, the same \
         file on every stage): without it anyone who reaches the data port can join the ring. \
         Set data.insecure = true to run without one on a machine no one else can reach",
        plan.stages.len()
    );
    // Listen before loading so the previous stage's link is up when we are.
    let (events_tx, events_rx) = std::sync::mpsc::channel::<Event>();
    let (route_tx, route_rx) =
        tokio::sync::watch::channel(topology::Topology::route(&plan, &cfg.name));
    if plan.stages.len() > 1 {
        let listener = tokio::net::TcpListener::bind(&listen_addr)
            .await
            .with_context(|| format!("binding the data port {listen_addr}"))?;
        tracing::info!(addr = %listen_addr, "data plane listening");
        tokio::spawn(ring::listen(
            listener,
            cfg.name.clone(),
            Duration::from_millis(cfg.data.hello_timeout_ms),
            key.clone(),
            route_rx,
            events_tx.clone(),
        ));
    }
    let topology = topology::Topology::new(
        tokio::runtime::Handle::current(),
        &cfg.name,
        &cfg.data,
        key,
        route_tx,
        events_tx.clone(),
    );
    if starter {
        control::watch_stages(&client, &inbox, events_tx.clone()).await;
    }
    let next_tx = topology.join(&plan);
    // Later plans go to the pipeline; the starter moves the ring to them.
    if let Some(mut rx) = plan_updates {
        let events = events_tx.clone();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let offered = rx.borrow_and_update().clone();
                if let Some(p) = offered {
                    if events.send(Event::Plan(Box::new(p))).is_err() {
                        return;
                    }
                }
            }
        });
    }

    service.status(&format!(
        "loading layers {} (plan epoch {})",
        status
            .chunks
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        plan.epoch
    ));
    let worker = {
        let (plan, name, memory, ckpt, device) = (
            plan.clone(),
            cfg.name.clone(),
            cfg.memory.clone(),
            ckpt.clone(),
            cfg.device,
        );
        tokio::task::spawn_blocking(move || {
            let mut last = std::time::Instant::now();
            let device = device.open()?;
            worker::Worker::load(ckpt, device, &plan, &name, &memory, |done, total| {
                if done == total || last.elapsed() > Duration::from_secs(1) {
                    last = std::time::Instant::now();
                    tracing::info!(done, total, "loading resident layers");
                }
            })
        })
        .await??
    };
    let weights = worker.weights_bytes();
    tracing::info!(weights_mb = weights >> 20, "weights loaded");
    status.memory = Some(MemoryUse {
        weights_bytes: weights,
        ..MemoryUse::default()
    });

    let (notes_tx, mut notes_rx) = tokio::sync::mpsc::unbounded_channel();
    let parts = pipeline::Parts {
        worker,
        next: next_tx,
        notes: notes_tx,
        stage: cfg.name.clone(),
        plan: plan.clone(),
        topology,
        memory: cfg.memory.clone(),
        telemetry_every: Duration::from_millis(cfg.telemetry_ms),
    };
    let engine = if starter {
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
        tokio::spawn(control::publish_replies(client.clone(), outbox_rx));
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
        let engine = std::thread::Builder::new()
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
            events: events_tx.clone(),
            outbox: outbox_tx,
        };
        if cfg.plan_file.is_none() {
            control::remember_running_plan(&inbox, &plan);
        }
        let inflow = inflow::Inflow::start(sink, cfg.starter.max_intake_bytes)?;
        control::open_requests(&client, &inbox, inflow).await;
        engine
    } else {
        std::thread::Builder::new()
            .name("lime-pipeline".into())
            .spawn(move || parts.into_pipeline(None).run(events_rx))?
    };
    if !starter {
        status.state = StageState::Online;
        control::publish_status(&client, &inbox, status.clone()).await;
        tracing::info!("stage online");
    }
    starting.abort();
    service.ready(&format!(
        "{} of plan epoch {}, weights loaded{}",
        if starter { "starter" } else { "stage" },
        plan.epoch,
        if starter {
            "; waiting for the ring to close"
        } else {
            ""
        }
    ));
    let mut watchdog = tokio::time::interval(service.tick_every());

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    // Memory in the retained status is refreshed at most every 2 s.
    let mut refresh = tokio::time::interval(Duration::from_secs(2));
    let mut memory_changed = false;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = watchdog.tick() => service.tick(),
            _ = refresh.tick() => {
                if memory_changed && status.state == StageState::Online {
                    control::publish_status(&client, &inbox, status.clone()).await;
                    memory_changed = false;
                }
            }
            note = notes_rx.recv() => match note {
                Some(Note::RingClosed) => {
                    status.state = StageState::Online;
                    control::publish_status(&client, &inbox, status.clone()).await;
                    tracing::info!("starter online: taking requests");
                    service.status(&format!("starter of plan epoch {}: taking requests", plan.epoch));
                }
                Some(Note::Switched(p)) => {
                    service.status(&format!("moved to plan epoch {}", p.epoch));
                    if starter && cfg.plan_file.is_none() {
                        control::remember_running_plan(&inbox, &p);
                    }
                    status.epoch = Some(p.epoch);
                    status.chunks = p.chunks_of(&cfg.name).into_iter().map(|c| c.1).collect();
                    control::publish_status(&client, &inbox, status.clone()).await;
                }
                Some(Note::Telemetry(t)) => {
                    service.pipeline_alive();
                    let use_now = MemoryUse {
                        weights_bytes: t.memory.weights_bytes,
                        kv_bytes: t.memory.kv_bytes,
                        sequences: t.memory.sequences,
                    };
                    if status.memory.as_ref() != Some(&use_now) {
                        status.memory = Some(use_now);
                        memory_changed = true;
                    }
                    control::publish_telemetry(&client, &t).await;
                }
                None => break,
            },
        }
    }
    tracing::info!("shutting down");
    service.stopping();
    status.state = StageState::Offline;
    control::publish_status(&client, &inbox, status).await;
    let _ = events_tx.send(Event::Stop);
    let _ = client.disconnect().await;
    // Give the MQTT loop a moment to flush the offline status and the disconnect.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(engine);
    Ok(())
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
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the profile {}", path.display()))?;
            let device: lime_schemas::DeviceProfile = serde_json::from_str(&text)
                .with_context(|| format!("parsing the profile {}", path.display()))?;
            let model = Checkpoint::open(&cfg.model)?.shape();
            lime_schemas::StageProfile { device, model }
        }
        None => {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || {
                profile::measure(&cfg, |step| tracing::info!(step, "profiling this device"))
            })
            .await??
            .into()
        }
    };
    announced.device.name = cfg.name.clone();
    announced.device.data_addr = Some(data_addr);
    if let Some(budget) = cfg.memory.budget_bytes {
        announced.device.memory_bytes = budget;
    }
    announced.device.validate()?;
    Ok(announced)
}

/// Resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
