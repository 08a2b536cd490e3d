//! The solver: the plan the cost model rates best, found exactly.
//!
//! Every decoder layer has the same shape, so a plan's cost depends on each
//! chunk's layer and offloaded counts, not on which layers they are, and the ring
//! order enters only through its hops. For each starter, interleave degree `v`
//! and micro-batch count `k`, a dynamic programme over devices and layers assigned
//! keeps the Pareto front of (sum of the stages' pass times, largest per-stage
//! bound); each device picks its layer count `m` and offloaded count `o` (slots
//! follow from its memory). A stage's chunks split `m` and `o` as evenly as whole
//! layers allow, which is optimal because the stall of a visit is convex in its
//! offloaded count. Every ring order is then tried on the front. The tests check
//! the result against brute force over every contiguous partition, order, `v`,
//! `k` and resident set.

use crate::cost::{self, DeviceCosts, Runtime, Workload, WorkloadKind};
use lime_schemas::{DeviceProfile, LayerRange, Links, ModelShape, Plan, PlanChunk, PlanStage};

/// A planning question.
#[derive(Debug, Clone)]
pub struct Problem<'a> {
    /// The model.
    pub shape: &'a ModelShape,
    /// The devices, one stage each.
    pub devices: &'a [DeviceProfile],
    /// The network between them.
    pub links: &'a Links,
    /// What the cluster will be asked to do.
    pub workload: Workload,
    /// The stages' settings.
    pub runtime: Runtime,
    /// The device that must start the ring (a running ring's starter holds the
    /// requests); `None` lets the solver choose.
    pub starter: Option<usize>,
}

/// A plan in the cost model's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Device indices in ring order; the first is the starter.
    pub order: Vec<usize>,
    /// Chunks per stage (`v`).
    pub interleave: usize,
    /// Micro-batches in flight (1 when sporadic).
    pub micro_batches: usize,
    /// Model order; chunk `i` runs on `order[i % order.len()]`.
    pub chunks: Vec<ChunkLoad>,
}

/// One chunk: how many layers, how many of them streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLoad {
    /// Decoder layers in the chunk.
    pub layers: usize,
    /// Of them, streamed from storage.
    pub offloaded: usize,
}

/// What the cost model predicts for one stage.
#[derive(Debug, Clone, PartialEq)]
pub struct StagePrediction {
    /// The device's name.
    pub device: String,
    /// Decoder layers over all its chunks.
    pub layers: usize,
    /// Of them, streamed from storage.
    pub offloaded: usize,
    /// Layers in memory at once for streaming.
    pub slots: usize,
    /// What the memory model says it holds.
    pub memory_bytes: u64,
    /// What its profile lets lime use.
    pub budget_bytes: u64,
    /// Per micro-batch pass: compute...
    pub compute_s: f64,
    /// ...and the waits for weights.
    pub stall_s: f64,
    /// The loader's reading per round (every sequence one token further),
    /// reads shared by the round's micro-batches counted once.
    pub loader_s: f64,
}

/// What the cost model predicts for a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Seconds between two tokens of one sequence.
    pub time_per_token_s: f64,
    /// Tokens generated per second over all sequences.
    pub tokens_per_s: f64,
    /// Time to the first token of a prompt of the workload's length.
    pub ttft_s: f64,
    /// Bursty: the burst's first round, every sequence's prompt prefilled (see
    /// [`crate::cost`]); its first tokens come at its end. Sporadic: `ttft_s`.
    pub burst_prefill_s: f64,
    /// One micro-batch's ring pass.
    pub pass_s: f64,
    /// Sequences per micro-batch.
    pub micro_batch_tokens: usize,
    /// What sets the time per token.
    pub bound: String,
    /// Per stage, in ring order.
    pub stages: Vec<StagePrediction>,
}

/// Why no plan fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no plan fits: {0}")]
pub struct Infeasible(pub String);

/// The figure minimised: seconds per token (sporadic) or per generated token over
/// the whole batch (bursty).
fn objective(p: &Problem, pred: &Prediction) -> f64 {
    match p.workload.kind {
        WorkloadKind::Sporadic => pred.time_per_token_s,
        WorkloadKind::Bursty => 1.0 / pred.tokens_per_s,
    }
}

fn split(total: usize, parts: usize, i: usize) -> usize {
    total * (i + 1) / parts - total * i / parts
}

