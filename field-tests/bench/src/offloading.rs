//! `lime bench offload`: lime against the `naive` and `mdi` baselines on a model
//! that does not fit, all three started from the same binaries in one run.
//!
//! The stages are emulated devices: each computes `--compute-slowdown` times
//! slower than this machine (`emulate.compute_slowdown`), so that four of them on
//! two cores overlap like four separate devices instead of contending for the
//! cores. Every device gets the same budget (a share of its weights on an even
//! split) and the same emulated storage: a paced read bandwidth chosen so that
//! reading a layer takes `ratio` times as long as the emulated device computes
//! it at batch 1, as on a Jetson streaming a 70B model. The page cache would
//! otherwise serve reads at memory speed.
//!
//! lime runs the plan the broker's planner makes from the stages' profiles for
//! the bursty workload (interleave, micro-batches in flight, offloaded layers),
//! unless `--interleave` or `--max-inflight` fix one. The report gives sporadic
//! time per token, bursty throughput, where each stage's time went (computing,
//! waiting for weights, for the ring, idle), bytes read and the loader's CPU,
//! peak RSS against the budget, and lime's figures against the planner's
//! prediction of its plan.

use crate::cluster::{Cluster, ClusterSpec, Mode, PlannerSpec};
use crate::serving::{requests, row, sporadic, ServingRow};
use lime_client::ask::ask_all;
use lime_kernels::{Checkpoint, DecoderLayer, Device};
use lime_schemas::{PlanPrediction, StageTime, Telemetry};
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
    /// lime's interleave degree, fixing the plan instead of the planner's (the
    /// baselines are contiguous); 4 when only --max-inflight is given.
    #[arg(long)]
    pub interleave: Option<usize>,
    /// Each stage's memory budget as a share of its weights.
    #[arg(long, default_value_t = 0.5)]
    pub share: f64,
    /// Emulated devices compute this many times slower than this machine (1: no
    /// emulation; the stages then contend for its cores).
    #[arg(long, default_value_t = 4.0)]
    pub compute_slowdown: f64,
    /// Emulated storage: reading a layer takes this many times the emulated
    /// device's compute of it at batch 1.
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
    /// Of them, what `naive` is sent: it serves one request at a time, so its
    /// tokens/s does not depend on how many wait, and the whole burst would
    /// take it half an hour on emulated devices.
    #[arg(long, default_value_t = 4)]
    pub naive_burst: usize,
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
    /// lime's micro-batches in flight (0: one per stage), fixing the plan
    /// instead of the planner's; 0 when only --interleave is given.
    #[arg(long)]
    pub max_inflight: Option<usize>,
    /// Configs and logs of the clusters.
    #[arg(skip = crate::scratch_dir("lime-bench-offload"))]
    pub dir: PathBuf,
}

impl OffloadBench {
    /// lime's fixed interleave and micro-batches in flight, if not the planner's.
    fn fixed(&self) -> Option<(usize, usize)> {
        (self.interleave.is_some() || self.max_inflight.is_some())
            .then(|| (self.interleave.unwrap_or(4), self.max_inflight.unwrap_or(0)))
    }

    /// Tokens of context each bursty sequence needs: prompts are under 32.
    fn context(&self) -> usize {
        self.max_tokens as usize + 32
    }
}

/// How long one layer takes on an emulated device at batch 1 and at the bursty
/// batch (this process's time × the slowdown).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Calibration {
    pub layer_bytes: u64,
    pub compute_slowdown: f64,
    pub layer_ms_batch1: f64,
    pub layer_ms_burst: f64,
    pub read_mb_per_s: f64,
    /// How long reading one layer takes at that bandwidth.
    pub layer_read_ms: f64,
    /// The bursty requests' mean prompt, in tokens.
    pub prompt_tokens: usize,
}

