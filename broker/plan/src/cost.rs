//! The cost model of DESIGN.md: what a plan costs in time and memory on given
//! devices and links.
//!
//! Units: seconds and bytes. Notation, per device `d` and micro-batch of `b` tokens:
//! `c_d(b)` one layer's compute, `e_d(b)` the starter's ends (embedding, head,
//! sampling), `ρ_d = W / R_d` one layer's read, `s_d` its slots, and per hop
//! `t(b) = λ + b·hidden·4 / B` (activations travel in f32).
//!
//! **Time.** A stage owns `v` chunks; chunk `i` has `n_i` layers of which `q_i`
//! are offloaded. Between two visits the loader prefetches up to `s` offloaded
//! layers, so a visit waits only for the rest, read one after another while the
//! visit's offloaded layers compute (resident layers are not counted as hiding
//! reads, which keeps the model pessimistic there):
//!
//! ```text
//! visit(n, q)  = n·c + stall(q)
//! stall(q)     = 0                          if q ≤ s
//!              = (q − 1)·ρ                  if s = 1
//!              = max(0, (q − s)·ρ − (q − 2)·c)  otherwise
//! ```
//!
//! A micro-batch's ring pass is `P(b) = Σ visits + e(b) + v·Σ_hops t(b)`. Each
//! stage's loader must also read all its `o_d` offloaded layers once per token:
//! `Λ_d = o_d·ρ_d` (with one slot it cannot read while the slot's layer computes:
//! `o_d·(ρ_d + c_d)`). Then:
//!
//! - **sporadic** (one sequence): time per token `T = max(P(1), max_d Λ_d)`.
//! - **bursty** (`N` sequences as `k` micro-batches of `b = ⌈N/k⌉`): a round, in
//!   which every sequence gains a token, takes
//!   `Y = max(P(b), max_d k·(m_d·c_d(b) + e_d(b)), max_d R_d, max_hop k·v·t(b))`
//!   (the pass, each stage's busy time, each loader's reads, each link's busy
//!   time); tokens/s `= N / Y`. The round's micro-batches share reads: a stage
//!   keeps up to `s − 1` of a chunk's streamed layers in their slots until the
//!   round's last micro-batch has run them (one slot stays free to stream
//!   through), so with `a_i = min(q_i, s − 1)` the loader reads
//!   `R_d = Σ_i (a_i + k·(q_i − a_i))·ρ_d` per round: `Λ_d` when the slots hold
//!   every chunk's streamed layers. With one slot a chunk's only streamed layer
//!   is kept too, and the loader waits while the round's `k` micro-batches run
//!   it: `ρ_d + k·c_d` per such chunk; chunks streaming more than one layer
//!   through one slot read each for every micro-batch, `k·q_i·(ρ_d + c_d)`.
//!   A ring that streams launches a round only once the last is back, so that
//!   its micro-batches travel together; the pass then counts the train's tail,
//!   `P(b) + (k − 1)·u(b)`, `u` the slowest step a micro-batch takes: a chunk's
//!   visit `n_i·c_d(b)`, the starter's ends `e(b)`, a hop's transfer.
//! - **TTFT**: the prompt's prefill passes (`activation_tokens` at a time, with
//!   prefill compute times), each `max(P, max_d Λ_d)`.
//! - **A burst's prefill**: its `N` prompts of `p` tokens, each whole in one
//!   micro-batch of at most `activation_tokens` and `⌈N/k⌉` sequences, make
//!   `K` micro-batches; a ring that streams sends them in rounds of at most one
//!   per chunk, each a round as above with prefill compute at the micro-batch's
//!   tokens. Every sequence has its first token when they are done.
//!
//! **Memory** is [`crate::memory`]'s model, the one the stages account with,
//! with KV reserved for the whole workload.

use crate::memory::{Footprint, Holding};
use lime_schemas::{DeviceProfile, LinkSpeed, ModelShape, TimePoint};

/// What the cluster will be asked to do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    /// Which figure to optimise.
    pub kind: WorkloadKind,
    /// Sequences generating at once (1 when sporadic).
    pub concurrency: usize,
    /// Tokens of context each sequence's KV cache must hold.
    pub context: usize,
    /// Prompt length for the TTFT prediction.
    pub prompt_tokens: usize,
}

/// Which figure the planner optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// Requests one at a time: minimise time per token.
    Sporadic,
    /// Many requests at once: maximise tokens/s.
    Bursty,
}

impl std::str::FromStr for WorkloadKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sporadic" => Ok(Self::Sporadic),
            "bursty" => Ok(Self::Bursty),
            o => Err(format!("unknown workload {o:?}: sporadic or bursty")),
        }
    }
}

impl Workload {
    /// One sequence at a time with `context` tokens of context.
    pub fn sporadic(context: usize) -> Self {
        Self {
            kind: WorkloadKind::Sporadic,
            concurrency: 1,
            context,
            prompt_tokens: 128,
        }
    }

    /// `concurrency` sequences at once, each with `context` tokens of context.
    pub fn bursty(concurrency: usize, context: usize) -> Self {
        Self {
            kind: WorkloadKind::Bursty,
            concurrency: concurrency.max(1),
            context,
            prompt_tokens: 128,
        }
    }
}

