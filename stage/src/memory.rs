//! The stage's memory budget: how it is split at start (which layers stay resident,
//! how many slots stream the rest) and the account every allocation that scales
//! with the model or the requests goes through afterwards.
//!
//! Accounted: resident weights (with the embedding and head at the starter and the
//! rotary tables), staging (layer slots and the raw read buffer), KV caches, and the
//! activation workspace of the largest micro-batch. Not accounted, and documented in
//! the README as the fixed overhead: the executable, the async runtime and MQTT
//! client, the tokenizer at the starter, thread stacks and allocator slack.

use crate::config::MemoryConfig;
use lime_kernels::{Checkpoint, Config, Placement};
use std::fmt;

/// What the stage holds, by kind, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub weights: u64,
    pub staging: u64,
    pub kv: u64,
    pub activations: u64,
}

impl Held {
    pub fn total(&self) -> u64 {
        self.weights + self.staging + self.kv + self.activations
    }
}

/// The running account against the budget.
#[derive(Debug)]
pub struct Budget {
    limit: Option<u64>,
    held: Held,
    peak: u64,
}

/// An allocation the budget has no room for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    pub what: &'static str,
    pub wanted: u64,
    pub free: u64,
    pub limit: u64,
}

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the stage's memory budget of {} has {} free, not the {} this {} needs",
            mib(self.limit),
            mib(self.free),
            mib(self.wanted),
            self.what
        )
    }
}

impl Budget {
    /// Starts the account with what the stage holds for its whole life.
    pub fn new(limit: Option<u64>, fixed: Held) -> Self {
        Self {
            limit,
            held: fixed,
            peak: fixed.total(),
        }
    }

    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    pub fn held(&self) -> Held {
        self.held
    }

    /// The largest total held since start.
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// Takes `bytes` of KV room for a new sequence, or refuses without changing
    /// anything.
    pub fn take_kv(&mut self, bytes: u64) -> Result<(), Exhausted> {
        if let Some(limit) = self.limit {
            let free = limit.saturating_sub(self.held.total());
            if bytes > free {
                return Err(Exhausted {
                    what: "sequence's KV cache",
                    wanted: bytes,
                    free,
                    limit,
                });
            }
        }
        self.held.kv += bytes;
        self.peak = self.peak.max(self.held.total());
        Ok(())
    }

    pub fn free_kv(&mut self, bytes: u64) {
        self.held.kv = self.held.kv.saturating_sub(bytes);
    }

    /// Records what resident weights and staging take after the split moved;
    /// refuses growth beyond the limit without changing anything.
    pub fn set_layers(&mut self, weights: u64, staging: u64) -> Result<(), Exhausted> {
        let after = Held {
            weights,
            staging,
            ..self.held
        };
        if let Some(limit) = self.limit {
            if after.total() > limit && after.total() > self.held.total() {
                return Err(Exhausted {
                    what: "layer",
                    wanted: after.total() - self.held.total(),
                    free: limit.saturating_sub(self.held.total()),
                    limit,
                });
            }
        }
        self.held = after;
        self.peak = self.peak.max(after.total());
        Ok(())
    }
}

/// Bytes that depend on the model's shape and the stage's settings, for sizing.
#[derive(Debug, Clone, Copy)]
pub struct Costs {
    /// One decoder layer's weights as computed (f32 on the CPU, the checkpoint's
    /// dtype on a GPU).
    pub layer: u64,
    /// The raw read buffer for streamed layers (0 when reads go straight into the
    /// slots).
    pub read_buffer: u64,
    /// Embedding, head (starter only) and rotary tables.
    pub fixed_weights: u64,
    /// The activation workspace.
    pub activations: u64,
    /// KV room kept for one sequence of the reserved length, over the stage's layers.
    pub kv_reserve: u64,
    pub kv_reserve_tokens: usize,
}