impl Problem<'_> {
    fn costs(&self) -> Vec<DeviceCosts<'_>> {
        self.devices
            .iter()
            .map(|d| DeviceCosts::new(d, self.shape, &self.workload, &self.runtime))
            .collect()
    }

    fn micro_batch_counts(&self) -> Vec<usize> {
        match self.workload.kind {
            WorkloadKind::Sporadic => vec![1],
            WorkloadKind::Bursty => {
                let most = self.devices.len().max(1).min(self.workload.concurrency);
                (1..=most)
                    .filter(|&k| {
                        self.workload.concurrency.div_ceil(k) <= self.runtime.activation_tokens
                    })
                    .collect()
            }
        }
    }

    fn tokens(&self, k: usize) -> usize {
        self.workload.concurrency.div_ceil(k.max(1))
    }
}

/// The cost model applied to `layout`; `Err` names what does not fit.
pub fn evaluate(p: &Problem, layout: &Layout) -> Result<Prediction, String> {
    evaluate_with(p, &p.costs(), layout)
}

/// [`evaluate`] with the devices' costs already worked out (the solver scores
/// many layouts of one problem).
fn evaluate_with(
    p: &Problem,
    costs: &[DeviceCosts],
    layout: &Layout,
) -> Result<Prediction, String> {
    let n = layout.order.len();
    let (v, k) = (layout.interleave, layout.micro_batches.max(1));
    if n == 0 || v == 0 || layout.chunks.len() != n * v {
        return Err(format!(
            "{} chunks for {n} stages × v = {v}",
            layout.chunks.len()
        ));
    }
    if layout.order.iter().any(|&d| d >= costs.len()) {
        return Err(format!(
            "the layout names device {} of {}",
            layout.order.iter().max().copied().unwrap_or(0),
            costs.len()
        ));
    }
    let layers: usize = layout.chunks.iter().map(|c| c.layers).sum();
    if layers != p.shape.layers
        || layout
            .chunks
            .iter()
            .any(|c| c.layers == 0 || c.offloaded > c.layers)
    {
        return Err("the chunks do not cover the model".into());
    }
    let b = p.tokens(k);
    let prompt = p
        .workload
        .prompt_tokens
        .clamp(1, p.runtime.activation_tokens);
    let prefill_passes = p.workload.prompt_tokens.max(1).div_ceil(prompt);
    // The burst's prompts, packed into micro-batches of the token budget; a
    // ring that streams sends them in rounds of one per chunk at most.
    let burst = BurstPrefill::of(p, k);
    let streams = layout.chunks.iter().any(|c| c.offloaded > 0);
    let (burst_rounds, per_round) = burst.rounds(if streams {
        layout.chunks.len()
    } else {
        burst.batches
    });
    let mut stages = Vec::with_capacity(n);
    let (mut pass, mut prefill, mut loader_max, mut busy_max) = (0.0, 0.0, 0.0f64, 0.0f64);
    let mut first = RoundCost::default();
    // A prefill pass carries one prompt: each streamed layer is read once for it.
    let mut prefill_reads_max = 0.0f64;
    // The slowest step a micro-batch takes (a chunk's visit, the starter's
    // ends, a hop).
    let mut step_max = 0.0f64;
    for (j, &d) in layout.order.iter().enumerate() {
        let dc = &costs[d];
        let mine: Vec<ChunkLoad> = layout.chunks.iter().skip(j).step_by(n).copied().collect();
        let m: usize = mine.iter().map(|c| c.layers).sum();
        let o: usize = mine.iter().map(|c| c.offloaded).sum();
        let starter = j == 0;
        let slots = dc
            .slots(m, o, starter, p.runtime.max_slots)
            .ok_or_else(|| {
                format!(
                    "{} cannot hold {m} layers with {o} streamed: it needs {} of its {}",
                    dc.profile.name,
                    crate::size(dc.memory(m, o, 1.min(o), starter)),
                    crate::size(dc.profile.memory_bytes)
                )
            })?;
        let c = dc.layer_s(b);
        let stall: f64 = mine
            .iter()
            .map(|ch| cost::stall(ch.offloaded, slots, dc.read_s, c))
            .sum();
        let ends = if starter { dc.ends_s(b) } else { 0.0 };
        let loader =
            cost::round_reads_s(mine.iter().map(|ch| ch.offloaded), slots, k, dc.read_s, c);
        let cp = dc.prefill_s(prompt);
        let prefill_stall: f64 = mine
            .iter()
            .map(|ch| cost::stall(ch.offloaded, slots, dc.read_s, cp))
            .sum();
        pass += m as f64 * c + stall + ends;
        prefill += m as f64 * cp + prefill_stall + if starter { dc.ends_s(1) } else { 0.0 };
        loader_max = loader_max.max(loader);
        let visit_max = mine.iter().map(|ch| ch.layers).max().unwrap_or(0) as f64 * c;
        step_max = step_max.max(visit_max).max(ends);
        prefill_reads_max = prefill_reads_max.max(cost::loader_s(o, slots, dc.read_s, cp));
        busy_max = busy_max.max(k as f64 * (m as f64 * c + ends));
        let cb = dc.prefill_s(burst.tokens);
        let ends_b = if starter { dc.ends_s(burst.rows) } else { 0.0 };
        first.pass += m as f64 * cb
            + mine
                .iter()
                .map(|ch| cost::stall(ch.offloaded, slots, dc.read_s, cb))
                .sum::<f64>()
            + ends_b;
        first.busy = first.busy.max(per_round as f64 * (m as f64 * cb + ends_b));
        first.reads = first.reads.max(cost::round_reads_s(
            mine.iter().map(|ch| ch.offloaded),
            slots,
            per_round,
            dc.read_s,
            cb,
        ));
        first.step = first
            .step
            .max(mine.iter().map(|ch| ch.layers).max().unwrap_or(0) as f64 * cb);
        stages.push(StagePrediction {
            device: dc.profile.name.clone(),
            layers: m,
            offloaded: o,
            slots,
            memory_bytes: dc.memory(m, o, slots, starter),
            budget_bytes: dc.profile.memory_bytes,
            compute_s: m as f64 * c + ends,
            stall_s: stall,
            loader_s: loader,
        });
    }
    let (mut hops, mut hops_prefill, mut link_busy) = (0.0, 0.0, 0.0f64);
    if n > 1 {
        for j in 0..n {
            let (from, to) = (
                &p.devices[layout.order[j]].name,
                &p.devices[layout.order[(j + 1) % n]].name,
            );
            let link = p.links.between(from, to);
            hops += v as f64 * cost::hop_s(p.shape, link, b);
            hops_prefill += v as f64 * cost::hop_s(p.shape, link, prompt);
            let busy = cost::hop_busy_s(p.shape, link, b);
            link_busy = link_busy.max((k * v) as f64 * busy);
            step_max = step_max.max(busy);
            first.pass += v as f64 * cost::hop_s(p.shape, link, burst.tokens);
            let busy = cost::hop_busy_s(p.shape, link, burst.tokens);
            first.link = first.link.max((per_round * v) as f64 * busy);
            first.step = first.step.max(busy);
        }
    }
    pass += hops;
    prefill += hops_prefill;
    let ttft = prefill_passes as f64 * prefill.max(prefill_reads_max);
    // A ring that streams starts a round once the last is back, so that its
    // micro-batches travel as a train sharing reads: the train's tail arrives
    // k − 1 of its slowest steps after its head, as in any flow shop.
    let train = if streams {
        (k - 1) as f64 * step_max
    } else {
        0.0
    };
    let burst_prefill_s = match p.workload.kind {
        WorkloadKind::Sporadic => ttft,
        WorkloadKind::Bursty => burst_rounds as f64 * first.time(streams, per_round),
    };
    let candidates: Vec<(&str, f64)> = match p.workload.kind {
        WorkloadKind::Sporadic => vec![("the ring pass", pass), ("a stage's reads", loader_max)],
        WorkloadKind::Bursty => vec![
            ("the ring pass", pass + train),
            ("a stage's compute", busy_max),
            ("a stage's reads", loader_max),
            ("a link", link_busy),
        ],
    };
    let (bound, round) =
        candidates
            .into_iter()
            .fold(("", 0.0), |best, c| if c.1 > best.1 { c } else { best });
    let generated = match p.workload.kind {
        WorkloadKind::Sporadic => 1,
        WorkloadKind::Bursty => p.workload.concurrency,
    };
    Ok(Prediction {
        time_per_token_s: round,
        tokens_per_s: generated as f64 / round,
        ttft_s: ttft,
        burst_prefill_s,
        pass_s: pass,
        micro_batch_tokens: b,
        bound: bound.into(),
        stages,
    })
}