/// One mode's measurements.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModeRow {
    pub mode: String,
    pub interleave: usize,
    /// Micro-batches in flight the plan ran with (its `max_inflight`; 0: one
    /// per stage).
    pub max_inflight: usize,
    /// The planner's prediction of the plan, when the planner made it.
    pub predicted: Option<PlanPrediction>,
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
    /// CPU seconds the stages' loaders used for those reads.
    pub bursty_read_cpu_s: f64,
    /// Visits to a streamed layer kept for them by an earlier micro-batch of
    /// their round (reads shared), during the bursty run.
    pub bursty_shared_visits: u64,
    /// Decode throughput of the bursty run while every request generates
    /// (else sequences / median time per token).
    pub bursty_decode_tokens_per_s: f64,
    /// Seconds from the burst's sending to its last first token: every prompt
    /// prefilled.
    pub bursty_prefill_s: f64,
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
    /// lime's bursty tokens/s as the planner predicts them for its plan (or, for
    /// a fixed plan, a bound), and measured decode tokens/s over it.
    pub bound_tokens_per_s: Option<f64>,
    pub bound_ratio: Option<f64>,
    pub bound_note: String,
    /// lime's measured sporadic TTFT (p50) over the planner's prediction.
    pub ttft_vs_predicted: Option<f64>,
    /// lime's measured bursty time per token (p50) over the predicted round.
    pub tpot_vs_predicted: Option<f64>,
    /// lime's burst as predicted, prefill included: its prompts' first round,
    /// then a round per further token; tokens/s and measured over it.
    pub burst_predicted_tokens_per_s: Option<f64>,
    pub burst_vs_predicted: Option<f64>,
    /// lime's measured burst prefill (to the last first token) over predicted.
    pub burst_prefill_vs_predicted: Option<f64>,
}

/// Milliseconds for `layer` to decode `tokens` sequences, as an emulated
/// stage profiles it: the best run, which its pace multiplies.
fn time_layer(ckpt: &Checkpoint, layer: &DecoderLayer, tokens: usize) -> anyhow::Result<f64> {
    let timing = lime_stage::control::profile::Timing {
        reps: 21,
        best: true,
    };
    Ok(lime_stage::control::profile::time_decode(ckpt.config(), layer, tokens, timing)? * 1e3)
}

