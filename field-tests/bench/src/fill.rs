//! `lime bench fill`: the proof that emulated devices overlap like separate
//! ones. A resident pipeline decodes with one micro-batch in flight, then with
//! one per stage; on N separate devices the second keeps every stage busy and
//! reaches nearly N times the tokens/s. Stages sharing this machine's cores
//! only do so when their compute is paced (`emulate.compute_slowdown`), so the
//! bench runs both without and with emulation, side by side.

use crate::cluster::{Cluster, ClusterSpec};
use crate::serving::{requests, row, ServingRow};
use lime_client::ask::ask_all;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What to run (`lime bench fill`'s arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct FillBench {
    /// Checkpoint directory; the `bench` preset is synthesised there if empty.
    #[arg(long, default_value = "models/bench")]
    pub model: PathBuf,
    /// Stage processes, and micro-batches in flight when the pipeline is full.
    #[arg(long, default_value_t = 4)]
    pub stages: usize,
    /// Emulations to run, each a compute slowdown of every device against
    /// this machine (1: no emulation).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub slowdowns: Vec<f64>,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: u32,
    /// Compute threads per stage.
    #[arg(long, default_value_t = 1)]
    pub compute_threads: usize,
    /// Configs and logs of the clusters.
    #[arg(skip = crate::scratch_dir("lime-bench-fill"))]
    pub dir: PathBuf,
}

/// One setting of the emulation: decode with one micro-batch and with a full
/// pipeline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FillRow {
    pub slowdown: f64,
    /// One request: one micro-batch of one sequence on the ring.
    pub one: ServingRow,
    /// One request per stage at once: as many micro-batches of one sequence.
    pub full: ServingRow,
    /// Decode tokens/s (from each answer's time per output token) of the full
    /// pipeline over one micro-batch's.
    pub speedup: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FillReport {
    pub model: String,
    pub stages: usize,
    pub rows: Vec<FillRow>,
}

impl FillReport {
    /// The speedup under emulation (the last row).
    pub fn emulated_speedup(&self) -> Option<f64> {
        self.rows
            .iter()
            .rfind(|r| r.slowdown > 1.0)
            .map(|r| r.speedup)
    }
}

/// Decode tokens/s of `r`'s requests running together, from their time per
/// output token (prefill and the queue's edges left out).
fn decode_tokens_per_s(r: &ServingRow) -> f64 {
    r.requests as f64 * 1e3 / r.tpot_ms_p50.max(1e-9)
}

async fn measure(bench: &FillBench, slowdown: f64) -> anyhow::Result<FillRow> {
    let dir = bench.dir.join(format!("slowdown-{slowdown}"));
    let mut spec = ClusterSpec::new(&bench.model, bench.stages, &dir);
    spec.compute_threads = Some(bench.compute_threads);
    spec.compute_slowdown = slowdown;
    spec.max_inflight = bench.stages;
    eprintln!(
        "fill: {} resident stages computing {slowdown}x slower than this machine",
        bench.stages
    );
    let mut cluster = Cluster::start(&spec).await?;
    cluster.wait_online(Duration::from_secs(300)).await?;
    let timeout = Duration::from_secs(1800);
    ask_all(&cluster.broker, &requests(1, 4, 99), timeout, |_, _| {}).await?;
    let started = Instant::now();
    let answers = ask_all(
        &cluster.broker,
        &requests(1, bench.max_tokens, 0),
        timeout,
        |_, _| {},
    )
    .await?;
    let one = row("one micro-batch", "decode", &answers, started.elapsed())?;
    eprintln!(
        "fill: one micro-batch in flight, {:.1} ms per token",
        one.tpot_ms_p50
    );
    let started = Instant::now();
    let answers = ask_all(
        &cluster.broker,
        &requests(bench.stages, bench.max_tokens, 1),
        timeout,
        |_, _| {},
    )
    .await?;
    let full = row("full pipeline", "decode", &answers, started.elapsed())?;
    cluster.stop();
    let speedup = decode_tokens_per_s(&full) / decode_tokens_per_s(&one);
    eprintln!(
        "fill: {} micro-batches in flight, {:.1} ms per token each: {speedup:.2}x the tokens/s",
        bench.stages, full.tpot_ms_p50
    );
    Ok(FillRow {
        slowdown,
        one,
        full,
        speedup,
    })
}

/// Runs the pipeline under each emulation in turn.
pub async fn run(bench: &FillBench) -> anyhow::Result<FillReport> {
    lime_client::synth::ensure(lime_kernels::synth::Preset::Bench, &bench.model)?;
    let mut rows = Vec::new();
    for &slowdown in &bench.slowdowns {
        rows.push(measure(bench, slowdown).await?);
    }
    Ok(FillReport {
        model: bench.model.display().to_string(),
        stages: bench.stages,
        rows,
    })
}

impl fmt::Display for FillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "model {}, {} resident stages; decode with 1 micro-batch in flight, then {}",
            self.model, self.stages, self.stages
        )?;
        writeln!(
            f,
            "{:<9} {:>14} {:>14} {:>14} {:>14} {:>8}",
            "SLOWDOWN", "1: ms/token", "1: tok/s", "full: ms/tok", "full: tok/s", "SPEEDUP"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<9} {:>14.1} {:>14.1} {:>14.1} {:>14.1} {:>7.2}x",
                format!("{}x", r.slowdown),
                r.one.tpot_ms_p50,
                decode_tokens_per_s(&r.one),
                r.full.tpot_ms_p50,
                decode_tokens_per_s(&r.full),
                r.speedup
            )?;
        }
        writeln!(
            f,
            "separate devices would give up to {}x; without emulation the stages compete for this machine's cores",
            self.stages
        )
    }
}