/// How a burst's prompts go round the ring first, as the starter packs them:
/// `concurrency` prompts of `prompt_tokens`, each whole in one micro-batch of
/// at most the token budget and of a `k`-th of the sequences; a ring that
/// streams sends them in rounds of at most one micro-batch per chunk.
#[derive(Debug, Clone, Copy)]
struct BurstPrefill {
    /// Micro-batches in all.
    batches: usize,
    /// Tokens in each.
    tokens: usize,
    /// Sequences in each (the rows its head samples).
    rows: usize,
}

impl BurstPrefill {
    fn of(p: &Problem, k: usize) -> Self {
        let budget = p.runtime.activation_tokens.max(1);
        let prompt = p.workload.prompt_tokens.max(1);
        let seqs = p.workload.concurrency.max(1);
        let per_batch = (budget / prompt).clamp(1, seqs.div_ceil(k.max(1)));
        // Prompts longer than the budget go over several micro-batches.
        let batches = seqs.div_ceil(per_batch) * prompt.div_ceil(budget);
        let rows = seqs.div_ceil(batches).max(1);
        Self {
            batches,
            tokens: (rows * prompt).min(budget),
            rows,
        }
    }

    /// Rounds of at most `most` micro-batches, and the micro-batches in each.
    fn rounds(&self, most: usize) -> (usize, usize) {
        let rounds = self.batches.div_ceil(most.max(1));
        (rounds, self.batches.div_ceil(rounds))
    }
}

