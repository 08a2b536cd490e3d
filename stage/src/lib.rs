//! lime-stage: the runtime on one device, one stage of the pipeline ring.
//!
//! The folders are the stage's rooms:
//! - [`control`]: the MQTT control plane (status, plan, requests in and replies
//!   out) and the device profile the planner asks for;
//! - [`ring`]: the data plane, TCP links to the previous and next stage, their
//!   handshake and the measurements of the link;
//! - [`worker`]: the model shard this stage computes, its KV store and the
//!   memory governor;
//! - [`memory`]: the budget and its account, and which layers stay resident or
//!   stream back in when a micro-batch needs them;
//! - [`pipeline`]: the loop that batches what arrives, runs the chunks held here
//!   and hands the result on, and the move to a new plan;
//! - [`starter`]: at the plan's first stage, the request intake (size, JSON,
//!   chat template, tokens), the scheduler, sampling and the replies.
//!
//! [`runtime`] takes a stage through its phases, from settings to serving, and
//! drains it when the [`shutdown`] signal fires; [`service`] tells systemd.

#![warn(missing_docs)]

pub mod config;
pub mod control;
pub mod memory;
pub mod pipeline;
pub mod ring;
pub mod runtime;
pub mod service;
pub mod shutdown;
pub mod starter;
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