impl Costs {
    /// The costs of a stage holding `layers` layers of `ckpt` (and the embedding and
    /// head when it is the `starter`) at `placement` with `memory`'s settings, all
    /// computed from the checkpoint's config and headers, before anything is
    /// loaded. Weights and caches count in the dtype they compute in there: f32 on
    /// the CPU, the checkpoint's own on a GPU.
    pub fn of(
        ckpt: &Checkpoint,
        layers: usize,
        starter: bool,
        memory: &MemoryConfig,
        placement: Placement,
    ) -> lime_kernels::Result<Self> {
        let cfg = ckpt.config();
        let loaded = |name: &str| ckpt.loaded_bytes(name, placement).unwrap_or(0);
        let ends = if starter {
            let tied = cfg.tie_word_embeddings && ckpt.entry("lm_head.weight").is_none();
            let head =
                loaded("model.norm.weight") + if tied { 0 } else { loaded("lm_head.weight") };
            loaded("model.embed_tokens.weight") + head
        } else {
            0
        };
        // Rotary tables are f32 everywhere.
        let rope = (cfg.max_context() * cfg.head_dim * 4) as u64;
        let layer_dtype = ckpt.layer_dtype_at(placement);
        let kv_reserve_tokens = memory
            .kv_reserve_tokens
            .unwrap_or(cfg.max_context())
            .min(cfg.max_context());
        let prefix = "model.layers.";
        let largest = ckpt.largest_with_prefix(prefix) as usize;
        Ok(Self {
            // Layer 0's tensors in the dtype of a slot (lime's checkpoints
            // store every layer alike).
            layer: ckpt.elements_with_prefix("model.layers.0.")
                * layer_dtype.size_in_bytes() as u64,
            read_buffer: (ckpt.staging_needed(prefix, placement) + placement.loader_bytes(largest))
                as u64,
            fixed_weights: ends + rope,
            activations: activation_bytes(cfg, memory.activation_tokens),
            kv_reserve: kv_bytes(cfg, layers, kv_reserve_tokens, layer_dtype.size_in_bytes()),
            kv_reserve_tokens,
        })
    }

    /// The smallest budget under which [`Split::choose`] keeps `resident` of the
    /// stage's layers in memory and streams the rest through one slot.
    pub fn budget_for(&self, resident: usize, layers: usize) -> u64 {
        let fixed = self.fixed_weights + self.activations + self.kv_reserve;
        if resident >= layers {
            fixed + layers as u64 * self.layer
        } else {
            fixed + self.read_buffer + (resident as u64 + 1) * self.layer
        }
    }
}