/// One round's candidates for its time: the pass, the busiest stage, the
/// busiest loader and link, and the slowest step (for the train's tail).
#[derive(Debug, Clone, Copy, Default)]
struct RoundCost {
    pass: f64,
    busy: f64,
    reads: f64,
    link: f64,
    step: f64,
}

impl RoundCost {
    /// The round of `k` micro-batches; a ring that streams sends them as a
    /// train, whose tail trails its head by `k − 1` steps.
    fn time(&self, streams: bool, k: usize) -> f64 {
        let train = if streams {
            k.saturating_sub(1) as f64 * self.step
        } else {
            0.0
        };
        (self.pass + train)
            .max(self.busy)
            .max(self.reads)
            .max(self.link)
    }
}

fn busiest(pred: &Prediction) -> f64 {
    pred.stages
        .iter()
        .map(|s| s.compute_s + s.stall_s)
        .fold(0.0, f64::max)
}

/// One device's choice for a layer count: `(sum term, max term, offloaded)`.
#[derive(Debug, Clone, Copy)]
struct DeviceChoice {
    pass: f64,
    bound: f64,
    offloaded: usize,
}

/// The best layout for `p`, with its prediction.
pub fn solve(p: &Problem) -> Result<(Layout, Prediction), Infeasible> {
    let n = p.devices.len();
    let layers = p.shape.layers;
    if n == 0 {
        return Err(Infeasible("no devices".into()));
    }
    if n > layers {
        return Err(Infeasible(format!(
            "{n} devices but only {layers} layers: every stage needs at least one"
        )));
    }
    let costs = p.costs();
    let mut best: Option<((f64, f64), Layout)> = None;
    let starters: Vec<usize> = match p.starter {
        Some(s) if s < n => vec![s],
        _ => (0..n).collect(),
    };
    for starter in starters {
        for v in 1..=p.runtime.max_interleave.max(1).min(layers / n) {
            for &k in &p.micro_batch_counts() {
                let Some(choices) = pareto_dp(p, &costs, starter, v, k) else {
                    continue;
                };
                for order in orders(n, starter) {
                    for assign in &choices {
                        let layout = layout_from(&order, v, k, assign);
                        let Ok(pred) = evaluate_with(p, &costs, &layout) else {
                            continue;
                        };
                        // Ties (common when nothing is streamed) go to the plan whose
                        // busiest stage is least busy: it leaves the most headroom.
                        let score = (objective(p, &pred), busiest(&pred));
                        let better = best.as_ref().is_none_or(|(s, _)| {
                            score.0 < s.0 * (1.0 - 1e-9)
                                || (score.0 <= s.0 * (1.0 + 1e-9) && score.1 < s.1)
                        });
                        if better {
                            best = Some((score, layout));
                        }
                    }
                }
            }
        }
    }
    match best {
        Some((_, layout)) => {
            let pred = evaluate(p, &layout).map_err(Infeasible)?;
            Ok((layout, pred))
        }
        None => Err(Infeasible(explain(p, &costs))),
    }
}

