//! The memory model: what a stage holds, term by term, computed from the model's
//! shape and how the stage's device holds weights. The planner sizes plans with
//! it ([`crate::cost`]); a stage splits its budget with it ([`Split`]) and
//! accounts its allocations against the same terms, so the two cannot drift.
//!
//! A stage holding `m` layers, `o` of them streamed through `s` slots, holds:
//!
//! ```text
//! rope + activations            every stage
//! + ends                        the starter: embedding, final norm, LM head
//! + kv · tokens · m             its sequences' caches over its layers
//! + (m − o) · layer             resident layers
//! + read_buffer + s · layer     when it streams (o > 0)
//! ```
//!
//! Not modelled term by term: the process's fixed overhead (the executable, the
//! async runtime and MQTT client, the tokenizer at the starter, thread stacks
//! and allocator slack). A stage reserves it whole out of its budget before
//! splitting the rest ([`StageCosts::overhead`]), so that its RSS stays within
//! the budget; the planner is told the budget without it.

use lime_schemas::ModelShape;
use std::fmt;

/// The alignment direct I/O (`O_DIRECT`) needs of offsets, lengths and buffers.
pub const DIRECT_ALIGN: u64 = 4096;

/// The host read buffer for tensors of up to `bytes`: their bytes, an alignment's
/// worth to start on a boundary, and one each to round the read out at both ends.
pub fn read_buffer_bytes(bytes: u64) -> u64 {
    bytes + 3 * DIRECT_ALIGN
}

/// Page-locked host bytes a GPU loader holds to stream tensors of up to `bytes`:
/// two buffers, one filling while the other is copied.
pub fn pinned_pair_bytes(bytes: u64) -> u64 {
    2 * bytes.max(1)
}

/// How a stage's device holds weights and reads streamed layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// Bytes per weight and per cached key or value in memory (the CPU computes
    /// in f32, a GPU in the checkpoint's dtype).
    pub weight_bytes: u64,
    /// Streamed layers are read through an aligned host buffer: for direct I/O,
    /// or to widen a stored dtype narrower than the one computed in.
    pub host_buffer: bool,
    /// Streamed layers pass through a GPU loader's two page-locked buffers.
    pub pinned_pair: bool,
}

/// A stage's memory terms for one model, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// One decoder layer as held.
    pub layer: u64,
    /// What reading a streamed layer needs besides its slot.
    pub read_buffer: u64,
    /// Embedding, final norm and LM head (not counted twice when tied).
    pub ends: u64,
    /// The rotary tables (f32 everywhere).
    pub rope: u64,
    /// The activation workspace of the largest micro-batch (f32).
    pub activations: u64,
    /// KV cache per token of context per layer.
    pub kv_per_token_layer: u64,
}

impl Footprint {
    /// The terms of `shape` held as `holding` says, with micro-batches of up to
    /// `activation_tokens` tokens.
    pub fn new(shape: &ModelShape, holding: Holding, activation_tokens: usize) -> Self {
        let wb = holding.weight_bytes;
        let largest = shape.largest_tensor_params * shape.stored_dtype_bytes as u64;
        let read_buffer = if holding.host_buffer {
            read_buffer_bytes(largest)
        } else {
            0
        } + if holding.pinned_pair {
            pinned_pair_bytes(largest)
        } else {
            0
        };
        Self {
            layer: shape.layer_params * wb,
            read_buffer,
            ends: shape.end_params * wb,
            rope: shape.rope_values * 4,
            activations: activation_tokens as u64 * shape.activation_values_per_token * 4,
            kv_per_token_layer: shape.kv_values_per_token * wb,
        }
    }

    /// KV caches of `tokens` tokens of context over `layers` layers.
    pub fn kv(&self, tokens: u64, layers: usize) -> u64 {
        tokens * layers as u64 * self.kv_per_token_layer
    }

    /// Weights held for the stage's whole life besides its layers: the rotary
    /// tables, and at the starter the ends.
    pub fn fixed_weights(&self, starter: bool) -> u64 {
        self.rope + if starter { self.ends } else { 0 }
    }

    /// Streaming through `slots` slots (nothing without slots).
    pub fn streaming(&self, slots: usize) -> u64 {
        if slots == 0 {
            0
        } else {
            self.read_buffer + slots as u64 * self.layer
        }
    }

