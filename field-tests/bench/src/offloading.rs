//! `lime bench offload`: lime against the `naive` and `mdi` baselines on a model
//! that does not fit, all three started from the same binaries in one run.
//!
//! Every stage gets the same budget (a share of its weights) and the same emulated
//! storage: a paced read bandwidth chosen so that reading a layer takes `ratio`
//! times as long as computing it at batch 1, as on a Jetson streaming a 70B model.
//! The page cache would otherwise serve reads at memory speed. The report gives
//! sporadic time per token, bursty throughput, where each stage's time went
//! (computing, waiting for weights, for the ring, idle), bytes read, peak RSS
//! against the budget, and lime's bursty throughput against the cost model's bound.

use crate::cluster::{Budget, Cluster, ClusterSpec, Mode};
use crate::serving::{requests, row, sporadic, ServingRow};
use lime_client::ask::ask_all;
use lime_kernels::{Checkpoint, DecoderLayer, Device};
use lime_schemas::{StageTime, Telemetry};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What to run (`lime bench offload`'s arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct OffloadBench {
    /// Checkpoint directory; the `bench` preset is synthesised there if empty.
    #[arg(long, default_value = "models/bench")]
    pub model: PathBuf,
    /// Stage processes.
    #[arg(long, default_value_t = 4)]
    pub stages: usize,
    /// lime's interleave degree (the baselines are contiguous).
    #[arg(long, default_value_t = 4)]
    pub interleave: usize,
    /// Each stage's memory budget as a share of its weights.
    #[arg(long, default_value_t = 0.5)]
    pub share: f64,
    /// Emulated storage: reading a layer takes this many times computing it at batch 1.
    #[arg(long, default_value_t = 3.0)]
    pub read_ratio: f64,
    /// Emulated read bandwidth in MB/s, instead of deriving it from --read-ratio.
    #[arg(long = "read-mb-s")]
    pub read_mb_per_s: Option<f64>,
    /// Sporadic requests, sent one at a time.
    #[arg(long, default_value_t = 4)]
    pub sporadic: usize,
    /// Bursty requests, sent at once.
    #[arg(long, default_value_t = 32)]
    pub burst: usize,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// Largest micro-batch in tokens (its activation workspace is budgeted).
    #[arg(long, default_value_t = 64)]
    pub activation_tokens: usize,
    /// Modes to run, of lime, mdi and naive.
    #[arg(long, value_delimiter = ',', default_value = "naive,mdi,lime")]
    pub modes: Vec<Mode>,
    /// Compute threads per stage (the emulated devices share this machine), and
    /// for the calibration.
    #[arg(long, default_value_t = 1)]
    pub compute_threads: usize,
    /// lime's micro-batches in flight (0: one per stage). Fewer, larger
    /// micro-batches share each streamed layer's read among more sequences.
    #[arg(long, default_value_t = 1)]
    pub max_inflight: usize,
    /// Configs and logs of the clusters.
    #[arg(skip = crate::scratch_dir("lime-bench-offload"))]
    pub dir: PathBuf,
}

/// How long one layer takes at batch 1 and at the bursty batch, in this process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Calibration {
    pub layer_bytes: u64,
    pub layer_ms_batch1: f64,
    pub layer_ms_burst: f64,
    pub read_mb_per_s: f64,
    /// How long reading one layer takes at that bandwidth.
    pub layer_read_ms: f64,
}

/// One mode's measurements.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModeRow {
    pub mode: String,
    pub interleave: usize,
    pub offloaded: usize,
    pub layers: usize,
    pub slots: usize,
    pub sporadic: ServingRow,
    pub bursty: ServingRow,
    /// Sum over stages of where the time went during the bursty run.
    pub bursty_time: StageTime,
    /// The loading bubble as a share of stage time during the bursty run.
    pub bursty_bubble: f64,
    /// Bytes of streamed layers read during the bursty run.
    pub bursty_read_bytes: u64,
    pub budget_bytes: u64,
    /// Largest peak RSS of a stage, and that stage's budget.
    pub peak_rss_bytes: u64,
    pub peak_rss_budget_bytes: u64,
    /// Largest (peak RSS - budget) over the stages: the unaccounted overhead.
    pub rss_overhead_bytes: i64,
    pub peak_accounted_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct OffloadReport {
    pub model: String,
    pub stages: usize,
    pub share: f64,
    pub calibration: Calibration,
    pub rows: Vec<ModeRow>,
    /// lime's bursty throughput over naive's and mdi's.
    pub bursty_vs_naive: Option<f64>,
    pub bursty_vs_mdi: Option<f64>,
    /// naive's and mdi's sporadic time per token over lime's.
    pub sporadic_vs_naive: Option<f64>,
    pub sporadic_vs_mdi: Option<f64>,
    /// lime's bursty tokens/s bound by the cost model, and the share achieved.
    pub bound_tokens_per_s: Option<f64>,
    pub bound_ratio: Option<f64>,
    pub bound_note: String,
}

