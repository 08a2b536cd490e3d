//! lime-plan: the planner as pure functions. From the model's shape, the devices'
//! profiles and the links, the plan that minimises time per token (sporadic) or
//! maximises tokens/s (bursty) within every device's memory, with what the cost
//! model predicts for it.
//!
//! [`memory`] is the one memory model (the stages split their budgets with it
//! too), [`cost`] the time model, [`solver`] the exact search and [`files`] reads
//! profiles and networks; this module puts them together and renders the result
//! for people.

#![warn(missing_docs)]

pub mod cost;
pub mod files;
pub mod memory;
pub mod solver;

pub use cost::{Runtime, Workload, WorkloadKind};
pub use solver::{evaluate, layout_of, solve, to_plan, Infeasible, Layout, Prediction, Problem};

use lime_schemas::{Plan, PlanPrediction};
use std::fmt::Write as _;

/// A plan with its prediction.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The plan as published, with its prediction.
    pub plan: Plan,
    /// The plan in the cost model's terms.
    pub layout: Layout,
    /// What the cost model predicts for it.
    pub prediction: Prediction,
}

/// Solves `problem` and writes the plan with `epoch`.
pub fn plan(problem: &Problem, epoch: u64) -> Result<Planned, Infeasible> {
    for d in problem.devices {
        d.validate().map_err(|e| Infeasible(e.to_string()))?;
    }
    problem
        .links
        .validate()
        .map_err(|e| Infeasible(e.to_string()))?;
    let (layout, prediction) = solve(problem)?;
    let mut plan = to_plan(problem, &layout, epoch);
    plan.prediction = Some(PlanPrediction {
        time_per_token_s: prediction.time_per_token_s,
        tokens_per_s: prediction.tokens_per_s,
        ttft_s: prediction.ttft_s,
        burst_prefill_s: prediction.burst_prefill_s,
        slowest_link_mbit_per_s: slowest_link(&plan, problem.links),
        reason: "profiles".into(),
    });
    Ok(Planned {
        plan,
        layout,
        prediction,
    })
}

/// The slowest hop of `plan`'s ring under `links`, Mb/s (0 for a single stage).
pub fn slowest_link(plan: &Plan, links: &lime_schemas::Links) -> f64 {
    let n = plan.stages.len();
    if n < 2 {
        return 0.0;
    }
    (0..n)
        .map(|i| {
            let (a, b) = (&plan.stages[i].name, &plan.stages[(i + 1) % n].name);
            links.between(a, b).mbit_per_s
        })
        .fold(f64::INFINITY, f64::min)
}

/// The plan as a table (device, chunks, resident and streamed layers, slots,
/// memory) and the predicted figures.
pub fn render(problem: &Problem, planned: &Planned) -> String {
    let mut out = String::new();
    let pred = &planned.prediction;
    let _ = writeln!(
        out,
        "{} on {} devices, {} workload{}: interleave v = {}, {} micro-batch(es) of {} token(s)",
        problem.shape.name,
        problem.devices.len(),
        match problem.workload.kind {
            WorkloadKind::Sporadic => "sporadic",
            WorkloadKind::Bursty => "bursty",
        },
        if problem.workload.kind == WorkloadKind::Bursty {
            format!(" ({} sequences)", problem.workload.concurrency)
        } else {
            String::new()
        },
        planned.layout.interleave,
        planned.layout.micro_batches,
        pred.micro_batch_tokens,
    );
    let _ = writeln!(
        out,
        "{:<14} {:<24} {:>8} {:>9} {:>5} {:>11} {:>11} {:>10} {:>10}",
        "device", "chunks", "resident", "streamed", "slots", "memory", "budget", "compute", "reads"
    );
    for (j, s) in pred.stages.iter().enumerate() {
        let stage = &planned.plan.stages[j];
        let chunks: Vec<String> = planned
            .plan
            .chunks_of(&stage.name)
            .iter()
            .map(|(_, r)| r.to_string())
            .collect();
        let mut chunks = chunks.join(",");
        if chunks.len() > 24 {
            chunks.truncate(21);
            chunks.push_str("...");
        }
        let estimate = problem
            .devices
            .iter()
            .find(|d| d.name == s.device)
            .is_some_and(|d| d.estimate);
        let _ = writeln!(
            out,
            "{:<14} {:<24} {:>8} {:>9} {:>5} {:>11} {:>11} {:>8.1}ms {:>8.1}ms",
            format!("{}{}", s.device, if estimate { "*" } else { "" }),
            chunks,
            s.layers - s.offloaded,
            s.offloaded,
            s.slots,
            size(s.memory_bytes),
            size(s.budget_bytes),
            s.compute_s * 1e3,
            s.loader_s * 1e3,
        );
    }
    let _ = writeln!(
        out,
        "predicted: TTFT {:.3} s ({} prompt tokens), {:.1} ms per token, {:.2} tokens/s; bound by {}",
        pred.ttft_s,
        problem.workload.prompt_tokens,
        pred.time_per_token_s * 1e3,
        pred.tokens_per_s,
        pred.bound
    );
    if problem.devices.iter().any(|d| d.estimate) {
        let _ = writeln!(
            out,
            "* profile built from published specifications (an estimate), not measured"
        );
    }
    out
}

/// Bytes for people: GiB from 1 GiB up, else MiB.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}