    /// Everything a stage holds with `m` layers, `o` of them streamed through
    /// `slots`, and KV room for `kv_tokens` tokens of context.
    pub fn held(&self, m: usize, o: usize, slots: usize, starter: bool, kv_tokens: u64) -> u64 {
        self.fixed_weights(starter)
            + self.activations
            + self.kv(kv_tokens, m)
            + (m - o.min(m)) as u64 * self.layer
            + if o > 0 { self.streaming(slots) } else { 0 }
    }

    /// The terms of one stage: `layers` layers, the ends when `starter`, and KV
    /// room kept for one sequence of `kv_reserve_tokens`.
    pub fn stage(self, layers: usize, starter: bool, kv_reserve_tokens: usize) -> StageCosts {
        StageCosts {
            footprint: self,
            overhead: 0,
            layers,
            starter,
            kv_reserve_tokens,
        }
    }
}

/// One stage's costs: its share of the model under the [`Footprint`] terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageCosts {
    /// The model's terms on this stage's device.
    pub footprint: Footprint,
    /// Decoder layers the stage runs.
    pub layers: usize,
    /// The stage holds the embedding and head.
    pub starter: bool,
    /// KV room the split keeps for one sequence of this many tokens.
    pub kv_reserve_tokens: usize,
    /// The process's fixed overhead, reserved out of the budget before the split.
    pub overhead: u64,
}

impl StageCosts {
    /// These costs with `bytes` of the budget reserved for the process itself.
    pub fn with_overhead(self, bytes: u64) -> Self {
        Self {
            overhead: bytes,
            ..self
        }
    }

    /// What the account may hold under `budget`: the budget less the overhead.
    pub fn accountable(&self, budget: u64) -> u64 {
        budget.saturating_sub(self.overhead)
    }

    /// One layer as held.
    pub fn layer(&self) -> u64 {
        self.footprint.layer
    }

    /// The rotary tables and, at the starter, the ends.
    pub fn fixed_weights(&self) -> u64 {
        self.footprint.fixed_weights(self.starter)
    }

    /// The activation workspace.
    pub fn activations(&self) -> u64 {
        self.footprint.activations
    }

    /// KV room for one sequence of the reserved length over the stage's layers.
    pub fn kv_reserve(&self) -> u64 {
        self.footprint
            .kv(self.kv_reserve_tokens as u64, self.layers)
    }

    /// KV bytes per token of context over the stage's layers.
    pub fn kv_per_token(&self) -> u64 {
        self.footprint.kv(1, self.layers)
    }

    /// What no split can do without: fixed weights, workspace and one sequence.
    fn floor(&self) -> u64 {
        self.fixed_weights() + self.activations() + self.kv_reserve()
    }

    /// The smallest budget under which [`Split::choose`] keeps `resident` of the
    /// stage's layers in memory and streams the rest through one slot.
    pub fn budget_for(&self, resident: usize) -> u64 {
        let held = if resident >= self.layers {
            self.floor() + self.layers as u64 * self.layer()
        } else {
            self.floor() + self.footprint.streaming(1) + resident as u64 * self.layer()
        };
        self.overhead + held
    }
}

/// The split of a budget: which of the stage's layers stay resident, which are
/// streamed (in visit order) and through how many slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Layers held for the stage's life.
    pub resident: Vec<usize>,
    /// Layers read from storage before each use, in visit order.
    pub offloaded: Vec<usize>,
    /// Layers in memory at once for streaming.
    pub slots: usize,
}

/// Why a budget cannot run the stage at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooSmall(pub String);

impl fmt::Display for TooSmall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TooSmall {}