/// The Pareto front over (Σ pass terms, max bound terms) of assignments
/// `(layers, offloaded)` per device index, for one starter, `v` and `k`.
fn pareto_dp(
    p: &Problem,
    costs: &[DeviceCosts],
    starter: usize,
    v: usize,
    k: usize,
) -> Option<Vec<Vec<(usize, usize)>>> {
    let (n, layers) = (p.devices.len(), p.shape.layers);
    let b = p.tokens(k);
    // options[d][m] = Pareto options for device d holding m layers.
    let options: Vec<Vec<Vec<DeviceChoice>>> = (0..n)
        .map(|d| {
            let dc = &costs[d];
            let is_starter = d == starter;
            let c = dc.layer_s(b);
            let ends = if is_starter { dc.ends_s(b) } else { 0.0 };
            (0..=layers)
                .map(|m| {
                    if m < v {
                        return Vec::new();
                    }
                    let mut opts: Vec<DeviceChoice> = Vec::new();
                    for o in 0..=m {
                        let Some(slots) = dc.slots(m, o, is_starter, p.runtime.max_slots) else {
                            continue;
                        };
                        let stall: f64 = (0..v)
                            .map(|i| cost::stall(split(o, v, i), slots, dc.read_s, c))
                            .sum();
                        let loader = cost::round_reads_s(
                            (0..v).map(|i| split(o, v, i)),
                            slots,
                            k,
                            dc.read_s,
                            c,
                        );
                        let bound = match p.workload.kind {
                            WorkloadKind::Sporadic => loader,
                            WorkloadKind::Bursty => loader.max(k as f64 * (m as f64 * c + ends)),
                        };
                        let opt = DeviceChoice {
                            pass: m as f64 * c + stall + ends,
                            bound,
                            offloaded: o,
                        };
                        push_pareto(&mut opts, opt, |x| (x.pass, x.bound, x.offloaded > 0));
                    }
                    opts
                })
                .collect()
        })
        .collect();
    // front[l] after devices 0..d: (pass, bound, assignment so far)
    type Entry = (f64, f64, Vec<(usize, usize)>);
    let mut front: Vec<Vec<Entry>> = vec![Vec::new(); layers + 1];
    front[0].push((0.0, 0.0, Vec::new()));
    for (d, opts_d) in options.iter().enumerate() {
        let remaining = n - d - 1;
        let mut next: Vec<Vec<Entry>> = vec![Vec::new(); layers + 1];
        for (l, entries) in front.iter().enumerate() {
            for (pass, bound, assign) in entries {
                for (m, opts) in opts_d.iter().enumerate().skip(v) {
                    let total = l + m;
                    if total + remaining * v > layers || (remaining == 0 && total != layers) {
                        continue;
                    }
                    for o in opts {
                        let mut a = assign.clone();
                        a.push((m, o.offloaded));
                        let e = (pass + o.pass, bound.max(o.bound), a);
                        push_pareto(&mut next[total], e, |x| {
                            (x.0, x.1, x.2.iter().any(|&(_, o)| o > 0))
                        });
                    }
                }
            }
        }
        front = next;
    }
    let last = std::mem::take(&mut front[layers]);
    if last.is_empty() {
        return None;
    }
    Some(last.into_iter().map(|e| e.2).collect())
}

/// Adds `x` to a Pareto front (both keys minimised) unless it is dominated by
/// an entry of the same class: plans that stream and plans that do not are
/// kept apart, because streaming adds a round's train to the pass (see
/// [`evaluate`]), which the keys do not hold.
fn push_pareto<T>(front: &mut Vec<T>, x: T, key: impl Fn(&T) -> (f64, f64, bool)) {
    let (a, b, class) = key(&x);
    if front.iter().any(|y| {
        let (ya, yb, yc) = key(y);
        yc == class && ya <= a + 1e-15 && yb <= b + 1e-15
    }) {
        return;
    }
    front.retain(|y| {
        let (ya, yb, yc) = key(y);
        !(yc == class && a <= ya && b <= yb)
    });
    front.push(x);
}

/// Every ring order of `n` devices with `starter` first.
fn orders(n: usize, starter: usize) -> Vec<Vec<usize>> {
    let rest: Vec<usize> = (0..n).filter(|&d| d != starter).collect();
    let mut out = Vec::new();
    permute(&rest, &mut vec![starter], &mut out);
    out
}

fn permute(rest: &[usize], prefix: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
    if rest.is_empty() {
        out.push(prefix.clone());
        return;
    }
    for i in 0..rest.len() {
        prefix.push(rest[i]);
        let others: Vec<usize> = rest
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, &d)| d)
            .collect();
        permute(&others, prefix, out);
        prefix.pop();
    }
}

/// The layout with device `d` holding `assign[d] = (m, o)`, chunks and streamed
/// layers split evenly over its `v` visits.
fn layout_from(order: &[usize], v: usize, k: usize, assign: &[(usize, usize)]) -> Layout {
    let n = order.len();
    let mut chunks = Vec::with_capacity(n * v);
    for r in 0..v {
        for &d in order {
            let (m, o) = assign[d];
            chunks.push(ChunkLoad {
                layers: split(m, v, r),
                offloaded: split(o, v, r),
            });
        }
    }
    Layout {
        order: order.to_vec(),
        interleave: v,
        micro_batches: k,
        chunks,
    }
}