/// Runtime settings the plan will run under (the stages' defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Runtime {
    /// Most slots a stage streams through.
    pub max_slots: usize,
    /// Largest micro-batch in tokens (its workspace is in every stage's budget).
    pub activation_tokens: usize,
    /// Largest interleave degree considered.
    pub max_interleave: usize,
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            max_slots: 2,
            activation_tokens: 512,
            max_interleave: 8,
        }
    }
}

/// One device's figures for one model, precomputed.
#[derive(Debug, Clone)]
pub struct DeviceCosts<'a> {
    /// The device.
    pub profile: &'a DeviceProfile,
    shape: &'a ModelShape,
    /// The model's memory terms on this device.
    pub footprint: Footprint,
    /// One layer's read from storage, seconds.
    pub read_s: f64,
    /// Tokens of KV the workload keeps per layer.
    pub kv_tokens: u64,
}

impl<'a> DeviceCosts<'a> {
    /// `profile`'s figures for `shape` under `workload` and `runtime`.
    pub fn new(
        profile: &'a DeviceProfile,
        shape: &'a ModelShape,
        workload: &Workload,
        runtime: &Runtime,
    ) -> Self {
        let stored = shape.stored_dtype_bytes as u64;
        let weight_bytes = profile.weight_bytes.map_or(stored, u64::from);
        let holding = Holding {
            weight_bytes,
            host_buffer: profile.direct_io || stored != weight_bytes,
            pinned_pair: false,
        };
        Self {
            profile,
            shape,
            footprint: Footprint::new(shape, holding, runtime.activation_tokens),
            read_s: shape.layer_read_bytes() as f64 / profile.read_bytes_per_s,
            kv_tokens: (workload.concurrency * workload.context.min(shape.max_context)) as u64,
        }
    }

    /// One layer in memory.
    pub fn layer(&self) -> u64 {
        self.footprint.layer
    }

    /// Memory of a stage holding `m` layers, `o` of them streamed through `slots`.
    pub fn memory(&self, m: usize, o: usize, slots: usize, starter: bool) -> u64 {
        self.footprint.held(m, o, slots, starter, self.kv_tokens)
    }

    /// The most slots (up to `max_slots`) that fit with `o` of `m` layers streamed,
    /// `Some(0)` when nothing is streamed and everything fits, `None` when it does
    /// not fit at all.
    pub fn slots(&self, m: usize, o: usize, starter: bool, max_slots: usize) -> Option<usize> {
        let budget = self.profile.memory_bytes;
        if o == 0 {
            return (self.memory(m, 0, 0, starter) <= budget).then_some(0);
        }
        (1..=max_slots.min(o).max(1))
            .rev()
            .find(|&s| self.memory(m, o, s, starter) <= budget)
    }

    /// One layer's compute over a decode micro-batch of `tokens` sequences.
    pub fn layer_s(&self, tokens: usize) -> f64 {
        match self.measured(|m| &m.decode) {
            Some(points) => interpolate(points, tokens),
            None => self.roofline(self.layer() as f64, self.shape.layer_params, tokens),
        }
    }

    /// One layer's compute over a prefill of `tokens` tokens of one sequence.
    pub fn prefill_s(&self, tokens: usize) -> f64 {
        match self.measured(|m| &m.prefill) {
            Some(points) if !points.is_empty() => interpolate(points, tokens),
            _ => self.roofline(self.layer() as f64, self.shape.layer_params, tokens),
        }
    }

    /// The starter's ends over `tokens` rows.
    pub fn ends_s(&self, tokens: usize) -> f64 {
        match self.measured(|m| &m.ends) {
            Some(points) if !points.is_empty() => interpolate(points, tokens),
            _ => {
                let wb = self.layer() as f64 / self.shape.layer_params.max(1) as f64;
                self.roofline(
                    self.shape.head_params as f64 * wb,
                    self.shape.head_params,
                    tokens,
                )
            }
        }
    }

    fn measured(
        &self,
        pick: impl Fn(&lime_schemas::MeasuredCompute) -> &Vec<TimePoint>,
    ) -> Option<&[TimePoint]> {
        let m = self.profile.measured.as_ref()?;
        self.shape.matches(&m.model).then(|| pick(m).as_slice())
    }

    /// Weights streamed through memory once, or the arithmetic, whichever is longer.
    fn roofline(&self, bytes: f64, params: u64, tokens: usize) -> f64 {
        let p = self.profile;
        p.layer_overhead_s
            + (bytes / p.memory_bandwidth_bytes_per_s)
                .max(2.0 * params as f64 * tokens as f64 / p.flops)
    }
}

