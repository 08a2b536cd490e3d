//! `lime bench validate-plan`: the cost model checked against measurement. For
//! each configuration (stage count, memory budgets, emulated read bandwidths,
//! workload) the stages are profiled (`lime-stage --profile`), then three plans
//! run side by side on real clusters: the broker planner's, an even split and a
//! memory-proportional split. Each row reports predicted and measured time per
//! token and tokens/s.

use crate::cluster::{Cluster, ClusterSpec, PlannerSpec};
use crate::serving::{requests, sporadic};
use lime_client::ask::ask_all;
use lime_kernels::Checkpoint;
use lime_plan::{self as planner, files, Runtime, Workload, WorkloadKind};
use lime_schemas::{LinkSpeed, Links, Plan};
use lime_stage::config::MemoryConfig;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One configuration of emulated devices.
#[derive(Debug, Clone)]
pub struct Setup {
    pub name: String,
    /// Each stage's budget: this share of the model's layer weights, on top of
    /// room for the embedding and head, the workspace and the KV reserve.
    pub shares: Vec<f64>,
    /// Each stage's emulated read bandwidth, MB/s.
    pub read_mb_s: Vec<f64>,
    pub workload: WorkloadKind,
}

impl Setup {
    fn new(name: &str, shares: &[f64], read: &[f64], workload: WorkloadKind) -> Self {
        Self {
            name: name.into(),
            shares: shares.to_vec(),
            read_mb_s: read.to_vec(),
            workload,
        }
    }
}

/// The configurations `lime bench validate-plan` runs by default.
pub fn default_setups() -> Vec<Setup> {
    use WorkloadKind::{Bursty, Sporadic};
    vec![
        Setup::new("1 stage 60%", &[0.6], &[300.0], Sporadic),
        Setup::new("2 equal", &[0.4, 0.4], &[300.0, 300.0], Sporadic),
        Setup::new("2 uneven", &[0.55, 0.25], &[400.0, 200.0], Sporadic),
        Setup::new(
            "3 equal",
            &[0.3, 0.3, 0.3],
            &[300.0, 300.0, 300.0],
            Sporadic,
        ),
        Setup::new(
            "3 uneven",
            &[0.45, 0.25, 0.15],
            &[500.0, 300.0, 200.0],
            Sporadic,
        ),
        Setup::new("2 uneven bursty", &[0.5, 0.2], &[400.0, 250.0], Bursty),
        Setup::new(
            "4 uneven",
            &[0.3, 0.2, 0.2, 0.1],
            &[400.0, 300.0, 300.0, 200.0],
            Sporadic,
        ),
    ]
}

/// What to run (`lime bench validate-plan`'s arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct ValidateBench {
    /// Checkpoint directory; the `bench` preset is synthesised there if empty.
    #[arg(long, default_value = "models/bench")]
    pub model: PathBuf,
    /// The emulated device setups measured ([`default_setups`] unless a caller
    /// picks others).
    #[arg(skip = default_setups())]
    pub setups: Vec<Setup>,
    /// Sporadic requests per measurement.
    #[arg(long, default_value_t = 2)]
    pub requests: usize,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 10)]
    pub max_tokens: u32,
    /// Sequences at once for bursty setups.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Tokens of KV per sequence planned for (and reserved by stages).
    #[arg(long, default_value_t = 256)]
    pub context: usize,
    /// Compute threads per stage.
    #[arg(long, default_value_t = 1)]
    pub compute_threads: usize,
    /// Configs and logs of the clusters.
    #[arg(skip = crate::scratch_dir("lime-validate"))]
    pub dir: PathBuf,
}

/// One plan measured in one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub setup: String,
    pub plan: String,
    pub interleave: usize,
    /// Layers and streamed layers per stage, `m/o`.
    pub layers: String,
    pub predicted_ms_per_token: f64,
    pub measured_ms_per_token: f64,
    pub predicted_tokens_per_s: f64,
    pub measured_tokens_per_s: f64,
    /// (measured − predicted) / predicted, time per token.
    pub error: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub rows: Vec<Row>,
    /// The largest |error| of the planner's plans and of all plans.
    pub worst_planner_error: f64,
    pub worst_error: f64,
    /// Setups where the planner's plan measured more than 2% slower than an
    /// alternative.
    pub planner_beaten: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "plan validation on {}", self.model)?;
        writeln!(
            f,
            "{:<16} {:<13} {:>2} {:<22} {:>10} {:>10} {:>7} {:>9} {:>9}",
            "setup",
            "plan",
            "v",
            "layers/streamed",
            "pred ms/t",
            "meas ms/t",
            "error",
            "pred t/s",
            "meas t/s"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<16} {:<13} {:>2} {:<22} {:>10.1} {:>10.1} {:>+6.1}% {:>9.2} {:>9.2}",
                r.setup,
                r.plan,
                r.interleave,
                r.layers,
                r.predicted_ms_per_token,
                r.measured_ms_per_token,
                r.error * 100.0,
                r.predicted_tokens_per_s,
                r.measured_tokens_per_s
            )?;
        }
        writeln!(
            f,
            "worst |error|: planner's plans {:.1}%, all plans {:.1}%",
            self.worst_planner_error * 100.0,
            self.worst_error * 100.0
        )?;
        if self.planner_beaten.is_empty() {
            writeln!(
                f,
                "the planner's plan measured at least as fast as both splits in every setup"
            )
        } else {
            writeln!(
                f,
                "the planner's plan was beaten in: {}",
                self.planner_beaten.join(", ")
            )
        }
    }
}

