//! The memory governor: this stage's budget, the layers held against it
//! (resident or streamed through slots, [`Residency`]) and the account of every
//! KV cache. It gives a new sequence room, streaming more layers when caches
//! need it, and keeps streamed layers resident again when room comes back
//! ([`crate::memory::adaptation`] chooses which).

use super::shard::ModelShard;
use super::Error;
use crate::config::MemoryConfig;
use crate::memory::adaptation;
use crate::memory::residency::{LayerRef, LoadStats, Residency, Slot};
use crate::memory::rounds::RoundKeep;
use crate::memory::{self, Budget, Exhausted, Held, Split, StageCosts};
use lime_kernels::{Checkpoint, DecoderLayer, KvCache, Tensor};
use lime_schemas::telemetry::{MemoryReport, ResidencyReport};
use lime_schemas::Round;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The budget and everything held against it.
pub(super) struct MemoryGovernor {
    ckpt: Arc<Checkpoint>,
    residency: Residency,
    /// Streamed layers kept until the rest of a round has run them.
    rounds: RoundKeep,
    budget: Budget,
    costs: StageCosts,
    /// Layers the shard runs: every cache holds this many.
    layers: usize,
    /// The model's depth, for choosing layers to evict and restore.
    depth: usize,
    read_limit: Option<u64>,
    /// The streamed layer to keep resident the next time a slot brings it.
    restoring: Option<usize>,
    evictions: u64,
    restorations: u64,
}