/// The split of a budget: which of the stage's layers stay resident, which are
/// streamed (in visit order) and through how many slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub resident: Vec<usize>,
    pub offloaded: Vec<usize>,
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
        costs: &Costs,
    ) -> Result<Self, TooSmall> {
        let fixed = costs.fixed_weights + costs.activations + costs.kv_reserve;
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
        let (w, n) = (costs.layer, layers.len() as u64);
        let minimum = fixed + w.min(n * w) + if n > 0 { costs.read_buffer } else { 0 };
        if budget < minimum || (n > 0 && max_slots == 0 && budget < fixed + n * w) {
            return Err(TooSmall(format!(
                "a memory budget of {} cannot hold one layer ({}) plus one sequence of {} tokens ({} of KV) \
                 plus the activation workspace ({}), the read buffer ({}) and the embedding, head and rotary tables ({}): \
                 it needs at least {}",
                mib(budget),
                mib(w),
                costs.kv_reserve_tokens,
                mib(costs.kv_reserve),
                mib(costs.activations),
                mib(costs.read_buffer),
                mib(costs.fixed_weights),
                mib(if max_slots == 0 { fixed + n * w } else { minimum })
            )));
        }
        if let Some(o) = offloaded {
            let resident = n - o.len() as u64;
            let room = budget.saturating_sub(fixed + resident * w + costs.read_buffer);
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
        let room = budget - fixed - costs.read_buffer - w;
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

    fn with_offloaded(layers: &[usize], offloaded: &[usize], slots: usize) -> Self {
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

/// The activation workspace of a micro-batch of `tokens` tokens, all in f32.
pub fn activation_bytes(cfg: &Config, tokens: usize) -> u64 {
    tokens as u64 * cfg.activation_values_per_token() * 4
}

/// KV bytes of one sequence of `tokens` tokens over `layers` layers, as
/// [`lime_kernels::KvCache`] allocates them.
pub fn kv_bytes(cfg: &Config, layers: usize, tokens: usize, dtype_bytes: usize) -> u64 {
    (2 * layers * cfg.num_key_value_heads * tokens * cfg.head_dim * dtype_bytes) as u64
}

/// Makes the allocator hand freed blocks of 128 KiB and more back to the
/// system at once, so that RSS follows the account. glibc otherwise raises its
/// mmap threshold every time such a block is freed (up to 32 MiB): evicted
/// layers, finished caches and large activations then stay in its heaps, and a
/// stage that streamed layers to make room for caches was measured at twice its
/// budget. A `MALLOC_MMAP_THRESHOLD_` in the environment is left to rule.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: mallopt only changes glibc's tuning parameters, under the
        // allocator's own lock; it touches no memory of ours and answers a value
        // it cannot take with 0 instead of failing.
        let _ = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
    }
}

/// This process's resident set size and its high-water mark, from
/// `/proc/self/status` (Linux).
pub fn rss() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kib| kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[test]
    fn costs_count_weights_in_the_dtype_they_compute_in() {
        use lime_kernels::synth::{self, Preset, StoredDtype, SynthSpec};
        use lime_kernels::{DecoderLayer, Device, Embedding, Head, LoadPath, Rope};
        let dir = tempfile::tempdir().unwrap();
        let spec = SynthSpec::preset(Preset::Tiny, StoredDtype::BF16, 3);
        synth::synthesize(&spec, dir.path(), &mut |_, _| {}).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let cfg = ckpt.config();
        let memory = MemoryConfig::default();

        // On the CPU the account is what loading there holds: bf16 widened to f32.
        let cpu = Costs::of(&ckpt, 2, true, &memory, Placement::Cpu).unwrap();
        let layer = DecoderLayer::load(&ckpt, 0, &Device::Cpu).unwrap();
        assert_eq!(cpu.layer, layer.bytes() as u64);
        let emb = Embedding::load(&ckpt, &Device::Cpu).unwrap();
        let head = Head::load(&ckpt, &Device::Cpu, Some(&emb)).unwrap();
        let rope = Rope::new(cfg, cfg.max_context(), &Device::Cpu).unwrap();
        let ends = (emb.bytes() + head.bytes() + rope.bytes()) as u64;
        assert_eq!(cpu.fixed_weights, ends);
        let largest = ckpt.largest_with_prefix("model.layers.") as usize;
        assert_eq!(
            cpu.read_buffer,
            lime_kernels::StagingBuffer::footprint(largest) as u64,
            "bf16 is widened through the read buffer"
        );

        // A GPU keeps bf16: half the weights and caches; the rotary tables stay f32.
        let gpu = Costs::of(
            &ckpt,
            2,
            true,
            &memory,
            Placement::Gpu(LoadPath::PinnedCopy),
        )
        .unwrap();
        let rope = rope.bytes() as u64;
        assert_eq!(gpu.layer * 2, cpu.layer);
        assert_eq!((gpu.fixed_weights - rope) * 2, cpu.fixed_weights - rope);
        assert_eq!(gpu.kv_reserve * 2, cpu.kv_reserve);
        assert_eq!(gpu.activations, cpu.activations);
        // Reads land in the loader's two page-locked buffers, not a host buffer...
        assert_eq!(gpu.read_buffer, 2 * largest as u64);
        // ...and on an integrated GPU straight in the mapped slots.
        let mapped = Costs::of(&ckpt, 2, true, &memory, Placement::Gpu(LoadPath::Mapped)).unwrap();
        assert_eq!((mapped.layer, mapped.read_buffer), (gpu.layer, 0));
        // Not the starter: no embedding or head.
        let middle = Costs::of(&ckpt, 2, false, &memory, Placement::Cpu).unwrap();
        assert_eq!(middle.fixed_weights, rope);
    }

    fn costs() -> Costs {
        Costs {
            layer: 10 * MB,
            read_buffer: 0,
            fixed_weights: 2 * MB,
            activations: MB,
            kv_reserve: MB,
            kv_reserve_tokens: 128,
        }
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

    #[test]
    fn kv_beyond_the_budget_is_refused_and_changes_nothing() {
        let fixed = Held {
            weights: 10,
            staging: 5,
            kv: 0,
            activations: 5,
        };
        let mut b = Budget::new(Some(50), fixed);
        b.take_kv(20).unwrap();
        let err = b.take_kv(11).unwrap_err();
        assert_eq!((err.wanted, err.free), (11, 10));
        assert_eq!(b.held().total(), 40);
        b.free_kv(20);
        b.take_kv(30).unwrap();
        assert_eq!(b.peak(), 50);
    }
}
