//! `lime bench serving`: a cluster of N stages against one stage holding the whole
//! model, same model and workloads, run one after the other in one invocation.
//!
//! Sporadic: requests one at a time (what one robot asking now and then sees).
//! Bursty: many requests at once (a fleet asking together). Both setups go through
//! the same broker, scheduler and MQTT path, so the ratio isolates what splitting
//! the model over processes costs.

use crate::cluster::{Cluster, ClusterSpec};
use lime_client::ask::{ask_all, Answer};
use lime_schemas::Request;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One setup on one workload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServingRow {
    pub setup: String,
    pub workload: String,
    pub requests: usize,
    pub completion_tokens: u64,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub ttft_ms_p50: f64,
    pub ttft_ms_p99: f64,
    pub tpot_ms_p50: f64,
    pub tpot_ms_p99: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ServingReport {
    pub model: String,
    pub stages: usize,
    pub rows: Vec<ServingRow>,
    /// Distributed bursty tokens/s over single-process bursty tokens/s.
    pub bursty_throughput_ratio: f64,
    /// Distributed sporadic time per token over single-process (p50).
    pub sporadic_tpot_ratio: f64,
}

/// What to run (`lime bench serving`'s arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct ServingBench {
    /// Checkpoint directory; the `bench` preset is synthesised there if empty.
    #[arg(long, default_value = "models/bench")]
    pub model: PathBuf,
    /// Stage processes of the distributed setup.
    #[arg(long, default_value_t = 4)]
    pub stages: usize,
    /// Sporadic requests, sent one at a time.
    #[arg(long, default_value_t = 8)]
    pub sporadic: usize,
    /// Bursty requests, sent at once.
    #[arg(long, default_value_t = 32)]
    pub burst: usize,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// Starter's micro-batches in flight (0: one per stage).
    #[arg(long, default_value_t = 0)]
    pub max_inflight: usize,
    /// Configs and logs of the clusters.
    #[arg(skip = crate::scratch_dir("lime-bench"))]
    pub dir: PathBuf,
}