fn calibrate(bench: &OffloadBench) -> anyhow::Result<Calibration> {
    let ckpt = Checkpoint::open(&bench.model)?;
    let layer = DecoderLayer::load(&ckpt, 0, &Device::Cpu)?;
    let layer_bytes = layer.bytes() as u64;
    // On as many threads as a stage computes on.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(bench.compute_threads.max(1))
        .build()?;
    let slowdown = bench.compute_slowdown.max(1.0);
    let batch1 = pool.install(|| time_layer(&ckpt, &layer, 1))? * slowdown;
    let burst = pool.install(|| time_layer(&ckpt, &layer, bench.burst.max(1)))? * slowdown;
    let read_mb_per_s = bench
        .read_mb_per_s
        .unwrap_or(layer_bytes as f64 / (bench.read_ratio * batch1 / 1e3) / 1e6);
    Ok(Calibration {
        layer_bytes,
        compute_slowdown: slowdown,
        layer_ms_batch1: batch1,
        layer_ms_burst: burst,
        read_mb_per_s,
        layer_read_ms: layer_bytes as f64 / (read_mb_per_s * 1e6) * 1e3,
        prompt_tokens: prompt_tokens(bench)?,
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

/// The cluster `mode` runs on: the same emulated devices for every mode.
fn cluster_spec(
    bench: &OffloadBench,
    mode: Mode,
    cal: &Calibration,
    budgets: &[u64],
) -> ClusterSpec {
    let dir = bench.dir.join(mode.to_string());
    let mut spec = ClusterSpec::new(&bench.model, bench.stages, &dir);
    spec.mode = mode;
    spec.compute_threads = Some(bench.compute_threads);
    spec.compute_slowdown = cal.compute_slowdown;
    if mode == Mode::Lime {
        match bench.fixed() {
            Some((interleave, inflight)) => {
                spec.interleave = interleave;
                spec.max_inflight = inflight;
            }
            None => {
                let mut planner = PlannerSpec::new("bursty", bench.burst, bench.context());
                // One plan for the whole run: a re-plan mid-run would mix two.
                planner.adapt = false;
                planner.prompt_tokens = cal.prompt_tokens;
                spec.planner = Some(planner);
            }
        }
    }
    spec.memory.stage_budget_bytes = budgets.to_vec();
    spec.memory.read_mb_per_s = Some(cal.read_mb_per_s);
    spec.memory.activation_tokens = Some(bench.activation_tokens);
    // KV room for the whole burst.
    spec.memory.kv_reserve_tokens = Some(bench.burst * bench.context());
    spec
}

async fn measure(
    bench: &OffloadBench,
    mode: Mode,
    cal: &Calibration,
    budgets: &[u64],
    profiles: &[PathBuf],
) -> anyhow::Result<(ModeRow, Vec<Telemetry>)> {
    let mut spec = cluster_spec(bench, mode, cal, budgets);
    spec.profiles = Some(profiles.to_vec());
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
    let burst = if mode == Mode::Naive {
        bench.naive_burst.clamp(1, bench.burst.max(1))
    } else {
        bench.burst
    };
    eprintln!("{mode}: bursty, {burst} requests at once");
    let started = Instant::now();
    let mut pieces = Vec::new();
    let answers = ask_all(
        &cluster.broker,
        &requests(burst, bench.max_tokens, 1),
        timeout,
        |_, reply| {
            if matches!(reply, lime_schemas::Reply::Text(_)) {
                pieces.push(Instant::now());
            }
        },
    )
    .await?;
    let bursty = row(&mode.to_string(), "bursty", &answers, started.elapsed())?;
    eprintln!("{mode}: bursty {:.1} tokens/s", bursty.tokens_per_s);
    let after = telemetry_after(&cluster, &before, every).await?;
    cluster.stop();

    let mut time = StageTime::default();
    let (mut read, mut read_cpu, mut shared) = (0, 0.0, 0);
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
        read_cpu += t.loads.read_cpu_s - b.loads.read_cpu_s;
        shared += t.residency.shared_visits - b.residency.shared_visits;
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
        max_inflight: cluster.plan.max_inflight.unwrap_or(spec.max_inflight),
        predicted: cluster.plan.prediction.clone(),
        bursty_read_cpu_s: read_cpu,
        bursty_shared_visits: shared,
        bursty_prefill_s: answers
            .iter()
            .filter_map(|a| a.first)
            .max()
            .map_or(0.0, |t| (t - started).as_secs_f64()),
        bursty_decode_tokens_per_s: steady_decode(&answers, &pieces).unwrap_or(
            // naive generates for one request at a time.
            if mode == Mode::Naive { 1 } else { burst } as f64 * 1e3 / bursty.tpot_ms_p50.max(1e-9),
        ),
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

/// Decode tokens/s while every request of a burst is generating: from the last
/// first token (every prompt prefilled) to the first answer's end, the text
/// pieces streamed meanwhile, at the burst's tokens per piece. `None` when the
/// requests never all generate at once over a few rounds (naive serves them one
/// by one).
fn steady_decode(answers: &[lime_client::ask::Answer], pieces: &[Instant]) -> Option<f64> {
    let from = answers.iter().map(|a| a.first).max()??;
    let to = answers.iter().map(|a| a.last).min()?;
    let tokens: u64 = answers
        .iter()
        .filter_map(|a| a.outcome.as_ref().ok())
        .map(|f| f.usage.completion_tokens as u64)
        .sum();
    let per_piece = tokens as f64 / pieces.len().max(1) as f64;
    let within = pieces.iter().filter(|&&t| t > from && t <= to).count();
    // Three rounds' worth at the least, or the window says little.
    (to > from && within >= 3 * answers.len())
        .then(|| within as f64 * per_piece / (to - from).as_secs_f64())
}

/// The bursty requests' mean prompt length in tokens (the planner predicts
/// TTFT and the burst's prefill for it).
fn prompt_tokens(bench: &OffloadBench) -> anyhow::Result<usize> {
    let tokenizer = lime_kernels::TextTokenizer::from_path(&bench.model)?;
    let burst = requests(bench.burst.max(1), bench.max_tokens, 1);
    let mut total = 0;
    for r in &burst {
        total += tokenizer
            .encode(r.prompt.as_deref().unwrap_or_default(), true)?
            .len();
    }
    Ok(total.div_ceil(burst.len()))
}

/// A bound on lime's bursty throughput for a fixed plan (no planner prediction):
/// a round takes at least the slowest stage reading its offloaded layers once
/// (reads shared by the round's micro-batches) and the busiest stage computing
/// its layers at the burst's batch on its emulated device.
fn fixed_bound(bench: &OffloadBench, cal: &Calibration, lime: &[Telemetry]) -> f64 {
    let slowest =
        |per_stage: &dyn Fn(&Telemetry) -> f64| lime.iter().map(per_stage).fold(0.0, f64::max);
    let read_s = slowest(&|t| t.residency.offloaded.len() as f64 * cal.layer_read_ms / 1e3);
    let compute_s = slowest(&|t| {
        (t.residency.offloaded.len() + t.residency.resident.len()) as f64 * cal.layer_ms_burst / 1e3
    });
    bench.burst as f64 / read_s.max(compute_s)
}

pub async fn run(bench: &OffloadBench) -> anyhow::Result<OffloadReport> {
    lime_client::synth::ensure(lime_kernels::synth::Preset::Bench, &bench.model)?;
    eprintln!("calibrating: one layer at batch 1 and {}…", bench.burst);
    let cal = calibrate(bench)?;
    eprintln!(
        "a layer is {:.1} MB and computes in {:.2} ms at batch 1, {:.2} ms at batch {} on a device {}x slower than this machine; emulated reads at {:.0} MB/s take {:.2} ms per layer",
        cal.layer_bytes as f64 / 1e6,
        cal.layer_ms_batch1,
        cal.layer_ms_burst,
        bench.burst,
        cal.compute_slowdown,
        cal.read_mb_per_s,
        cal.layer_read_ms
    );
    let memory = crate::cluster::MemorySpec {
        activation_tokens: Some(bench.activation_tokens),
        ..Default::default()
    };
    let budgets = crate::cluster::share_budgets(&bench.model, bench.stages, bench.share, &memory)?;
    // One profile of each device, measured in turn on a quiet machine: every
    // mode's emulated devices compute at its figures, and lime's planner plans
    // from them.
    let mut profiling = cluster_spec(bench, Mode::Lime, &cal, &budgets);
    profiling.dir = bench.dir.join("profiles");
    let profiles = crate::cluster::profile_stages(&profiling)?;
    let mut rows = Vec::new();
    let mut lime_telemetry = None;
    for &mode in &bench.modes {
        let (row, telemetry) = measure(bench, mode, &cal, &budgets, &profiles).await?;
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
    let predicted = lime.and_then(|r| r.predicted.clone());
    let (bound_tps, bound_note) = match (&predicted, &lime_telemetry) {
        (Some(p), _) => (
            Some(p.tokens_per_s),
            format!(
                "the planner's prediction of its plan ({}); measured as decode throughput while every request of the burst generates",
                p.reason
            ),
        ),
        (None, Some(t)) => (
            Some(fixed_bound(bench, &cal, t)),
            "fixed plan: the slowest stage's reads once per round, or the busiest stage's compute at the burst's batch".into(),
        ),
        (None, None) => (None, String::new()),
    };
    let decode_tps = lime.map(|r| r.bursty_decode_tokens_per_s);
    let burst_predicted = predicted.as_ref().map(|p| {
        let tokens = bench.burst as f64 * bench.max_tokens as f64;
        tokens
            / (p.burst_prefill_s + bench.max_tokens.saturating_sub(1) as f64 * p.time_per_token_s)
                .max(1e-9)
    });
    Ok(OffloadReport {
        model: bench.model.display().to_string(),
        stages: bench.stages,
        share: bench.share,
        bursty_vs_naive: ratio(tps(lime), tps(naive)),
        bursty_vs_mdi: ratio(tps(lime), tps(mdi)),
        sporadic_vs_naive: ratio(tpot(naive), tpot(lime)),
        sporadic_vs_mdi: ratio(tpot(mdi), tpot(lime)),
        bound_ratio: ratio(decode_tps, bound_tps),
        bound_tokens_per_s: bound_tps,
        bound_note,
        ttft_vs_predicted: lime
            .zip(predicted.as_ref())
            .map(|(r, p)| r.sporadic.ttft_ms_p50 / (p.ttft_s * 1e3)),
        tpot_vs_predicted: lime
            .zip(predicted.as_ref())
            .map(|(r, p)| r.bursty.tpot_ms_p50 / (p.time_per_token_s * 1e3)),
        burst_predicted_tokens_per_s: burst_predicted,
        burst_vs_predicted: ratio(tps(lime), burst_predicted),
        burst_prefill_vs_predicted: lime
            .zip(predicted.as_ref())
            .map(|(r, p)| r.bursty_prefill_s / p.burst_prefill_s.max(1e-9)),
        calibration: cal,
        rows,
    })
}

impl fmt::Display for OffloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mb = |b: u64| b as f64 / (1 << 20) as f64;
        writeln!(
            f,
            "model {}, {} stages emulating devices {}x slower than this machine, budgets {:.0}% of each stage's weights; layer {:.1} MB: {:.2} ms at batch 1, read {:.2} ms at {:.0} MB/s (emulated)",
            self.model,
            self.stages,
            self.calibration.compute_slowdown,
            self.share * 100.0,
            self.calibration.layer_bytes as f64 / 1e6,
            self.calibration.layer_ms_batch1,
            self.calibration.layer_read_ms,
            self.calibration.read_mb_per_s
        )?;
        writeln!(
            f,
            "{:<6} {:>2} {:>2} {:>9} {:>5} {:>12} {:>11} {:>7} {:>8} {:>8} {:>6} {:>9} {:>8} {:>15}",
            "MODE",
            "v",
            "k",
            "OFFLOADED",
            "SLOTS",
            "SPORADIC ms",
            "BURST tok/s",
            "BUBBLE",
            "COMPUTE",
            "NETWORK",
            "IDLE",
            "READ MB",
            "READ CPU",
            "PEAK RSS/BUDGET"
        )?;
        for r in &self.rows {
            let t = &r.bursty_time;
            let total = t.total_s().max(1e-9);
            writeln!(
                f,
                "{:<6} {:>2} {:>2} {:>6}/{:<2} {:>5} {:>12.1} {:>11.1} {:>6.1}% {:>7.1}% {:>7.1}% {:>5.1}% {:>9.0} {:>7.1}s {:>7.0}/{:<7.0}",
                r.mode,
                r.interleave,
                if r.max_inflight == 0 { self.stages } else { r.max_inflight },
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
                r.bursty_read_cpu_s,
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
        if let Some(lime) = self.rows.iter().find(|r| r.mode == "lime") {
            writeln!(
                f,
                "lime's bursty decode: {:.1} tokens/s ({} visits shared a read; loaders' CPU {:.1} s for {:.0} MB, {:.2} ms per MB)",
                lime.bursty_decode_tokens_per_s,
                lime.bursty_shared_visits,
                lime.bursty_read_cpu_s,
                mb(lime.bursty_read_bytes),
                1e3 * lime.bursty_read_cpu_s / mb(lime.bursty_read_bytes).max(1e-9),
            )?;
        }
        if let (Some(b), Some(r)) = (self.bound_tokens_per_s, self.bound_ratio) {
            writeln!(
                f,
                "predicted for lime bursty: {b:.1} tokens/s; measured / predicted {r:.2} (target 0.85-1.15; {})",
                self.bound_note
            )?;
        }
        if let (Some(b), Some(r)) = (self.burst_predicted_tokens_per_s, self.burst_vs_predicted) {
            writeln!(
                f,
                "predicted for lime's whole burst, prefill included: {b:.1} tokens/s; measured / predicted {r:.2}"
            )?;
        }
        if let (Some(t), Some(p), Some(b)) = (
            self.tpot_vs_predicted,
            self.ttft_vs_predicted,
            self.burst_prefill_vs_predicted,
        ) {
            writeln!(
                f,
                "measured / predicted: bursty time per token {t:.2}, sporadic TTFT {p:.2}, the burst's prefill (to its last first token) {b:.2}"
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