impl Split {
    /// Splits `budget` over `layers` (the stage's layers in visit order). With
    /// `offloaded` given (by the plan) only the slots are chosen; otherwise as many
    /// layers as fit stay resident, the rest spread evenly over the visit order, and
    /// leftover room becomes extra slots up to `max_slots`.
    pub fn choose(
        budget: Option<u64>,
        layers: &[usize],
        offloaded: Option<&[usize]>,
        max_slots: usize,
        costs: &StageCosts,
    ) -> Result<Self, TooSmall> {
        let fixed = costs.floor();
        let given = budget;
        let budget = budget.map(|b| costs.accountable(b));
        let all_resident = Self {
            resident: layers.to_vec(),
            offloaded: Vec::new(),
            slots: 0,
        };
        let Some(budget) = budget else {
            return match offloaded {
                Some(o) if !o.is_empty() => Ok(Self::with_offloaded(layers, o, max_slots.max(1))),
                _ => Ok(all_resident),
            };
        };
        let (w, n) = (costs.layer(), layers.len() as u64);
        let read_buffer = costs.footprint.read_buffer;
        let minimum = fixed + w.min(n * w) + if n > 0 { read_buffer } else { 0 };
        if budget < minimum || (n > 0 && max_slots == 0 && budget < fixed + n * w) {
            return Err(TooSmall(format!(
                "a memory budget of {} cannot hold the process's fixed overhead ({}) plus one layer ({}) plus one sequence of {} tokens ({} of KV) \
                 plus the activation workspace ({}), the read buffer ({}) and the embedding, head and rotary tables ({}): \
                 it needs at least {}",
                mib(given.unwrap_or(budget)),
                mib(costs.overhead),
                mib(w),
                costs.kv_reserve_tokens,
                mib(costs.kv_reserve()),
                mib(costs.activations()),
                mib(read_buffer),
                mib(costs.fixed_weights()),
                mib(costs.overhead + if max_slots == 0 { fixed + n * w } else { minimum })
            )));
        }
        if let Some(o) = offloaded {
            let resident = n - o.len() as u64;
            let room = budget.saturating_sub(fixed + resident * w + read_buffer);
            let slots = ((room / w.max(1)) as usize).min(max_slots).min(o.len());
            if !o.is_empty() && slots == 0 {
                return Err(TooSmall(format!(
                    "the plan keeps {resident} layers resident ({}), which leaves no room in a budget of {} for a slot to stream the other {} ({} each)",
                    mib(resident * w),
                    mib(budget),
                    o.len(),
                    mib(w)
                )));
            }
            return Ok(Self::with_offloaded(layers, o, slots));
        }
        if fixed + n * w <= budget {
            return Ok(all_resident);
        }
        // One slot is the least streaming needs; what is left holds resident layers,
        // and whatever is left after those becomes extra slots.
        let room = budget - fixed - read_buffer - w;
        let resident = ((room / w) as usize).min(layers.len() - 1);
        let streamed = layers.len() - resident;
        let spare = (room - resident as u64 * w) / w;
        let slots = (1 + spare as usize).min(max_slots.max(1)).min(streamed);
        Ok(Self::with_offloaded(
            layers,
            &spread(layers, streamed),
            slots,
        ))
    }

    /// Keeps the plan's `offloaded` layers streamed through `slots`.
    pub fn with_offloaded(layers: &[usize], offloaded: &[usize], slots: usize) -> Self {
        Self {
            resident: layers
                .iter()
                .copied()
                .filter(|l| !offloaded.contains(l))
                .collect(),
            offloaded: layers
                .iter()
                .copied()
                .filter(|l| offloaded.contains(l))
                .collect(),
            slots: slots.min(offloaded.len()),
        }
    }
}

/// `count` of `layers` (in visit order) spread evenly over it, starting with the
/// first, which the time between two visits of the stage hides best.
pub fn spread(layers: &[usize], count: usize) -> Vec<usize> {
    let count = count.min(layers.len());
    (0..count)
        .map(|j| layers[j * layers.len() / count])
        .collect()
}