/// Milliseconds for `layer` to decode `tokens` sequences, as a stage profiles it.
fn time_layer(ckpt: &Checkpoint, layer: &DecoderLayer, tokens: usize) -> anyhow::Result<f64> {
    Ok(lime_stage::control::profile::time_decode(ckpt.config(), layer, tokens, 15)? * 1e3)
}

fn calibrate(bench: &OffloadBench) -> anyhow::Result<Calibration> {
    let ckpt = Checkpoint::open(&bench.model)?;
    let layer = DecoderLayer::load(&ckpt, 0, &Device::Cpu)?;
    let layer_bytes = layer.bytes() as u64;
    // On as many threads as a stage computes on.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(bench.compute_threads.max(1))
        .build()?;
    let batch1 = pool.install(|| time_layer(&ckpt, &layer, 1))?;
    let burst = pool.install(|| time_layer(&ckpt, &layer, bench.burst.max(1)))?;
    let read_mb_per_s = bench
        .read_mb_per_s
        .unwrap_or(layer_bytes as f64 / (bench.read_ratio * batch1 / 1e3) / 1e6);
    Ok(Calibration {
        layer_bytes,
        layer_ms_batch1: batch1,
        layer_ms_burst: burst,
        read_mb_per_s,
        layer_read_ms: layer_bytes as f64 / (read_mb_per_s * 1e6) * 1e3,
    })
}

/// Telemetry of every stage of `cluster`, newer than `after` (by report number).
async fn telemetry_after(
    cluster: &Cluster,
    after: &[Telemetry],
    every: Duration,
) -> anyhow::Result<Vec<Telemetry>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(every).await;
        let mut now =
            lime_client::status::telemetry(&cluster.broker, Duration::from_millis(200)).await?;
        now.retain(|t| t.epoch == cluster.plan.epoch);
        let fresh = now.len() == cluster.plan.stages.len()
            && now.iter().all(|t| {
                after
                    .iter()
                    .find(|a| a.stage == t.stage)
                    .is_none_or(|a| t.report > a.report)
            });
        if fresh {
            return Ok(now);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the stages published no fresh telemetry"
        );
    }
}