impl MemoryGovernor {
    /// Splits the budget for `shard` (the plan's `offloaded` layers streamed when
    /// it names them), then loads the resident layers, reusing `kept` ones, and
    /// starts streaming the rest, reporting `(layers loaded, layers to load)`.
    /// A budget too small to run the shard at all is refused before any read.
    pub(super) fn start(
        ckpt: Arc<Checkpoint>,
        stage: &str,
        shard: &ModelShard,
        offloaded: Option<&[usize]>,
        memory: &MemoryConfig,
        kept: HashMap<usize, DecoderLayer>,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self, Error> {
        let placement = lime_kernels::Placement::of(shard.device())?;
        let layers = shard.layers();
        let costs = memory::stage_costs(&ckpt, layers.len(), shard.is_starter(), memory, placement);
        if shard.fixed_bytes() != costs.fixed_weights() {
            tracing::warn!(
                held = shard.fixed_bytes(),
                accounted = costs.fixed_weights(),
                "embedding, head and rotary tables differ from their accounted size"
            );
        }
        let max_slots = if memory.budget_bytes.is_some() || offloaded.is_some() {
            memory.max_slots
        } else {
            0
        };
        let split = Split::choose(memory.budget_bytes, layers, offloaded, max_slots, &costs)
            .map_err(|source| Error::TooSmall {
                stage: stage.to_owned(),
                source,
            })?;
        tracing::info!(
            budget_mb = memory.budget_bytes.map(|b| b >> 20),
            overhead_mb = memory.overhead_bytes >> 20,
            resident = ?split.resident,
            offloaded = ?split.offloaded,
            slots = split.slots,
            prefetch = memory.prefetch,
            "memory split"
        );
        let residency = Residency::start_with(
            ckpt.clone(),
            shard.device(),
            kept,
            &split,
            memory.prefetch,
            progress,
        )?;
        let staging = if split.offloaded.is_empty() {
            0
        } else {
            costs.footprint.streaming(residency.slots())
        };
        let budget = Budget::new(
            memory.accountable_bytes(),
            Held {
                weights: residency.resident_bytes() + costs.fixed_weights(),
                staging,
                kv: 0,
                activations: costs.activations(),
            },
        );
        Ok(Self {
            ckpt,
            residency,
            rounds: RoundKeep::default(),
            budget,
            costs,
            layers: layers.len(),
            depth: shard.config().num_hidden_layers,
            read_limit: memory.read_bytes_per_s(),
            restoring: None,
            evictions: 0,
            restorations: 0,
        })
    }

    /// The resident layers, for the next plan to keep what it can.
    pub(super) fn into_resident(self) -> HashMap<usize, DecoderLayer> {
        self.residency.into_resident()
    }

    /// KV bytes one token takes across this stage's layers.
    pub(super) fn kv_per_token(&self) -> u64 {
        self.costs.kv_per_token()
    }

    /// Bytes left for KV caches with every layer streamed (through the slots it
    /// has, or one); `None` without a budget.
    pub(super) fn kv_room(&self) -> Option<u64> {
        let streaming = if self.layers == 0 {
            0
        } else {
            self.costs
                .footprint
                .streaming(self.residency.slots().max(1))
        };
        let floor = self.costs.fixed_weights() + self.costs.activations() + streaming;
        self.budget.limit().map(|l| l.saturating_sub(floor))
    }

    /// Resident weights, ends and rotary tables.
    pub(super) fn weights_bytes(&self) -> u64 {
        self.budget.held().weights
    }

    pub(super) fn kv_bytes(&self) -> u64 {
        self.budget.held().kv
    }

    pub(super) fn load_stats(&self) -> LoadStats {
        self.residency.stats()
    }

    /// A cache of `capacity` tokens for a new sequence of `shard`, if the budget
    /// has room for it (made by streaming more layers if need be).
    pub(super) fn new_cache(
        &mut self,
        shard: &ModelShard,
        capacity: usize,
    ) -> Result<KvCache, Error> {
        let bytes = self.costs.footprint.kv(capacity as u64, self.layers);
        if self.budget.take_kv(bytes).is_err() {
            self.make_room(bytes)?;
            self.budget.take_kv(bytes)?;
        }
        let cache = KvCache::new(
            shard.config(),
            shard.layers().iter().copied(),
            capacity,
            shard.dtype(),
            shard.device(),
        );
        match cache {
            Ok(c) if c.bytes() as u64 == bytes => Ok(c),
            Ok(c) => {
                self.budget.free_kv(bytes);
                Err(Error::Refused(format!(
                    "a cache of {} bytes was accounted as {bytes}",
                    c.bytes()
                )))
            }
            Err(e) => {
                self.budget.free_kv(bytes);
                Err(e.into())
            }
        }
    }

    /// Gives a finished sequence's cache back to the budget.
    pub(super) fn free_cache(&mut self, cache: KvCache) {
        self.budget.free_kv(cache.bytes() as u64);
    }

    /// Runs `compute` with layer `index`, waiting for its read if it is streamed,
    /// and says how long that wait was (the loading bubble). A streamed layer
    /// marked for restoring stays resident afterwards.
    ///
    /// A micro-batch of `round` that is not the round's last leaves a streamed
    /// layer in its slot for the rest of the round ([`RoundKeep`]); the
    /// baselines, which read on demand, do not share reads.
    pub(super) fn with_layer(
        &mut self,
        index: usize,
        round: Round,
        compute: impl FnOnce(&DecoderLayer) -> lime_kernels::Result<Tensor>,
    ) -> Result<(Tensor, Duration), Error> {
        let (layer, wait, kept) = match self.rounds.take(index) {
            Some((slot, kept)) => (LayerRef::Streamed(slot), Duration::ZERO, Some(kept)),
            None => {
                let rounds = &mut self.rounds;
                let (layer, wait) = self
                    .residency
                    .layer_or_free(index, &mut || rounds.release_oldest())?;
                (layer, wait, None)
            }
        };
        let y = compute(&layer);
        let slot = match layer {
            LayerRef::Streamed(slot) => slot,
            LayerRef::Resident(_) => return Ok((y?, wait)),
        };
        let y = y?;
        if self.restoring == Some(index) {
            self.restoring = None;
            self.keep_streamed(slot)?;
        } else if self.residency.prefetch() {
            let limit = self.residency.slots().saturating_sub(1).max(1);
            self.rounds.visited(index, slot, kept, round, limit);
        }
        Ok((y, wait))
    }

    /// The budget and what is accounted against it now, with `sequences` live.
    pub(super) fn memory_report(&self, sequences: usize) -> MemoryReport {
        let held = self.budget.held();
        let (rss, peak_rss) = memory::rss().unzip();
        MemoryReport {
            budget_bytes: self.budget.limit().map(|l| l + self.costs.overhead),
            overhead_bytes: self.costs.overhead,
            weights_bytes: held.weights,
            staging_bytes: held.staging,
            kv_bytes: held.kv,
            activation_bytes: held.activations,
            accounted_bytes: held.total(),
            peak_accounted_bytes: self.budget.peak(),
            rss_bytes: rss,
            peak_rss_bytes: peak_rss,
            sequences: sequences as u32,
        }
    }

    /// Whether any of the stage's layers are streamed.
    pub(super) fn streams(&self) -> bool {
        !self.residency.offloaded().is_empty()
    }

    /// Whether streamed layers are read ahead and shared by a round (lime), not
    /// read on demand for each micro-batch (the baselines).
    pub(super) fn shares_reads(&self) -> bool {
        self.residency.prefetch()
    }

    pub(super) fn residency_report(&self) -> ResidencyReport {
        ResidencyReport {
            resident: self.residency.resident(),
            offloaded: self.residency.offloaded().to_vec(),
            slots: self.residency.slots(),
            prefetch: self.residency.prefetch(),
            direct_io: self.ckpt.direct_io(),
            read_limit_bytes_per_s: self.read_limit,
            evictions: self.evictions,
            restorations: self.restorations,
            shared_visits: self.rounds.shared_visits(),
        }
    }
}

/// Local adaptation: the split between resident and streamed layers follows the
/// room KV caches leave.
impl MemoryGovernor {
    /// Streams as many more layers as `bytes` of new KV caches need, choosing
    /// those whose reads are best hidden. Fails, changing nothing, when even
    /// streaming every layer would not make the room (the starter's admission
    /// control keeps that from happening).
    fn make_room(&mut self, bytes: u64) -> Result<(), Error> {
        let Some(limit) = self.budget.limit() else {
            return Ok(());
        };
        let held = self.budget.held();
        let w = self.costs.layer().max(1);
        let starting = self.residency.slots() == 0;
        let slot = if starting {
            self.costs.footprint.streaming(1)
        } else {
            0
        };
        let over = (held.total() + bytes + slot).saturating_sub(limit);
        let mut resident = self.residency.resident();
        let count = over.div_ceil(w) as usize;
        if count > resident.len() {
            let floor = self.kv_room().unwrap_or(u64::MAX);
            return Err(Exhausted {
                what: "sequence's KV cache, even with every layer streamed,",
                wanted: bytes,
                free: floor.saturating_sub(held.kv),
                limit,
            }
            .into());
        }
        let mut streamed = self.residency.offloaded().to_vec();
        for _ in 0..count {
            let Some(victim) = adaptation::to_evict(&resident, &streamed, self.depth) else {
                break;
            };
            self.residency.evict(victim);
            resident.retain(|&l| l != victim);
            streamed.push(victim);
            streamed.sort_unstable();
            self.evictions += 1;
        }
        self.restoring = None;
        self.account_layers();
        self.residency.stream()?;
        self.account_layers();
        tracing::info!(
            evicted = count,
            offloaded = ?streamed,
            kv_mb = (held.kv + bytes) >> 20,
            "KV caches need room: streaming more layers"
        );
        Ok(())
    }

