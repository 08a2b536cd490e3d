//! The worker: what a stage computes and holds under one plan, in three parts.
//!
//! - the model shard ([`shard`]): its chunks' layer ranges and, at the starter,
//!   the embedding and head; what arrives on the wire is checked against it;
//! - the KV store ([`kv_store`]): every sequence's cache for those layers;
//! - the memory governor ([`governor`]): the budget, the layers held against it
//!   (resident or streamed, so the pipeline loop never knows which) and the
//!   adaptation of that split to the room caches leave.
//!
//! Under device emulation the model math is paced ([`pace`]).
//!
//! Every failure is one [`Error`], which says whether a micro-batch was refused,
//! memory ran out or the model's math failed.

mod governor;
mod kv_store;
pub mod pace;
mod shard;

pub use shard::Ends;

use crate::config::MemoryConfig;
use crate::memory::residency::LoadStats;
use crate::memory::{Exhausted, TooSmall};
use governor::MemoryGovernor;
use kv_store::KvStore;
use lime_kernels::{Checkpoint, Config, DecoderLayer, Device, KvCache};
use lime_schemas::telemetry::{MemoryReport, ResidencyReport};
use lime_schemas::{Activations, KvRoom, Plan, Round, SeqSlot};
use pace::ComputePace;
use shard::ModelShard;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why the worker could not load a plan or run a micro-batch.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The micro-batch (or request for one) cannot run here as sent: a chunk this
    /// stage does not hold, a header that disagrees with the model, a sequence
    /// without its cache.
    #[error("{0}")]
    Refused(String),
    /// The memory budget has no room for what was asked (a new sequence's cache).
    #[error(transparent)]
    NoRoom(#[from] Exhausted),
    /// The budget cannot run this stage's part of the plan at all.
    #[error("stage {stage} cannot run in its memory budget: {source}")]
    TooSmall {
        /// The stage's name.
        stage: String,
        /// What the budget lacks.
        source: TooSmall,
    },
    /// Reading the checkpoint or computing failed.
    #[error(transparent)]
    Model(#[from] lime_kernels::Error),
}

/// The worker's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A stage's model shard, KV store and memory governor under its current plan.
pub struct Worker {
    ckpt: Arc<Checkpoint>,
    device: Device,
    config: Config,
    /// Chunks in the whole plan; an activation's `chunk` equal to it means "done".
    chunk_count: usize,
    /// The shard and its memory; `None` after a failed move to a new plan, when
    /// every micro-batch is refused.
    loaded: Option<Loaded>,
    kv: KvStore,
    /// Time spent waiting for streamed layers since the plan was loaded.
    load_wait: Duration,
    /// How much slower than this machine the emulated device computes.
    pace: ComputePace,
}

/// What the worker holds of a plan it loaded.
struct Loaded {
    shard: ModelShard,
    governor: MemoryGovernor,
}

impl Worker {
    /// Splits the memory budget, then loads `stage`'s resident layers of `plan`
    /// (and the ends when it is the starter) and starts streaming the rest,
    /// reporting `(layers loaded, layers to load)`. A budget too small to run the
    /// stage at all is refused before any layer is read.
    pub fn load(
        ckpt: Arc<Checkpoint>,
        device: Device,
        plan: &Plan,
        stage: &str,
        memory: &MemoryConfig,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let loaded = Loaded::new(
            &ckpt,
            &device,
            plan,
            stage,
            memory,
            Kept::default(),
            progress,
        )?;
        Ok(Self {
            config: ckpt.config().clone(),
            ckpt,
            device,
            chunk_count: plan.chunks.len(),
            loaded: Some(loaded),
            kv: KvStore::default(),
            load_wait: Duration::ZERO,
            pace: ComputePace::new(1.0),
        })
    }

    /// Computes as a device `slowdown` times slower than this machine would
    /// (`emulate.compute_slowdown`; 1 is full speed), taking the times of the
    /// device's profile `figures` where they describe the work ([`pace`]).
    pub fn emulate(&mut self, slowdown: f64, figures: Option<lime_schemas::MeasuredCompute>) {
        let pace = ComputePace::new(slowdown);
        self.pace = match figures {
            Some(f) if self.ckpt.shape().matches(&f.model) => pace.with_figures(f),
            _ => pace,
        };
    }

    /// Moves this stage to `plan`: every cache and slot goes, resident layers the
    /// new split keeps stay (only the others are read). On failure the worker
    /// holds nothing and refuses every micro-batch.
    pub fn replan(
        &mut self,
        plan: &Plan,
        stage: &str,
        memory: &MemoryConfig,
        progress: impl FnMut(usize, usize),
    ) -> Result<()> {
        self.kv = KvStore::default();
        self.load_wait = Duration::ZERO;
        self.chunk_count = plan.chunks.len();
        let kept = match self.loaded.take() {
            Some(Loaded { shard, governor }) => Kept {
                layers: governor.into_resident(),
                ends: shard.into_ends(),
            },
            None => Kept::default(),
        };
        let loaded = Loaded::new(
            &self.ckpt,
            &self.device,
            plan,
            stage,
            memory,
            kept,
            progress,
        )?;
        self.loaded = Some(loaded);
        Ok(())
    }

    /// What this stage can hold of KV caches with every layer streamed (through
    /// the slots it has, or one), for the starter's admission control.
    pub fn kv_room(&self, stage: &str) -> KvRoom {
        let (bytes, bytes_per_token) = match &self.loaded {
            Some(l) => (l.governor.kv_room(), l.governor.kv_per_token()),
            None => (None, 0),
        };
        KvRoom {
            stage: stage.to_owned(),
            bytes,
            bytes_per_token,
        }
    }

    /// The model's config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Chunks in the whole plan; an activation's `chunk` equal to it means "done".
    pub fn chunk_count(&self) -> usize {
        self.chunk_count
    }

    /// Whether this stage runs chunk `index`.
    pub fn owns(&self, index: u32) -> bool {
        self.loaded
            .as_ref()
            .is_some_and(|l| l.shard.chunk(index).is_some())
    }

    /// Resident weights, ends and rotary tables.
    pub fn weights_bytes(&self) -> u64 {
        self.loaded
            .as_ref()
            .map_or(0, |l| l.governor.weights_bytes())
    }

    /// Bytes of KV caches held now.
    pub fn kv_bytes(&self) -> u64 {
        self.loaded.as_ref().map_or(0, |l| l.governor.kv_bytes())
    }

    /// Largest micro-batch, in tokens, this stage computes at once.
    pub fn activation_tokens(&self) -> usize {
        self.loaded
            .as_ref()
            .map_or(0, |l| l.shard.activation_tokens())
    }

    /// Time spent waiting for streamed layers since the plan was loaded.
    pub fn load_wait(&self) -> Duration {
        self.load_wait
    }

    /// The layer loader's counters.
    pub fn load_stats(&self) -> LoadStats {
        self.loaded
            .as_ref()
            .map_or_else(LoadStats::default, |l| l.governor.load_stats())
    }

    /// Every byte read from the checkpoint since it was opened.
    pub fn bytes_read(&self) -> u64 {
        self.ckpt.bytes_read()
    }

    /// The budget and what is accounted against it now.
    pub fn memory_report(&self) -> MemoryReport {
        match &self.loaded {
            Some(l) => l.governor.memory_report(self.kv.len()),
            None => MemoryReport {
                sequences: self.kv.len() as u32,
                ..MemoryReport::default()
            },
        }
    }

    /// Whether this stage reads streamed layers ahead and shares them among a
    /// round's micro-batches (off for the baselines).
    pub fn shares_reads(&self) -> bool {
        self.loaded
            .as_ref()
            .is_some_and(|l| l.governor.shares_reads())
    }

    /// Whether this stage streams any of its layers.
    pub fn streams(&self) -> bool {
        self.loaded.as_ref().is_some_and(|l| l.governor.streams())
    }

    /// Which layers are resident and which streamed, and how.
    pub fn residency_report(&self) -> ResidencyReport {
        match &self.loaded {
            Some(l) => l.governor.residency_report(),
            None => ResidencyReport::default(),
        }
    }

    /// Sequences with a cache here.
    pub fn sequences(&self) -> usize {
        self.kv.len()
    }

    /// Embeds the micro-batch's tokens (starter only): the activations for chunk 0.
    pub fn embed(
        &self,
        batch: u64,
        round: Round,
        seqs: Vec<SeqSlot>,
        ids: &[u32],
    ) -> Result<Activations> {
        let shard = self.shard()?;
        self.pace.run(
            pace::Work::Embed(ids.len()),
            || shard.embed(batch, round, seqs, ids),
            || self.finish(),
        )
    }

    /// Next-token logits, a row of the vocabulary each, for the given rows of a
    /// finished micro-batch (starter only).
    pub fn logits(&self, act: &Activations, rows: &[u32]) -> Result<Vec<Vec<f32>>> {
        let shard = self.shard()?;
        self.pace.run(
            pace::Work::Head(rows.len()),
            || shard.logits(act, rows),
            || self.finish(),
        )
    }

    /// Waits for queued device work, so that paced time is the work's own.
    fn finish(&self) {
        let _ = self.device.synchronize();
    }

    /// Whether a micro-batch that just arrived can run here: it passes its checks
    /// and every sequence has its cache (or starts one). Checked before micro-batches
    /// are merged, so that a stale one (sent before this stage restarted) fails
    /// alone instead of taking the others down with it.
    pub fn admissible(&self, act: &Activations) -> Result<()> {
        if !self.owns(act.chunk) {
            return Ok(());
        }
        self.shard()?.check_shape(act)?;
        self.kv.check(&act.seqs)
    }

    /// Runs chunk `act.chunk` over the micro-batch in place and moves it on.
    pub fn run_chunk(&mut self, act: &mut Activations) -> Result<()> {
        let Self {
            loaded,
            kv,
            load_wait,
            pace,
            device,
            ..
        } = self;
        let Loaded { shard, governor } = loaded.as_mut().ok_or_else(not_loaded)?;
        let range = shard.chunk(act.chunk).ok_or_else(|| {
            Error::Refused(format!("this stage does not run chunk {}", act.chunk))
        })?;
        shard.check_shape(act)?;
        let _span = tracing::debug_span!(
            "chunk",
            batch = act.batch(),
            chunk = act.chunk,
            seqs = act.seqs.len(),
            tokens = act.tokens()
        )
        .entered();
        let batch = shard.batch(&act.seqs)?;
        let x = shard.hidden(act)?;
        let started = Instant::now();
        let mut caches = kv.take(&act.seqs, |capacity| governor.new_cache(shard, capacity))?;
        // A sequence that starts again from its first token (replayed after
        // the ring broke) may find its old cache here if the release did not
        // come first: this chunk's layers start afresh. Other chunks of the
        // same pass (interleaving) keep what they computed.
        for (slot, cache) in act.seqs.iter().zip(&mut caches) {
            if slot.pos == 0 {
                cache.clear_layers(range.clone());
            }
        }
        let mut waited = Duration::ZERO;
        let context: usize = act.seqs.iter().map(|s| (s.pos + s.len) as usize).sum();
        let work = pace::Work::layer(act.tokens(), act.seqs.len(), context);
        let round = act.round;
        let result = {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let mut x: Result<lime_kernels::Tensor> = Ok(x);
            for index in range {
                x = x.and_then(|x| {
                    let (y, wait) = governor.with_layer(index, round, |layer| {
                        pace.run(
                            work,
                            || layer.forward(&x, &batch, &mut refs),
                            || {
                                let _ = device.synchronize();
                            },
                        )
                    })?;
                    waited += wait;
                    Ok(y)
                });
            }
            x
        };
        *load_wait += waited;
        kv.put(&act.seqs, caches);
        act.data = shard::to_bytes(&result?)?;
        act.chunk += 1;
        tracing::debug!(
            ms = started.elapsed().as_secs_f64() * 1e3,
            load_wait_ms = waited.as_secs_f64() * 1e3,
            "chunk computed"
        );
        Ok(())
    }

    /// Frees finished sequences' caches, then gives freed memory back to layers.
    pub fn release(&mut self, seqs: &[u64]) {
        let freed: Vec<KvCache> = seqs.iter().filter_map(|id| self.kv.remove(*id)).collect();
        if let Some(l) = &mut self.loaded {
            for cache in freed {
                l.governor.free_cache(cache);
            }
            l.governor.relax();
        }
    }

    fn shard(&self) -> Result<&ModelShard> {
        Ok(&self.loaded.as_ref().ok_or_else(not_loaded)?.shard)
    }
}

fn not_loaded() -> Error {
    Error::Refused("this stage holds no part of the plan: its move to the plan failed".into())
}

/// What a stage keeps when it moves to a new plan: resident layers it may hold
/// again, and the ends (the starter stays the starter).
#[derive(Default)]
struct Kept {
    layers: HashMap<usize, DecoderLayer>,
    ends: Option<Ends>,
}

impl Loaded {
    fn new(
        ckpt: &Arc<Checkpoint>,
        device: &Device,
        plan: &Plan,
        stage: &str,
        memory: &MemoryConfig,
        kept: Kept,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let shard = ModelShard::new(
            ckpt,
            device.clone(),
            plan,
            stage,
            memory.activation_tokens,
            kept.ends,
        )?;
        let offloaded = plan
            .stages
            .iter()
            .find(|s| s.name == stage)
            .and_then(|s| s.offloaded.as_deref());
        let governor = MemoryGovernor::start(
            ckpt.clone(),
            stage,
            &shard,
            offloaded,
            memory,
            kept.layers,
            progress,
        )?;
        Ok(Self { shard, governor })
    }
}