/// The plan a layout describes: stages named after the devices (their data
/// addresses from the profiles), and each chunk's streamed layers spread over it
/// starting with its first.
pub fn to_plan(p: &Problem, layout: &Layout, epoch: u64) -> Plan {
    let n = layout.order.len();
    let mut stages: Vec<PlanStage> = layout
        .order
        .iter()
        .map(|&d| PlanStage {
            name: p.devices[d].name.clone(),
            data_addr: p.devices[d]
                .data_addr
                .clone()
                .unwrap_or_else(|| "0.0.0.0:0".into()),
            offloaded: Some(Vec::new()),
        })
        .collect();
    let mut chunks = Vec::with_capacity(layout.chunks.len());
    let mut start = 0;
    for (i, c) in layout.chunks.iter().enumerate() {
        let range = LayerRange::new(start..start + c.layers);
        let streamed = stages[i % n].offloaded.get_or_insert_with(Vec::new);
        streamed.extend((0..c.offloaded).map(|j| start + j * c.layers / c.offloaded.max(1)));
        chunks.push(PlanChunk {
            stage: stages[i % n].name.clone(),
            layers: range,
        });
        start += c.layers;
    }
    for s in &mut stages {
        if s.offloaded.as_ref().is_some_and(Vec::is_empty) {
            s.offloaded = None;
        }
    }
    Plan {
        epoch,
        stages,
        chunks,
        max_inflight: Some(layout.micro_batches),
        prediction: None,
        signature: None,
    }
}

