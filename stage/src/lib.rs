//! lime-stage: the runtime on one device, one stage of the pipeline ring.
//!
//! A stage joins the MQTT control plane ([`control`]), takes its part of the plan,
//! loads its chunks ([`worker`]), and runs the pipeline loop ([`pipeline`]) between
//! a TCP link from the previous stage and one to the next ([`ring`]). The plan's
//! first stage is the starter: it also checks and tokenizes requests ([`intake`]),
//! schedules sequences into micro-batches and samples ([`starter`], [`sequence`]).
//! [`runtime`] takes a stage through its phases, from settings to serving, and
//! drains it when the [`shutdown`] signal fires.

#![warn(missing_docs)]

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
pub mod runtime;
pub mod sequence;
pub mod service;
pub mod shutdown;
pub mod starter;
pub mod switch;
pub mod topology;
pub mod worker;

use anyhow::Context;
use config::StageConfig;

/// Runs a stage until SIGTERM or SIGINT, then drains it ([`runtime::Stage`]).
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
    runtime.block_on(runtime::Stage::run(cfg))
}