pub(crate) fn requests(n: usize, max_tokens: u32, salt: usize) -> Vec<Request> {
    let words = [
        "robot", "arm", "stop", "the", "obstacle", "ahead", "battery", "grip", "left", "dock",
    ];
    (0..n)
        .map(|i| {
            let len = 8 + (i * 5 + salt) % 17;
            let prompt: Vec<&str> = (0..len)
                .map(|j| words[(i + j * 7 + salt) % words.len()])
                .collect();
            Request {
                prompt: Some(prompt.join(" ")),
                max_tokens: Some(max_tokens),
                ignore_eos: true,
                ..Default::default()
            }
        })
        .collect()
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

/// Sends `n` requests one after the other, each when the previous has finished:
/// the sporadic workload's row.
pub(crate) async fn sporadic(
    broker: &lime_client::mqtt::BrokerAddr,
    setup: &str,
    n: usize,
    max_tokens: u32,
    timeout: Duration,
) -> anyhow::Result<ServingRow> {
    eprintln!("{setup}: sporadic, {n} requests one at a time");
    let mut answers = Vec::new();
    let started = Instant::now();
    for r in requests(n, max_tokens, 0) {
        answers.extend(ask_all(broker, &[r], timeout, |_, _| {}).await?);
    }
    row(setup, "sporadic", &answers, started.elapsed())
}

pub(crate) fn row(
    setup: &str,
    workload: &str,
    answers: &[Answer],
    wall: Duration,
) -> anyhow::Result<ServingRow> {
    let mut ttft = Vec::new();
    let mut tpot = Vec::new();
    let mut tokens = 0u64;
    for a in answers {
        let f = a
            .outcome
            .as_ref()
            .map_err(|e| anyhow::anyhow!("a benchmark request failed: {}", e.error.message))?;
        tokens += f.usage.completion_tokens as u64;
        ttft.push(f.timing.ttft_ms);
        tpot.push(f.timing.tpot_ms);
    }
    Ok(ServingRow {
        setup: setup.into(),
        workload: workload.into(),
        requests: answers.len(),
        completion_tokens: tokens,
        wall_s: wall.as_secs_f64(),
        tokens_per_s: tokens as f64 / wall.as_secs_f64(),
        ttft_ms_p50: percentile(&mut ttft, 50.0),
        ttft_ms_p99: percentile(&mut ttft, 99.0),
        tpot_ms_p50: percentile(&mut tpot, 50.0),
        tpot_ms_p99: percentile(&mut tpot, 99.0),
    })
}

async fn measure(
    bench: &ServingBench,
    stages: usize,
    dir: &Path,
) -> anyhow::Result<Vec<ServingRow>> {
    let setup = if stages == 1 {
        "1 stage (single process)".to_string()
    } else {
        format!("{stages} stages")
    };
    eprintln!("{setup}: starting");
    let mut spec = ClusterSpec::new(&bench.model, stages, dir);
    spec.max_inflight = bench.max_inflight;
    let mut cluster = Cluster::start(&spec).await?;
    cluster.wait_online(Duration::from_secs(300)).await?;
    let timeout = Duration::from_secs(1800);
    // Warm up caches and allocators.
    ask_all(&cluster.broker, &requests(2, 8, 99), timeout, |_, _| {}).await?;

    let sporadic = sporadic(
        &cluster.broker,
        &setup,
        bench.sporadic,
        bench.max_tokens,
        timeout,
    )
    .await?;

    eprintln!("{setup}: bursty, {} requests at once", bench.burst);
    let started = Instant::now();
    let burst = ask_all(
        &cluster.broker,
        &requests(bench.burst, bench.max_tokens, 1),
        timeout,
        |_, _| {},
    )
    .await?;
    let bursty = row(&setup, "bursty", &burst, started.elapsed())?;
    cluster.stop();
    Ok(vec![sporadic, bursty])
}

/// Runs both setups and compares them.
pub async fn run(bench: &ServingBench) -> anyhow::Result<ServingReport> {
    anyhow::ensure!(
        bench.stages >= 2,
        "compare at least 2 stages with the single process"
    );
    anyhow::ensure!(
        bench.sporadic > 0 && bench.burst > 0,
        "both workloads need requests"
    );
    let mut rows = measure(bench, 1, &bench.dir.join("single")).await?;
    rows.extend(measure(bench, bench.stages, &bench.dir.join("distributed")).await?);
    let find = |setup_single: bool, workload: &str| {
        rows.iter()
            .find(|r| r.workload == workload && r.setup.starts_with("1 stage") == setup_single)
            .cloned()
    };
    let (Some(s_b), Some(d_b), Some(s_s), Some(d_s)) = (
        find(true, "bursty"),
        find(false, "bursty"),
        find(true, "sporadic"),
        find(false, "sporadic"),
    ) else {
        anyhow::bail!("missing measurements");
    };
    Ok(ServingReport {
        model: bench.model.display().to_string(),
        stages: bench.stages,
        bursty_throughput_ratio: d_b.tokens_per_s / s_b.tokens_per_s,
        sporadic_tpot_ratio: d_s.tpot_ms_p50 / s_s.tpot_ms_p50,
        rows,
    })
}

impl fmt::Display for ServingReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "serving {} — {} stages vs one process",
            self.model, self.stages
        )?;
        writeln!(
            f,
            "{:<26} {:<9} {:>5} {:>8} {:>9} {:>10} {:>10} {:>10} {:>10}",
            "setup",
            "workload",
            "reqs",
            "tokens",
            "tokens/s",
            "TTFT p50",
            "TTFT p99",
            "TPOT p50",
            "TPOT p99"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<26} {:<9} {:>5} {:>8} {:>9.1} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>8.1}ms",
                r.setup,
                r.workload,
                r.requests,
                r.completion_tokens,
                r.tokens_per_s,
                r.ttft_ms_p50,
                r.ttft_ms_p99,
                r.tpot_ms_p50,
                r.tpot_ms_p99
            )?;
        }
        writeln!(
            f,
            "bursty throughput, distributed / single: {:.2} (target ≥ 0.80)",
            self.bursty_throughput_ratio
        )?;
        write!(
            f,
            "sporadic time per token, distributed / single: {:.2} (target ≤ 1.25)",
            self.sporadic_tpot_ratio
        )
    }
}