    /// With room to spare again (a layer and one sequence's reserve), marks the
    /// worst hidden streamed layer to stay resident the next time it is read.
    pub(super) fn relax(&mut self) {
        let Some(limit) = self.budget.limit() else {
            return;
        };
        let streamed = self.residency.offloaded();
        if self.restoring.is_some() || streamed.is_empty() {
            return;
        }
        let free = limit.saturating_sub(self.budget.held().total());
        // The last streamed layer frees its slots and read buffer when it stays.
        let cost = if streamed.len() == 1 {
            0
        } else {
            self.costs.layer()
        };
        if free >= cost + self.costs.kv_reserve() {
            self.restoring = adaptation::to_restore(streamed, self.depth);
        }
    }

    /// Keeps the layer `slot` holds resident, if the room is still there.
    fn keep_streamed(&mut self, slot: Slot) -> Result<(), Error> {
        let held = self.budget.held();
        let last = self.residency.offloaded().len() == 1;
        let grows = if last { 0 } else { self.costs.layer() };
        if self
            .budget
            .limit()
            .is_some_and(|l| held.total() + grows > l)
        {
            return Ok(());
        }
        let index = slot.index();
        self.residency.keep(slot)?;
        self.account_layers();
        self.restorations += 1;
        tracing::info!(
            layer = ?index,
            offloaded = ?self.residency.offloaded(),
            "memory freed: a streamed layer stays resident"
        );
        self.relax();
        Ok(())
    }

    /// Records the weights and staging the residency holds now.
    fn account_layers(&mut self) {
        let staging = self.costs.footprint.streaming(self.residency.slots());
        let weights = self.residency.resident_bytes() + self.costs.fixed_weights();
        if let Err(e) = self.budget.set_layers(weights, staging) {
            tracing::error!(error = %e, "the layer split does not fit the budget");
        }
    }
}