/// The layout of an existing plan (stages matched to devices by name), to predict
/// plans made by hand or by other rules. Stages that name no offloaded layers are
/// taken to stream as few as fit, spread over their chunks.
pub fn layout_of(p: &Problem, plan: &Plan, micro_batches: usize) -> Result<Layout, String> {
    let order = plan
        .stages
        .iter()
        .map(|s| {
            p.devices
                .iter()
                .position(|d| d.name == s.name)
                .ok_or_else(|| format!("no profile for stage {}", s.name))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let n = order.len();
    let costs = p.costs();
    let mut chunks: Vec<ChunkLoad> = plan
        .chunks
        .iter()
        .map(|c| ChunkLoad {
            layers: c.layers.len(),
            offloaded: 0,
        })
        .collect();
    for (j, s) in plan.stages.iter().enumerate() {
        let mine: Vec<usize> = (j..chunks.len()).step_by(n.max(1)).collect();
        match &s.offloaded {
            Some(list) => {
                for &i in &mine {
                    let r = plan.chunks[i].layers.range();
                    chunks[i].offloaded = list.iter().filter(|l| r.contains(l)).count();
                }
            }
            None => {
                let m: usize = mine.iter().map(|&i| chunks[i].layers).sum();
                let o = (0..=m)
                    .find(|&o| {
                        costs[order[j]]
                            .slots(m, o, j == 0, p.runtime.max_slots)
                            .is_some()
                    })
                    .ok_or_else(|| format!("{} cannot hold its {m} layers at all", s.name))?;
                let v = mine.len();
                for (r, &i) in mine.iter().enumerate() {
                    chunks[i].offloaded = split(o, v, r).min(chunks[i].layers);
                }
            }
        }
    }
    Ok(Layout {
        order,
        interleave: plan.interleave(),
        micro_batches,
        chunks,
    })
}

/// What does not fit, and by how much.
fn explain(p: &Problem, costs: &[DeviceCosts]) -> String {
    let layers = p.shape.layers;
    let mut capacity = 0usize;
    let mut lines = Vec::new();
    for dc in costs {
        // The most layers the device can take, all streamed through one slot, as
        // a secondary; and what being the starter would add.
        let most = (1..=layers)
            .rev()
            .find(|&m| dc.slots(m, m, false, 1).is_some())
            .unwrap_or(0);
        capacity += most;
        let starter = if dc.slots(1, 1, true, 1).is_none() {
            format!(
                "; it cannot be the starter: the embedding and head ({}) do not fit",
                crate::size(dc.footprint.ends)
            )
        } else {
            String::new()
        };
        lines.push(format!(
            "{} ({}): {} for the workspace and rotary tables, {} of KV per layer for {} sequences × {} tokens, {} to stream a layer; it can take at most {most} layers{starter}",
            dc.profile.name,
            crate::size(dc.profile.memory_bytes),
            crate::size(dc.footprint.fixed_weights(false) + dc.footprint.activations),
            crate::size(dc.footprint.kv(dc.kv_tokens, 1)),
            p.workload.concurrency,
            p.workload.context,
            crate::size(dc.footprint.streaming(1)),
        ));
    }
    let starters = costs
        .iter()
        .filter(|dc| dc.slots(1, 1, true, 1).is_some())
        .count();
    let mut head = if capacity < layers {
        format!(
            "even streaming every layer, the devices can take {capacity} of the model's {layers} layers ({} short); lower the context or concurrency, or add memory",
            layers - capacity
        )
    } else if starters == 0 {
        "no device has room for the embedding and LM head as well".to_string()
    } else {
        "no split of the layers fits every device at once".to_string()
    };
    head.push_str(":\n  ");
    head.push_str(&lines.join("\n  "));
    head
}

#[cfg(test)]
mod tests {
    use super::*;
    use lime_schemas::{LinkSpeed, MeasuredCompute, TimePoint};

    fn shape(layers: usize) -> ModelShape {
        ModelShape {
            name: "toy".into(),
            layers,
            hidden: 64,
            layer_params: 1 << 20,
            largest_tensor_params: 1 << 18,
            end_params: 1 << 19,
            head_params: 1 << 18,
            kv_values_per_token: 128,
            activation_values_per_token: 512,
            rope_values: 4096,
            max_context: 256,
            stored_dtype_bytes: 2,
        }
    }

    /// A small deterministic generator, so failures reproduce.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn device(name: &str, rng: &mut Lcg, measured: bool) -> DeviceProfile {
        let layer = (1u64 << 20) * 2;
        DeviceProfile {
            name: name.into(),
            kind: "test".into(),
            estimate: false,
            source: String::new(),
            // Room for 0.3 to 2.8 layers beyond the fixed parts: six layers on two
            // or three devices mostly need streaming.
            memory_bytes: 3_500_000 + (layer as f64 * (0.3 + 2.5 * rng.next())) as u64,
            read_bytes_per_s: layer as f64 / (0.002 + 0.02 * rng.next()),
            weight_bytes: None,
            direct_io: rng.next() < 0.3,
            memory_bandwidth_bytes_per_s: layer as f64 / (0.001 + 0.004 * rng.next()),
            flops: 1e10 * (0.5 + rng.next()),
            layer_overhead_s: 1e-4 * rng.next(),
            measured: measured.then(|| MeasuredCompute {
                model: shape(1).key(),
                decode: vec![
                    TimePoint {
                        tokens: 1,
                        seconds: 0.002 + 0.003 * rng.next(),
                    },
                    TimePoint {
                        tokens: 4,
                        seconds: 0.006 + 0.003 * rng.next(),
                    },
                ],
                prefill: vec![],
                ends: vec![TimePoint {
                    tokens: 1,
                    seconds: 0.001,
                }],
            }),
            data_addr: None,
        }
    }

    fn compositions(total: usize, parts: usize) -> Vec<Vec<usize>> {
        if parts == 1 {
            return vec![vec![total]];
        }
        let mut out = Vec::new();
        for first in 1..=total.saturating_sub(parts - 1) {
            for mut rest in compositions(total - first, parts - 1) {
                rest.insert(0, first);
                out.push(rest);
            }
        }
        out
    }

    /// The best objective over every plan: order, v, k, contiguous chunks, and
    /// every subset of each stage's layers streamed.
    fn brute_force(p: &Problem) -> Option<f64> {
        let n = p.devices.len();
        let layers = p.shape.layers;
        let mut best: Option<f64> = None;
        for starter in 0..n {
            for order in orders(n, starter) {
                for v in 1..=layers / n {
                    for sizes in compositions(layers, n * v) {
                        let mut cuts = Vec::new();
                        let mut at = 0;
                        for s in &sizes[..sizes.len() - 1] {
                            at += s;
                            cuts.push(at);
                        }
                        let stages: Vec<PlanStage> = order
                            .iter()
                            .map(|&d| PlanStage {
                                name: p.devices[d].name.clone(),
                                data_addr: "127.0.0.1:1".into(),
                                offloaded: None,
                            })
                            .collect();
                        let base = Plan::from_cuts(1, stages, &cuts, layers).unwrap();
                        for mask in 0u32..(1 << layers) {
                            let mut plan = base.clone();
                            for s in &mut plan.stages {
                                let mine: Vec<usize> = base
                                    .chunks_of(&s.name)
                                    .iter()
                                    .flat_map(|(_, r)| r.range())
                                    .filter(|l| mask & (1 << l) != 0)
                                    .collect();
                                s.offloaded = Some(mine);
                            }
                            for &k in &p.micro_batch_counts() {
                                let layout = layout_of(p, &plan, k).unwrap();
                                if let Ok(pred) = evaluate(p, &layout) {
                                    let score = objective(p, &pred);
                                    if best.is_none_or(|b| score < b) {
                                        best = Some(score);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        best
    }

    #[test]
    fn the_solver_matches_brute_force() {
        let mut rng = Lcg(7);
        let mut checked = 0;
        let (mut streamed, mut interleaved) = (0, 0);
        for case in 0..40 {
            let n = 2 + case % 2;
            let layers = if n == 2 { 7 } else { 6 };
            let devices: Vec<DeviceProfile> = (0..n)
                .map(|i| device(&format!("d{i}"), &mut rng, case % 3 == 0))
                .collect();
            let mut links = Links::uniform(LinkSpeed {
                mbit_per_s: 10.0 + 1000.0 * rng.next(),
                latency_ms: 2.0 * rng.next(),
            });
            links.links.push(lime_schemas::Link {
                from: "d0".into(),
                to: "d1".into(),
                mbit_per_s: 5.0,
                latency_ms: 3.0,
            });
            let workload = if case % 4 < 2 {
                Workload::sporadic(64)
            } else {
                Workload::bursty(4, 64)
            };
            let shape = shape(layers);
            let p = Problem {
                shape: &shape,
                devices: &devices,
                links: &links,
                workload,
                runtime: Runtime::default(),
                starter: None,
            };
            let brute = brute_force(&p);
            match solve(&p) {
                Ok((layout, pred)) => {
                    let brute = brute.expect("brute force found nothing the solver did");
                    let got = objective(&p, &pred);
                    assert!(
                        (got - brute).abs() <= 1e-9 * brute.max(1e-9),
                        "case {case}: solver {got} vs brute force {brute} ({layout:?})"
                    );
                    checked += 1;
                    streamed += usize::from(pred.stages.iter().any(|s| s.offloaded > 0));
                    interleaved += usize::from(layout.interleave > 1);
                }
                Err(e) => assert!(
                    brute.is_none(),
                    "case {case}: solver says {e} but brute force found {brute:?}"
                ),
            }
        }
        // The instances must exercise streaming and interleaving, not only splits.
        assert!(checked >= 20, "only {checked} feasible cases");
        assert!(
            streamed >= 10 && interleaved >= 3,
            "{streamed} streamed, {interleaved} interleaved of {checked}"
        );
    }

    #[test]
    fn infeasible_problems_say_what_does_not_fit() {
        let mut rng = Lcg(1);
        let mut devices = vec![device("a", &mut rng, false), device("b", &mut rng, false)];
        for d in &mut devices {
            d.memory_bytes = 1 << 20;
        }
        let shape = shape(8);
        let links = Links::uniform(LinkSpeed {
            mbit_per_s: 100.0,
            latency_ms: 1.0,
        });
        let p = Problem {
            shape: &shape,
            devices: &devices,
            links: &links,
            workload: Workload::sporadic(64),
            runtime: Runtime::default(),
            starter: None,
        };
        let err = solve(&p).unwrap_err().0;
        assert!(
            err.contains("can take 0 of the model's 8 layers (8 short)"),
            "{err}"
        );
        assert!(err.contains("a (1.0 MiB)"), "{err}");
    }

    #[test]
    fn a_bursts_prefill_is_its_prompts_packed_whole_into_micro_batches() {
        let ms = |tokens, ms: f64| TimePoint {
            tokens,
            seconds: ms / 1e3,
        };
        let mut d = device("a", &mut Lcg(3), true);
        d.memory_bytes = 1 << 30;
        let m = d.measured.as_mut().unwrap();
        m.prefill = vec![ms(16, 16.0), ms(64, 64.0)];
        m.ends = vec![ms(1, 1.0), ms(4, 1.0)];
        let devices = [d];
        let shape = shape(8);
        let links = Links::uniform(LinkSpeed {
            mbit_per_s: 1000.0,
            latency_ms: 0.0,
        });
        let mut p = Problem {
            shape: &shape,
            devices: &devices,
            links: &links,
            workload: Workload::bursty(8, 64),
            runtime: Runtime {
                activation_tokens: 64,
                ..Runtime::default()
            },
            starter: None,
        };
        p.workload.prompt_tokens = 16;
        let (_, pred) = solve(&p).unwrap();
        // Eight prompts of 16 tokens, four to a micro-batch of 64: two
        // micro-batches through 8 resident layers at 64 ms each, and the head
        // over four rows after each.
        assert!(
            (pred.burst_prefill_s - 2.0 * (8.0 * 0.064 + 0.001)).abs() < 1e-9,
            "{pred:?}"
        );
        assert!(pred.burst_prefill_s > pred.ttft_s);
        p.workload = Workload::sporadic(64);
        let (_, pred) = solve(&p).unwrap();
        assert_eq!(pred.burst_prefill_s, pred.ttft_s);
    }
}