async fn measure(
    bench: &OffloadBench,
    mode: Mode,
    cal: &Calibration,
) -> anyhow::Result<(ModeRow, Vec<Telemetry>)> {
    let dir = bench.dir.join(mode.to_string());
    let mut spec = ClusterSpec::new(&bench.model, bench.stages, &dir);
    spec.mode = mode;
    spec.interleave = bench.interleave;
    spec.compute_threads = Some(bench.compute_threads);
    if mode == Mode::Lime {
        spec.max_inflight = bench.max_inflight;
    }
    spec.memory.budget = Budget::ShareFraction(bench.share);
    spec.memory.read_mb_per_s = Some(cal.read_mb_per_s);
    spec.memory.activation_tokens = Some(bench.activation_tokens);
    // KV room for the whole burst; prompts are under 32 tokens.
    spec.memory.kv_reserve_tokens = Some(bench.burst * (bench.max_tokens as usize + 32));
    let every = Duration::from_millis(250);
    spec.telemetry_ms = Some(every.as_millis() as u64);
    eprintln!("{mode}: starting {} stages", bench.stages);
    let mut cluster = Cluster::start(&spec).await?;
    cluster.wait_online(Duration::from_secs(600)).await?;
    let timeout = Duration::from_secs(3600);
    ask_all(&cluster.broker, &requests(1, 4, 99), timeout, |_, _| {}).await?;

    let sporadic = sporadic(
        &cluster.broker,
        &mode.to_string(),
        bench.sporadic,
        bench.max_tokens,
        timeout,
    )
    .await?;
    eprintln!(
        "{mode}: sporadic time per token {:.1} ms",
        sporadic.tpot_ms_p50
    );

    let before = telemetry_after(&cluster, &[], every).await?;
    eprintln!("{mode}: bursty, {} requests at once", bench.burst);
    let started = Instant::now();
    let answers = ask_all(
        &cluster.broker,
        &requests(bench.burst, bench.max_tokens, 1),
        timeout,
        |_, _| {},
    )
    .await?;
    let bursty = row(&mode.to_string(), "bursty", &answers, started.elapsed())?;
    eprintln!("{mode}: bursty {:.1} tokens/s", bursty.tokens_per_s);
    let after = telemetry_after(&cluster, &before, every).await?;
    cluster.stop();

    let mut time = StageTime::default();
    let mut read = 0;
    for t in &after {
        let Some(b) = before.iter().find(|b| b.stage == t.stage) else {
            continue;
        };
        let d = t.time.since(&b.time);
        time.compute_s += d.compute_s;
        time.load_wait_s += d.load_wait_s;
        time.network_wait_s += d.network_wait_s;
        time.idle_s += d.idle_s;
        read += t.loads.streamed_bytes - b.loads.streamed_bytes;
    }
    let peak = after
        .iter()
        .max_by_key(|t| t.memory.peak_rss_bytes.unwrap_or(0))
        .map(|t| {
            (
                t.memory.peak_rss_bytes.unwrap_or(0),
                t.memory.budget_bytes.unwrap_or(0),
            )
        })
        .unwrap_or_default();
    let overhead = after
        .iter()
        .map(|t| {
            t.memory.peak_rss_bytes.unwrap_or(0) as i64 - t.memory.budget_bytes.unwrap_or(0) as i64
        })
        .max()
        .unwrap_or(0);
    let row = ModeRow {
        mode: mode.to_string(),
        interleave: cluster.plan.interleave(),
        offloaded: after.iter().map(|t| t.residency.offloaded.len()).sum(),
        layers: after
            .iter()
            .map(|t| t.residency.offloaded.len() + t.residency.resident.len())
            .sum(),
        slots: after.iter().map(|t| t.residency.slots).max().unwrap_or(0),
        sporadic,
        bursty,
        bursty_bubble: time.load_wait_s / time.total_s().max(1e-9),
        bursty_time: time,
        bursty_read_bytes: read,
        budget_bytes: after.iter().filter_map(|t| t.memory.budget_bytes).sum(),
        peak_rss_bytes: peak.0,
        peak_rss_budget_bytes: peak.1,
        rss_overhead_bytes: overhead,
        peak_accounted_bytes: after
            .iter()
            .map(|t| t.memory.peak_accounted_bytes)
            .max()
            .unwrap_or(0),
    };
    Ok((row, after))
}

/// The cost model's bound on lime's bursty throughput: a token step of the whole
/// burst takes at least the longest of (a) the slowest stage reading its offloaded
/// layers once, (b) computing every layer at the burst's batch (the emulated
/// stages share this machine's CPU, so their compute adds up rather than
/// overlapping as on separate devices), (c) moving the activations over every hop
/// (loopback: negligible, not counted).
fn bound(bench: &OffloadBench, cal: &Calibration, lime: &[Telemetry]) -> f64 {
    let read_s = lime
        .iter()
        .map(|t| t.residency.offloaded.len() as f64 * cal.layer_read_ms / 1e3)
        .fold(0.0, f64::max);
    let layers: usize = lime
        .iter()
        .map(|t| t.residency.offloaded.len() + t.residency.resident.len())
        .sum();
    let compute_s = layers as f64 * cal.layer_ms_burst / 1e3;
    bench.burst as f64 / read_s.max(compute_s)
}

pub async fn run(bench: &OffloadBench) -> anyhow::Result<OffloadReport> {
    lime_client::synth::ensure(lime_kernels::synth::Preset::Bench, &bench.model)?;
    eprintln!("calibrating: one layer at batch 1 and {}…", bench.burst);
    let cal = calibrate(bench)?;
    eprintln!(
        "a layer is {:.1} MB and computes in {:.2} ms at batch 1, {:.2} ms at batch {}; emulated reads at {:.0} MB/s take {:.2} ms per layer",
        cal.layer_bytes as f64 / 1e6,
        cal.layer_ms_batch1,
        cal.layer_ms_burst,
        bench.burst,
        cal.read_mb_per_s,
        cal.layer_read_ms
    );
    let mut rows = Vec::new();
    let mut lime_telemetry = None;
    for &mode in &bench.modes {
        let (row, telemetry) = measure(bench, mode, &cal).await?;
        if mode == Mode::Lime {
            lime_telemetry = Some(telemetry);
        }
        rows.push(row);
    }
    let find = |m: Mode| rows.iter().find(|r| r.mode == m.to_string());
    let (lime, naive, mdi) = (find(Mode::Lime), find(Mode::Naive), find(Mode::Mdi));
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let tps = |r: Option<&ModeRow>| r.map(|r| r.bursty.tokens_per_s);
    let tpot = |r: Option<&ModeRow>| r.map(|r| r.sporadic.tpot_ms_p50);
    let bound_tps = lime_telemetry.as_ref().map(|t| bound(bench, &cal, t));
    Ok(OffloadReport {
        model: bench.model.display().to_string(),
        stages: bench.stages,
        share: bench.share,
        bursty_vs_naive: ratio(tps(lime), tps(naive)),
        bursty_vs_mdi: ratio(tps(lime), tps(mdi)),
        sporadic_vs_naive: ratio(tpot(naive), tpot(lime)),
        sporadic_vs_mdi: ratio(tpot(mdi), tpot(lime)),
        bound_ratio: ratio(tps(lime), bound_tps),
        bound_tokens_per_s: bound_tps,
        bound_note: "max of read-bound (slowest stage reads its offloaded layers once per step) and compute-bound (every layer at the burst's batch; the emulated stages share one CPU)".into(),
        calibration: cal,
        rows,
    })
}