/// Cuts giving stage `i` `counts[i]` layers, contiguous, v = 1.
fn cuts(counts: &[usize]) -> Vec<usize> {
    counts[..counts.len() - 1]
        .iter()
        .scan(0, |at, c| {
            *at += c;
            Some(*at)
        })
        .collect()
}

/// `total` layers split in proportion to `weights`, each stage at least one
/// (largest remainder).
fn proportional(total: usize, weights: &[f64]) -> Vec<usize> {
    let sum: f64 = weights.iter().sum();
    let spare = total - weights.len();
    let exact: Vec<f64> = weights.iter().map(|w| spare as f64 * w / sum).collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| 1 + e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let mut missing = total - counts.iter().sum::<usize>();
    for i in order.into_iter().cycle() {
        if missing == 0 {
            break;
        }
        counts[i] += 1;
        missing -= 1;
    }
    counts
}

pub async fn run(bench: &ValidateBench) -> anyhow::Result<Report> {
    let ckpt = Checkpoint::open(&bench.model)?;
    let shape = ckpt.shape();
    let layers = shape.layers;
    let mut rows = Vec::new();
    let mut beaten = Vec::new();
    for setup in &bench.setups {
        let n = setup.shares.len();
        anyhow::ensure!(
            n == setup.read_mb_s.len() && n > 0 && n <= layers,
            "setup {}: bad shapes",
            setup.name
        );
        let memory = MemoryConfig {
            kv_reserve_tokens: Some(bench.context),
            ..MemoryConfig::default()
        };
        let costs = lime_stage::memory::stage_costs(
            &ckpt,
            layers,
            true,
            &memory,
            lime_kernels::Placement::Cpu,
        );
        let room = costs.budget_for(0) - costs.layer();
        let budgets: Vec<u64> = setup
            .shares
            .iter()
            .map(|s| room + (s * (layers as u64 * costs.layer()) as f64) as u64)
            .collect();
        let (concurrency, workload_name) = match setup.workload {
            WorkloadKind::Sporadic => (1, "sporadic"),
            WorkloadKind::Bursty => (bench.concurrency, "bursty"),
        };
        let dir = bench
            .dir
            .join(setup.name.replace(' ', "-").replace('%', ""));
        let base = |sub: &str| {
            let mut spec = ClusterSpec::new(&bench.model, n, dir.join(sub));
            spec.compute_threads = Some(bench.compute_threads);
            spec.memory.stage_budget_bytes = budgets.clone();
            spec.memory.stage_read_mb_per_s = setup.read_mb_s.clone();
            // The KV room the planner provisions, so every plan runs with the slots
            // its prediction assumes.
            spec.memory.kv_reserve_tokens = Some(bench.context * concurrency);
            spec.max_inflight = if setup.workload == WorkloadKind::Bursty {
                1
            } else {
                0
            };
            spec
        };

        // Profiles first, each stage alone on the machine.
        let mut planner_spec = PlannerSpec::new(workload_name, concurrency, bench.context);
        let mut probe = base("planner");
        probe.planner = Some(planner_spec.clone());
        eprintln!("{}: profiling {n} stage(s)", setup.name);
        let profile_files = crate::cluster::profile_stages(&probe)?;
        planner_spec.profiles = Some(profile_files.clone());
        let devices = profile_files
            .iter()
            .map(|f| files::load_devices(f).map(|mut d| d.remove(0)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let links = Links::uniform(LinkSpeed {
            mbit_per_s: planner_spec.link_mbit_per_s,
            latency_ms: planner_spec.link_latency_ms,
        });
        let problem = planner::Problem {
            shape: &shape,
            devices: &devices,
            links: &links,
            workload: match setup.workload {
                WorkloadKind::Sporadic => Workload::sporadic(bench.context),
                WorkloadKind::Bursty => Workload::bursty(concurrency, bench.context),
            },
            runtime: Runtime::default(),
            starter: None,
        };
        let planned = planner::plan(&problem, 1)?;

        let even = proportional(layers, &vec![1.0; n]);
        let by_memory = proportional(
            layers,
            &budgets.iter().map(|&b| b as f64).collect::<Vec<_>>(),
        );
        let mut measured_setup = Vec::new();
        for (label, counts) in [
            ("planner", None),
            ("even", Some(even)),
            ("memory-prop", Some(by_memory)),
        ] {
            let mut spec = base(label);
            let (layout, prediction) = match &counts {
                None => {
                    spec.planner = Some(planner_spec.clone());
                    // The plan says how many micro-batches to keep in flight.
                    spec.max_inflight = 0;
                    (planned.layout.clone(), planned.prediction.clone())
                }
                Some(c) => {
                    spec.cuts = Some(cuts(c));
                    // Stage i is device i; each chooses its own streamed layers.
                    let stages = (0..n)
                        .map(|i| lime_schemas::PlanStage {
                            name: format!("s{i}"),
                            data_addr: "127.0.0.1:1".into(),
                            offloaded: None,
                        })
                        .collect();
                    let plan = Plan::from_cuts(1, stages, &cuts(c), layers)?;
                    // One micro-batch in flight (max_inflight 1 for bursty setups).
                    let layout =
                        planner::layout_of(&problem, &plan, 1).map_err(anyhow::Error::msg)?;
                    let pred = planner::evaluate(&problem, &layout).map_err(anyhow::Error::msg)?;
                    (layout, pred)
                }
            };
            eprintln!("{}: {label}: starting", setup.name);
            let mut cluster = Cluster::start(&spec).await?;
            cluster.wait_online(Duration::from_secs(600)).await?;
            if counts.is_none() {
                anyhow::ensure!(
                    cluster.plan.chunks == planned.plan.chunks,
                    "the broker's plan differs from the one planned here"
                );
            }
            let timeout = Duration::from_secs(3600);
            ask_all(&cluster.broker, &requests(1, 4, 99), timeout, |_, _| {}).await?;
            let (ms_per_token, tokens_per_s) = match setup.workload {
                WorkloadKind::Sporadic => {
                    let row = sporadic(
                        &cluster.broker,
                        label,
                        bench.requests,
                        bench.max_tokens,
                        timeout,
                    )
                    .await?;
                    (row.tpot_ms_p50, 1e3 / row.tpot_ms_p50)
                }
                WorkloadKind::Bursty => {
                    eprintln!("{label}: {concurrency} requests at once");
                    let started = Instant::now();
                    let answers = ask_all(
                        &cluster.broker,
                        &requests(concurrency, bench.max_tokens, 1),
                        timeout,
                        |_, _| {},
                    )
                    .await?;
                    let row = crate::serving::row(label, "bursty", &answers, started.elapsed())?;
                    // Every sequence gains a token per round.
                    (row.tpot_ms_p50, concurrency as f64 * 1e3 / row.tpot_ms_p50)
                }
            };
            cluster.stop();
            let stages: Vec<String> = prediction
                .stages
                .iter()
                .map(|s| format!("{}/{}", s.layers, s.offloaded))
                .collect();
            let predicted_ms = prediction.time_per_token_s * 1e3;
            measured_setup.push(ms_per_token);
            rows.push(Row {
                setup: setup.name.clone(),
                plan: label.into(),
                interleave: layout.interleave,
                layers: stages.join(" "),
                predicted_ms_per_token: predicted_ms,
                measured_ms_per_token: ms_per_token,
                predicted_tokens_per_s: prediction.tokens_per_s,
                measured_tokens_per_s: tokens_per_s,
                error: (ms_per_token - predicted_ms) / predicted_ms,
            });
        }
        // Within 2% is a tie: runs of one plan differ by about that much.
        if measured_setup[1..]
            .iter()
            .any(|&m| m < measured_setup[0] * 0.98)
        {
            beaten.push(setup.name.clone());
        }
    }
    let worst = |planner_only: bool| {
        rows.iter()
            .filter(|r| !planner_only || r.plan == "planner")
            .map(|r| r.error.abs())
            .fold(0.0, f64::max)
    };
    Ok(Report {
        model: shape.name.clone(),
        worst_planner_error: worst(true),
        worst_error: worst(false),
        rows,
        planner_beaten: beaten,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_every_layer() {
        assert_eq!(proportional(16, &[1.0, 1.0, 1.0]), vec![6, 5, 5]);
        assert_eq!(proportional(16, &[3.0, 1.0]).iter().sum::<usize>(), 16);
        assert_eq!(proportional(4, &[100.0, 1.0, 1.0, 1.0]), vec![1, 1, 1, 1]);
        assert_eq!(cuts(&[6, 5, 5]), vec![6, 11]);
    }
}