/// Bytes in MiB with one decimal, for messages.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn shape() -> ModelShape {
        ModelShape {
            name: "terms".into(),
            layers: 8,
            hidden: 64,
            layer_params: 1000,
            largest_tensor_params: 300,
            end_params: 50,
            head_params: 40,
            kv_values_per_token: 7,
            activation_values_per_token: 11,
            rope_values: 13,
            max_context: 100,
            stored_dtype_bytes: 2,
        }
    }

    #[test]
    fn each_term_is_counted_once() {
        let f = |host_buffer, pinned_pair| {
            let holding = Holding {
                weight_bytes: 4,
                host_buffer,
                pinned_pair,
            };
            Footprint::new(&shape(), holding, 5)
        };
        let cpu = f(true, false);
        assert_eq!(cpu.layer, 1000 * 4, "layers in the dtype computed in");
        assert_eq!(cpu.ends, 50 * 4);
        assert_eq!(cpu.rope, 13 * 4, "rotary tables are f32");
        assert_eq!(cpu.activations, 5 * 11 * 4, "activations are f32");
        assert_eq!(cpu.kv_per_token_layer, 7 * 4);
        assert_eq!(cpu.read_buffer, 300 * 2 + 3 * DIRECT_ALIGN, "stored bytes");
        assert_eq!(f(false, true).read_buffer, 2 * 300 * 2);
        assert_eq!(f(false, false).read_buffer, 0);

        // A stage of 3 layers, 2 of them streamed through 1 slot, with 10 tokens
        // of KV, at the starter and elsewhere.
        let all = cpu.rope + cpu.activations + 10 * 3 * cpu.kv_per_token_layer + cpu.layer;
        let streaming = cpu.read_buffer + cpu.layer;
        assert_eq!(cpu.held(3, 2, 1, false, 10), all + streaming);
        assert_eq!(cpu.held(3, 2, 1, true, 10), all + streaming + cpu.ends);
        assert_eq!(cpu.held(3, 0, 2, false, 10), all + 2 * cpu.layer);

        let stage = cpu.stage(3, true, 10);
        assert_eq!(stage.kv_reserve(), 10 * 3 * cpu.kv_per_token_layer);
        assert_eq!(stage.kv_per_token(), 3 * cpu.kv_per_token_layer);
        assert_eq!(stage.budget_for(1), cpu.held(3, 2, 1, true, 10));
        assert_eq!(stage.budget_for(3), cpu.held(3, 0, 0, true, 10));
    }

    /// 10 MB layers, 2 MB of fixed weights, 1 MB of workspace, 1 MB of KV for one
    /// sequence of 128 tokens over 8 layers.
    fn costs() -> StageCosts {
        Footprint {
            layer: 10 * MB,
            read_buffer: 0,
            ends: 2 * MB,
            rope: 0,
            activations: MB,
            kv_per_token_layer: MB / 128 / 8,
        }
        .stage(8, true, 128)
    }

    #[test]
    fn an_ample_budget_keeps_everything_resident() {
        let layers = [0, 1, 2, 3, 8, 9, 10, 11];
        for budget in [None, Some(84 * MB), Some(1 << 40)] {
            let s = Split::choose(budget, &layers, None, 2, &costs()).unwrap();
            assert_eq!(s.resident, layers);
            assert!(s.offloaded.is_empty());
            assert_eq!(s.slots, 0);
        }
    }

    #[test]
    fn a_tight_budget_streams_evenly_spread_layers() {
        let layers = [0, 1, 2, 3, 8, 9, 10, 11];
        // 4 MB fixed; 40 MB left: one slot and three resident layers.
        let s = Split::choose(Some(44 * MB), &layers, None, 2, &costs()).unwrap();
        assert_eq!(s.resident.len(), 3);
        assert_eq!(s.offloaded, vec![0, 1, 3, 8, 10]);
        assert_eq!(s.slots, 1);
        // Just over one layer: everything streams through one slot.
        let s = Split::choose(Some(15 * MB), &layers, None, 2, &costs()).unwrap();
        assert_eq!((s.resident.len(), s.offloaded.len(), s.slots), (0, 8, 1));
        // Room for two layers: a resident one beats a second slot, unless the plan
        // streams them all.
        let s = Split::choose(Some(24 * MB), &layers, None, 2, &costs()).unwrap();
        assert_eq!((s.resident.len(), s.offloaded.len(), s.slots), (1, 7, 1));
        let s = Split::choose(Some(24 * MB), &layers, Some(&layers), 2, &costs()).unwrap();
        assert_eq!((s.resident.len(), s.offloaded.len(), s.slots), (0, 8, 2));
    }

    #[test]
    fn a_budget_below_one_layer_and_one_sequence_is_refused() {
        let err = Split::choose(Some(13 * MB), &[0, 1], None, 2, &costs()).unwrap_err();
        assert!(err.0.contains("needs at least 14.0 MiB"), "{err}");
        assert!(err.0.contains("one sequence of 128 tokens"), "{err}");
        // Without slots (no streaming allowed) everything must fit.
        let err = Split::choose(Some(20 * MB), &[0, 1], None, 0, &costs()).unwrap_err();
        assert!(err.0.contains("needs at least 24.0 MiB"), "{err}");
    }

    #[test]
    fn the_plans_offloaded_set_is_kept_and_checked() {
        let layers = [4, 5, 6, 7];
        let s = Split::choose(Some(40 * MB), &layers, Some(&[7, 5]), 2, &costs()).unwrap();
        assert_eq!(s.resident, vec![4, 6]);
        assert_eq!(s.offloaded, vec![5, 7], "in visit order");
        assert_eq!(s.slots, 1);
        let err = Split::choose(Some(30 * MB), &layers, Some(&[7]), 2, &costs()).unwrap_err();
        assert!(err.0.contains("no room"), "{err}");
    }
}