impl fmt::Display for OffloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mb = |b: u64| b as f64 / (1 << 20) as f64;
        writeln!(
            f,
            "model {}, {} stages, budgets {:.0}% of each stage's weights; layer {:.1} MB: {:.2} ms at batch 1, read {:.2} ms at {:.0} MB/s (emulated)",
            self.model,
            self.stages,
            self.share * 100.0,
            self.calibration.layer_bytes as f64 / 1e6,
            self.calibration.layer_ms_batch1,
            self.calibration.layer_read_ms,
            self.calibration.read_mb_per_s
        )?;
        writeln!(
            f,
            "{:<6} {:>2} {:>9} {:>5} {:>12} {:>11} {:>7} {:>8} {:>8} {:>6} {:>9} {:>15}",
            "MODE",
            "v",
            "OFFLOADED",
            "SLOTS",
            "SPORADIC ms",
            "BURST tok/s",
            "BUBBLE",
            "COMPUTE",
            "NETWORK",
            "IDLE",
            "READ MB",
            "PEAK RSS/BUDGET"
        )?;
        for r in &self.rows {
            let t = &r.bursty_time;
            let total = t.total_s().max(1e-9);
            writeln!(
                f,
                "{:<6} {:>2} {:>6}/{:<2} {:>5} {:>12.1} {:>11.1} {:>6.1}% {:>7.1}% {:>7.1}% {:>5.1}% {:>9.0} {:>7.0}/{:<7.0}",
                r.mode,
                r.interleave,
                r.offloaded,
                r.layers,
                r.slots,
                r.sporadic.tpot_ms_p50,
                r.bursty.tokens_per_s,
                100.0 * t.load_wait_s / total,
                100.0 * t.compute_s / total,
                100.0 * t.network_wait_s / total,
                100.0 * t.idle_s / total,
                mb(r.bursty_read_bytes),
                mb(r.peak_rss_bytes),
                mb(r.peak_rss_budget_bytes),
            )?;
        }
        let show = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}x"));
        writeln!(
            f,
            "bursty throughput, lime over naive: {} (target >= 3.7x), over mdi: {}",
            show(self.bursty_vs_naive),
            show(self.bursty_vs_mdi)
        )?;
        writeln!(
            f,
            "sporadic time per token, naive over lime: {} (target >= 1.7x), mdi over lime: {}",
            show(self.sporadic_vs_naive),
            show(self.sporadic_vs_mdi)
        )?;
        if let Some(lime) = self.rows.iter().find(|r| r.mode == "lime") {
            writeln!(
                f,
                "lime's loading bubble in bursty: {:.1}% of stage time (target <= 10%)",
                100.0 * lime.bursty_bubble
            )?;
        }
        if let (Some(b), Some(r)) = (self.bound_tokens_per_s, self.bound_ratio) {
            writeln!(
                f,
                "cost-model bound for lime bursty: {b:.1} tokens/s; achieved {:.0}% of it ({})",
                100.0 * r,
                self.bound_note
            )?;
        }
        let overhead = self
            .rows
            .iter()
            .map(|r| r.rss_overhead_bytes)
            .max()
            .unwrap_or(0);
        writeln!(
            f,
            "largest peak RSS over budget on any stage: {:.1} MiB (fixed overhead: runtime, MQTT, tokenizer, allocator)",
            overhead as f64 / (1 << 20) as f64
        )
    }
}
