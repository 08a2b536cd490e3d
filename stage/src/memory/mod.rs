//! The stage's memory budget: the memory model's terms for this stage
//! ([`stage_costs`], an adapter over `lime_plan::memory`, which also splits the
//! budget at start) and the account every allocation that scales with the model
//! or the requests goes through afterwards ([`Budget`]).
//!
//! Accounted: resident weights (with the embedding and head at the starter and the
//! rotary tables), staging (layer slots and the raw read buffer), KV caches, and the
//! activation workspace of the largest micro-batch. Not accounted, and documented in
//! the README as the fixed overhead: the executable, the async runtime and MQTT
//! client, the tokenizer at the starter, thread stacks and allocator slack.

pub mod adaptation;
pub mod demand;
pub mod residency;
pub mod rounds;

use crate::config::MemoryConfig;
use lime_kernels::{Checkpoint, LoadPath, Placement};
pub use lime_plan::memory::{mib, Split, StageCosts, TooSmall};
use lime_plan::memory::{Footprint, Holding};
use std::fmt;

/// What the stage holds, by kind, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Resident layers, the ends at the starter and the rotary tables.
    pub weights: u64,
    /// Layer slots and the read buffer of streamed layers.
    pub staging: u64,
    /// Every sequence's KV cache.
    pub kv: u64,
    /// The workspace of the largest micro-batch.
    pub activations: u64,
}

impl Held {
    /// Everything held.
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
    /// What asked for the room, as the message names it.
    pub what: &'static str,
    /// Bytes asked for.
    pub wanted: u64,
    /// Bytes the budget had free.
    pub free: u64,
    /// The budget, bytes.
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

impl std::error::Error for Exhausted {}

impl Budget {
    /// Starts the account with what the stage holds for its whole life.
    pub fn new(limit: Option<u64>, fixed: Held) -> Self {
        Self {
            limit,
            held: fixed,
            peak: fixed.total(),
        }
    }

    /// The budget, bytes; `None` for a stage without one.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// What is accounted now.
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

    /// Gives back a finished sequence's KV room.
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

/// The memory model's terms for a stage holding `layers` layers of `ckpt` (and
/// the embedding and head when it is the `starter`) at `placement` with
/// `memory`'s settings, before anything is loaded. Weights and caches count in
/// the dtype they compute in there: f32 on the CPU, the checkpoint's own on a GPU.
pub fn stage_costs(
    ckpt: &Checkpoint,
    layers: usize,
    starter: bool,
    memory: &MemoryConfig,
    placement: Placement,
) -> StageCosts {
    let max_context = ckpt.config().max_context();
    let holding = Holding {
        weight_bytes: ckpt.layer_dtype_at(placement).size_in_bytes() as u64,
        host_buffer: ckpt.layer_staging_needed(placement) > 0,
        pinned_pair: placement == Placement::Gpu(LoadPath::PinnedCopy),
    };
    let kv_reserve_tokens = memory
        .kv_reserve_tokens
        .unwrap_or(max_context)
        .min(max_context);
    Footprint::new(&ckpt.shape(), holding, memory.activation_tokens)
        .stage(layers, starter, kv_reserve_tokens)
        .with_overhead(memory.overhead_bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_count_weights_in_the_dtype_they_compute_in() {
        use lime_kernels::synth::{self, Preset, StoredDtype, SynthSpec};
        use lime_kernels::{DecoderLayer, Device, Embedding, Head, Rope};
        let dir = tempfile::tempdir().unwrap();
        let spec = SynthSpec::preset(Preset::Tiny, StoredDtype::BF16, 3);
        synth::synthesize(&spec, dir.path(), &mut |_, _| {}).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let cfg = ckpt.config();
        let memory = MemoryConfig::default();

        // On the CPU the account is what loading there holds: bf16 widened to f32.
        let cpu = stage_costs(&ckpt, 2, true, &memory, Placement::Cpu);
        let layer = DecoderLayer::load(&ckpt, 0, &Device::Cpu).unwrap();
        assert_eq!(cpu.layer(), layer.bytes() as u64);
        let emb = Embedding::load(&ckpt, &Device::Cpu).unwrap();
        let head = Head::load(&ckpt, &Device::Cpu, Some(&emb)).unwrap();
        let rope = Rope::new(cfg, cfg.max_context(), &Device::Cpu).unwrap();
        let ends = (emb.bytes() + head.bytes() + rope.bytes()) as u64;
        assert_eq!(cpu.fixed_weights(), ends);
        let largest = ckpt.largest_layer_tensor() as usize;
        assert_eq!(
            cpu.footprint.read_buffer,
            lime_kernels::StagingBuffer::footprint(largest) as u64,
            "bf16 is widened through the read buffer"
        );

        // A GPU keeps bf16: half the weights and caches; the rotary tables stay f32.
        let gpu = stage_costs(
            &ckpt,
            2,
            true,
            &memory,
            Placement::Gpu(LoadPath::PinnedCopy),
        );
        let rope = rope.bytes() as u64;
        assert_eq!(gpu.layer() * 2, cpu.layer());
        assert_eq!((gpu.fixed_weights() - rope) * 2, cpu.fixed_weights() - rope);
        assert_eq!(gpu.kv_reserve() * 2, cpu.kv_reserve());
        assert_eq!(gpu.activations(), cpu.activations());
        // Reads land in the loader's two page-locked buffers, not a host buffer...
        assert_eq!(gpu.footprint.read_buffer, 2 * largest as u64);
        // ...and on an integrated GPU straight in the mapped slots.
        let mapped = stage_costs(&ckpt, 2, true, &memory, Placement::Gpu(LoadPath::Mapped));
        assert_eq!(
            (mapped.layer(), mapped.footprint.read_buffer),
            (gpu.layer(), 0)
        );
        // Not the starter: no embedding or head.
        let middle = stage_costs(&ckpt, 2, false, &memory, Placement::Cpu);
        assert_eq!(middle.fixed_weights(), rope);
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