/// Piecewise-linear in tokens through the measured points, extended along the
/// last segment beyond them (flat below the first).
pub fn interpolate(points: &[TimePoint], tokens: usize) -> f64 {
    let mut sorted: Vec<TimePoint> = points.to_vec();
    sorted.sort_by_key(|p| p.tokens);
    let t = tokens as f64;
    match sorted.as_slice() {
        [] => 0.0,
        [only] => only.seconds * (t / only.tokens as f64).max(1.0),
        [first, ..] if tokens <= first.tokens => first.seconds,
        _ => {
            let i = sorted
                .windows(2)
                .position(|w| tokens <= w[1].tokens)
                .unwrap_or(sorted.len() - 2);
            let (a, b) = (sorted[i], sorted[i + 1]);
            let slope = (b.seconds - a.seconds) / (b.tokens - a.tokens).max(1) as f64;
            (a.seconds + slope * (t - a.tokens as f64)).max(0.0)
        }
    }
}

/// The wait of one visit with `q` offloaded layers (see the module docs).
pub fn stall(q: usize, slots: usize, read_s: f64, layer_s: f64) -> f64 {
    if q <= slots {
        return 0.0;
    }
    let late = (q - slots) as f64;
    if slots <= 1 {
        late * read_s
    } else {
        (late * read_s - (q as f64 - 2.0) * layer_s).max(0.0)
    }
}

/// The loader's time per token: every offloaded layer read once.
pub fn loader_s(offloaded: usize, slots: usize, read_s: f64, layer_s: f64) -> f64 {
    if offloaded == 0 {
        0.0
    } else if slots <= 1 {
        offloaded as f64 * (read_s + layer_s)
    } else {
        offloaded as f64 * read_s
    }
}

/// The loader's time per round of `k` micro-batches over chunks with
/// `offloaded` streamed layers each (see the module docs): a layer kept in its
/// slot for the round is read once, the others once per micro-batch.
pub fn round_reads_s(
    offloaded: impl IntoIterator<Item = usize>,
    slots: usize,
    k: usize,
    read_s: f64,
    layer_s: f64,
) -> f64 {
    let k = k.max(1);
    let chunks: Vec<usize> = offloaded.into_iter().collect();
    if slots <= 1 {
        return chunks
            .iter()
            .map(|&q| match q {
                0 => 0.0,
                1 => read_s + k as f64 * layer_s,
                q => (k * q) as f64 * (read_s + layer_s),
            })
            .sum();
    }
    let reads: usize = chunks
        .iter()
        .map(|&q| {
            let kept = q.min(slots - 1);
            kept + k * (q - kept)
        })
        .sum();
    reads as f64 * read_s
}

/// Time to send one micro-batch of `tokens` tokens over `link`.
pub fn hop_s(shape: &ModelShape, link: LinkSpeed, tokens: usize) -> f64 {
    // The frame's header and per-sequence slots are small next to the rows.
    link.transfer_s(shape.activation_wire_bytes(tokens) + 64 + 16 * tokens as u64)
}

/// The hop's bandwidth part only (its busy time), without latency.
pub fn hop_busy_s(shape: &ModelShape, link: LinkSpeed, tokens: usize) -> f64 {
    (shape.activation_wire_bytes(tokens) + 64 + 16 * tokens as u64) as f64 / link.bytes_per_s()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_follows_the_points() {
        let pts = [
            TimePoint {
                tokens: 1,
                seconds: 1.0,
            },
            TimePoint {
                tokens: 5,
                seconds: 2.0,
            },
        ];
        assert_eq!(interpolate(&pts, 1), 1.0);
        assert_eq!(interpolate(&pts, 3), 1.5);
        assert_eq!(interpolate(&pts, 9), 3.0);
        assert_eq!(interpolate(&pts[..1], 4), 4.0);
    }

    #[test]
    fn stalls_grow_with_what_slots_cannot_prefetch() {
        assert_eq!(stall(2, 2, 10.0, 1.0), 0.0);
        assert_eq!(stall(3, 1, 10.0, 1.0), 20.0);
        assert_eq!(stall(4, 2, 10.0, 1.0), 18.0);
        // Reads faster than compute hide behind the offloaded layers' own compute.
        assert_eq!(stall(4, 2, 0.5, 1.0), 0.0);
        assert_eq!(loader_s(3, 1, 10.0, 1.0), 33.0);
        assert_eq!(loader_s(3, 2, 10.0, 1.0), 30.0);
    }

    #[test]
    fn a_round_reads_a_kept_layer_once_and_the_rest_per_micro_batch() {
        // Two chunks of 1 streamed layer, 2 slots: each kept, read once a round.
        assert_eq!(round_reads_s([1, 1], 2, 4, 10.0, 1.0), 20.0);
        // Chunks of 3 with 3 slots: 2 kept, the third read by each of 4.
        assert_eq!(
            round_reads_s([3, 3], 3, 4, 10.0, 1.0),
            2.0 * (2.0 + 4.0) * 10.0
        );
        // One slot keeps a chunk's only streamed layer while the round runs it;
        // two layers through it are read by every micro-batch.
        assert_eq!(round_reads_s([1, 2], 1, 4, 10.0, 1.0), 14.0 + 8.0 * 11.0);
        // One micro-batch is one read of each.
        assert_eq!(round_reads_s([1, 2], 1, 1, 10.0, 1.0), 33.0);
        assert_eq!(round_reads_s([2, 2], 2, 1, 10.0, 1.0), 40.0);
    }
}
