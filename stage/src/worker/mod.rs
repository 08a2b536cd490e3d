//! The model pieces one stage holds (its chunks and, at the starter, the ends of
//! the model), every sequence's KV cache for its layers, and the memory budget all
//! of them are accounted against.
//!
//! Layers come from the [`Residency`] manager, resident or streamed, so the
//! pipeline loop never knows which are which.

use crate::adaptation;
use crate::config::MemoryConfig;
use crate::memory::{self, Budget, Exhausted, Held, Split, StageCosts};
use crate::residency::{LayerRef, LoadStats, Residency, Slot};
use anyhow::Context;
use lime_kernels::{
    Checkpoint, Config, DType, DecoderLayer, Device, Embedding, Head, KvCache, MicroBatch, Rope,
    SeqSpan, Tensor,
};
use lime_schemas::frame::ActivationDtype;
use lime_schemas::telemetry::{MemoryReport, ResidencyReport};
use lime_schemas::{Activations, KvRoom, Plan};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Embedding and head: what only the starter holds.
pub struct Ends {
    pub embedding: Embedding,
    pub head: Head,
}

pub struct Worker {
    config: Config,
    device: Device,
    rope: Rope,
    /// `(plan chunk index, layers)`, in ring order.
    chunks: Vec<(usize, Range<usize>)>,
    /// Every layer of every chunk held, for allocating caches.
    layers: Vec<usize>,
    chunk_count: usize,
    caches: HashMap<u64, KvCache>,
    ends: Option<Ends>,
    /// What layers compute in (f32 on the CPU); the wire always carries f32, which
    /// holds every narrower float exactly.
    dtype: DType,
    residency: Residency,
    budget: Budget,
    /// Largest micro-batch, in tokens, the activation workspace was reserved for.
    activation_tokens: usize,
    /// Time spent waiting for streamed layers since start.
    load_wait: Duration,
    ckpt: Arc<Checkpoint>,
    read_limit: Option<u64>,
    costs: StageCosts,
    /// The streamed layer to keep resident the next time a slot brings it.
    restoring: Option<usize>,
    evictions: u64,
    restorations: u64,
}

/// What a stage keeps when it moves to a new plan: resident layers it may hold
/// again, and the ends (the starter stays the starter).
struct Kept {
    layers: HashMap<usize, DecoderLayer>,
    ends: Option<Ends>,
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
    ) -> anyhow::Result<Self> {
        let kept = Kept {
            layers: HashMap::new(),
            ends: None,
        };
        Self::load_keeping(ckpt, device, plan, stage, memory, kept, progress)
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
    ) -> anyhow::Result<()> {
        let ckpt = self.ckpt.clone();
        self.caches.clear();
        let residency = std::mem::replace(&mut self.residency, Residency::none(ckpt.clone()));
        let kept = Kept {
            layers: residency.into_resident(),
            ends: self.ends.take(),
        };
        let device = self.device.clone();
        *self = Self::load_keeping(ckpt, device, plan, stage, memory, kept, progress)?;
        Ok(())
    }

    /// [`Worker::load`] for a stage moving to a new plan, reusing what it held.
    fn load_keeping(
        ckpt: Arc<Checkpoint>,
        device: Device,
        plan: &Plan,
        stage: &str,
        memory: &MemoryConfig,
        kept: Kept,
        progress: impl FnMut(usize, usize),
    ) -> anyhow::Result<Self> {
        let Kept {
            layers: kept_layers,
            ends: kept_ends,
        } = kept;
        let config = ckpt.config().clone();
        let chunks: Vec<(usize, Range<usize>)> = plan
            .chunks_of(stage)
            .into_iter()
            .map(|(i, r)| (i, r.range()))
            .collect();
        let layers: Vec<usize> = chunks.iter().flat_map(|(_, r)| r.clone()).collect();
        let ends = match (plan.starter().is_some_and(|s| s.name == stage), kept_ends) {
            (true, Some(ends)) => Some(ends),
            (true, None) => {
                let embedding = Embedding::load(&ckpt, &device)?;
                let head = Head::load(&ckpt, &device, Some(&embedding))?;
                Some(Ends { embedding, head })
            }
            (false, _) => None,
        };
        let rope = Rope::new(&config, config.max_context(), &device)?;
        let dtype = ckpt
            .entry("model.embed_tokens.weight")
            .and_then(|e| lime_kernels::checkpoint::compute_dtype(e.dtype, &device))
            .unwrap_or(DType::F32);
        let placement = lime_kernels::Placement::of(&device)?;
        let costs = memory::stage_costs(&ckpt, layers.len(), ends.is_some(), memory, placement);
        let ends_bytes = ends
            .as_ref()
            .map_or(0, |e| e.embedding.bytes() + e.head.bytes());
        if (ends_bytes + rope.bytes()) as u64 != costs.fixed_weights() {
            tracing::warn!(
                held = ends_bytes + rope.bytes(),
                accounted = costs.fixed_weights(),
                "embedding, head and rotary tables differ from their accounted size"
            );
        }
        let offloaded = plan
            .stages
            .iter()
            .find(|s| s.name == stage)
            .and_then(|s| s.offloaded.as_deref());
        let max_slots = if memory.budget_bytes.is_some() || offloaded.is_some() {
            memory.max_slots
        } else {
            0
        };
        let split = Split::choose(memory.budget_bytes, &layers, offloaded, max_slots, &costs)
            .with_context(|| format!("stage {stage} cannot run in its memory budget"))?;
        tracing::info!(
            budget_mb = memory.budget_bytes.map(|b| b >> 20),
            resident = ?split.resident,
            offloaded = ?split.offloaded,
            slots = split.slots,
            prefetch = memory.prefetch,
            "memory split"
        );
        let residency = Residency::start_with(
            ckpt.clone(),
            &device,
            kept_layers,
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
            memory.budget_bytes,
            Held {
                weights: residency.resident_bytes() + costs.fixed_weights(),
                staging,
                kv: 0,
                activations: costs.activations(),
            },
        );
        Ok(Self {
            config,
            device,
            rope,
            chunks,
            layers,
            chunk_count: plan.chunks.len(),
            caches: HashMap::new(),
            ends,
            dtype,
            residency,
            budget,
            activation_tokens: memory.activation_tokens,
            load_wait: Duration::ZERO,
            ckpt,
            read_limit: memory.read_bytes_per_s(),
            costs,
            restoring: None,
            evictions: 0,
            restorations: 0,
        })
    }

    /// What this stage can hold of KV caches with every layer streamed (through
    /// the slots it has, or one), for the starter's admission control.
    pub fn kv_room(&self, stage: &str) -> KvRoom {
        let bytes_per_token = self.costs.kv_per_token();
        KvRoom {
            stage: stage.to_owned(),
            bytes: self.kv_room_bytes(),
            bytes_per_token,
        }
    }

    /// Bytes left for KV caches with every layer streamed; `None` without a budget.
    fn kv_room_bytes(&self) -> Option<u64> {
        let streaming = if self.layers.is_empty() {
            0
        } else {
            self.costs
                .footprint
                .streaming(self.residency.slots().max(1))
        };
        let floor = self.costs.fixed_weights() + self.costs.activations() + streaming;
        self.budget.limit().map(|l| l.saturating_sub(floor))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Chunks in the whole plan; an activation's `chunk` equal to it means "done".
    pub fn chunk_count(&self) -> usize {
        self.chunk_count
    }

    /// Whether this stage runs chunk `index`.
    pub fn owns(&self, index: u32) -> bool {
        self.chunks.iter().any(|(i, _)| *i == index as usize)
    }

    /// Resident weights, ends and rotary tables.
    pub fn weights_bytes(&self) -> u64 {
        self.budget.held().weights
    }

    pub fn kv_bytes(&self) -> u64 {
        self.budget.held().kv
    }

    /// Largest micro-batch, in tokens, this stage computes at once.
    pub fn activation_tokens(&self) -> usize {
        self.activation_tokens
    }

    /// Time spent waiting for streamed layers since start.
    pub fn load_wait(&self) -> Duration {
        self.load_wait
    }

    pub fn load_stats(&self) -> LoadStats {
        self.residency.stats()
    }

    /// Every byte read from the checkpoint since it was opened.
    pub fn bytes_read(&self) -> u64 {
        self.ckpt.bytes_read()
    }

    /// The budget and what is accounted against it now.
    pub fn memory_report(&self) -> MemoryReport {
        let held = self.budget.held();
        let (rss, peak_rss) = memory::rss().unzip();
        MemoryReport {
            budget_bytes: self.budget.limit(),
            weights_bytes: held.weights,
            staging_bytes: held.staging,
            kv_bytes: held.kv,
            activation_bytes: held.activations,
            accounted_bytes: held.total(),
            peak_accounted_bytes: self.budget.peak(),
            rss_bytes: rss,
            peak_rss_bytes: peak_rss,
            sequences: self.caches.len() as u32,
        }
    }

    pub fn residency_report(&self) -> ResidencyReport {
        ResidencyReport {
            resident: self.residency.resident(),
            offloaded: self.residency.offloaded().to_vec(),
            slots: self.residency.slots(),
            prefetch: self.residency.prefetch(),
            direct_io: self.ckpt.direct_io(),
            read_limit_bytes_per_s: self.read_limit,
            evictions: self.evictions,
            restorations: self.restorations,
        }
    }

    pub fn sequences(&self) -> usize {
        self.caches.len()
    }

    /// Embeds the micro-batch's tokens (starter only): the activations for chunk 0.
    pub fn embed(
        &self,
        batch: u64,
        seqs: Vec<lime_schemas::SeqSlot>,
        ids: &[u32],
    ) -> lime_kernels::Result<Activations> {
        let ends = self.ends()?;
        let hidden = ends.embedding.forward(ids)?;
        Ok(Activations {
            batches: vec![batch],
            chunk: 0,
            seqs,
            dtype: ActivationDtype::F32,
            data: to_bytes(&hidden)?,
        })
    }

    /// Runs chunk `act.chunk` over the micro-batch in place and moves it on.
    pub fn run_chunk(&mut self, act: &mut Activations) -> lime_kernels::Result<()> {
        let Some(range) = self
            .chunks
            .iter()
            .find(|(i, _)| *i == act.chunk as usize)
            .map(|(_, r)| r.clone())
        else {
            return Err(lime_kernels::Error::Input(format!(
                "this stage does not run chunk {}",
                act.chunk
            )));
        };
        self.check_shape(act).map_err(lime_kernels::Error::Input)?;
        let _span = tracing::debug_span!(
            "chunk",
            batch = act.batch(),
            chunk = act.chunk,
            seqs = act.seqs.len(),
            tokens = act.tokens()
        )
        .entered();
        let spans: Vec<SeqSpan> = act
            .seqs
            .iter()
            .map(|s| SeqSpan {
                pos: s.pos as usize,
                len: s.len as usize,
            })
            .collect();
        let batch = MicroBatch::new(&self.config, &self.rope, &spans, &self.device)?;
        let x = self.hidden(act)?;
        let started = Instant::now();
        let mut caches = self.take_caches(&act.seqs)?;
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
        let result = {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let mut x = Ok(x);
            for index in range {
                x = x.and_then(|x| self.run_layer(index, &x, &batch, &mut refs, &mut waited));
            }
            x
        };
        self.load_wait += waited;
        for (slot, cache) in act.seqs.iter().zip(caches) {
            self.caches.insert(slot.id, cache);
        }
        act.data = to_bytes(&result?)?;
        act.chunk += 1;
        tracing::debug!(
            ms = started.elapsed().as_secs_f64() * 1e3,
            load_wait_ms = waited.as_secs_f64() * 1e3,
            "chunk computed"
        );
        Ok(())
    }

    /// Whether a micro-batch that just arrived can run here: it passes its checks
    /// and every sequence has its cache (or starts one). Checked before micro-batches
    /// are merged, so that a stale one (sent before this stage restarted) fails
    /// alone instead of taking the others down with it.
    pub fn admissible(&self, act: &Activations) -> Result<(), String> {
        if !self.owns(act.chunk) {
            return Ok(());
        }
        self.check_shape(act)?;
        for s in &act.seqs {
            let fits = match self.caches.get(&s.id) {
                Some(c) => c.capacity() >= (s.pos + s.len) as usize,
                None => s.pos == 0,
            };
            if !fits {
                return Err(format!(
                    "sequence {} at position {} has no cache here (or it is too small)",
                    s.id, s.pos
                ));
            }
        }
        Ok(())
    }

    /// The header agrees with the data and the model, and the micro-batch fits the
    /// activation workspace.
    fn check_shape(&self, act: &Activations) -> Result<(), String> {
        act.check(self.config.hidden_size, self.config.max_context())
            .map_err(|e| e.to_string())?;
        if act.tokens() > self.activation_tokens {
            return Err(format!(
                "a micro-batch of {} tokens exceeds this stage's activation workspace of {} (memory.activation_tokens)",
                act.tokens(),
                self.activation_tokens
            ));
        }
        Ok(())
    }

    /// Next-token logits `[rows, vocab]` for the given rows of a finished
    /// micro-batch (starter only).
    pub fn logits(&self, act: &Activations, rows: &[u32]) -> lime_kernels::Result<Tensor> {
        let ends = self.ends()?;
        let x = self.hidden(act)?;
        ends.head.forward(&x, rows)
    }

    /// One layer over the micro-batch; a streamed layer marked for restoring
    /// stays resident afterwards.
    fn run_layer(
        &mut self,
        index: usize,
        x: &Tensor,
        batch: &MicroBatch,
        caches: &mut [&mut KvCache],
        waited: &mut Duration,
    ) -> lime_kernels::Result<Tensor> {
        let (layer, wait) = self.residency.layer(index)?;
        *waited += wait;
        let y = layer.forward(x, batch, caches)?;
        let slot = match layer {
            LayerRef::Streamed(slot) => slot,
            LayerRef::Resident(_) => return Ok(y),
        };
        if self.restoring == Some(index) {
            self.restoring = None;
            self.keep_streamed(slot)?;
        }
        Ok(y)
    }

    /// Frees finished sequences' caches, then gives freed memory back to layers.
    pub fn release(&mut self, seqs: &[u64]) {
        for id in seqs {
            if let Some(cache) = self.caches.remove(id) {
                self.budget.free_kv(cache.bytes() as u64);
            }
        }
        self.relax();
    }

    fn hidden(&self, act: &Activations) -> lime_kernels::Result<Tensor> {
        if act.dtype != ActivationDtype::F32 {
            return Err(lime_kernels::Error::Input(format!(
                "activations arrive as f32, not {:?}",
                act.dtype
            )));
        }
        let values: Vec<f32> = act
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let x = Tensor::from_vec(
            values,
            (act.tokens(), self.config.hidden_size),
            &self.device,
        )?;
        Ok(x.to_dtype(self.dtype)?)
    }

    fn ends(&self) -> lime_kernels::Result<&Ends> {
        self.ends.as_ref().ok_or_else(|| {
            lime_kernels::Error::Input("only the starter holds the embedding and head".into())
        })
    }

    /// Each sequence's cache, created on its first token.
    fn take_caches(
        &mut self,
        seqs: &[lime_schemas::SeqSlot],
    ) -> lime_kernels::Result<Vec<KvCache>> {
        let mut out = Vec::with_capacity(seqs.len());
        for s in seqs {
            let cache = match self.caches.remove(&s.id) {
                Some(c) if c.capacity() >= (s.pos + s.len) as usize => c,
                None if s.pos == 0 => match self.new_cache(s.capacity as usize) {
                    Ok(c) => c,
                    Err(e) => {
                        self.put_back(seqs, out);
                        return Err(e);
                    }
                },
                other => {
                    // Put back what was taken so a refused batch changes nothing.
                    if let Some(c) = other {
                        self.caches.insert(s.id, c);
                    }
                    self.put_back(seqs, out);
                    return Err(lime_kernels::Error::Input(format!(
                        "sequence {} at position {} has no cache here (or it is too small)",
                        s.id, s.pos
                    )));
                }
            };
            out.push(cache);
        }
        Ok(out)
    }
}

impl Worker {
    /// A cache for a new sequence, if the budget has room for it.
    fn new_cache(&mut self, capacity: usize) -> lime_kernels::Result<KvCache> {
        let bytes = self.costs.footprint.kv(capacity as u64, self.layers.len());
        if self.budget.take_kv(bytes).is_err() {
            self.make_room(bytes)
                .map_err(|e| lime_kernels::Error::Input(e.to_string()))?;
            self.budget
                .take_kv(bytes)
                .map_err(|e| lime_kernels::Error::Input(e.to_string()))?;
        }
        let cache = KvCache::new(
            &self.config,
            self.layers.iter().copied(),
            capacity,
            self.dtype,
            &self.device,
        );
        match cache {
            Ok(c) if c.bytes() as u64 == bytes => Ok(c),
            Ok(c) => {
                self.budget.free_kv(bytes);
                Err(lime_kernels::Error::Input(format!(
                    "a cache of {} bytes was accounted as {bytes}",
                    c.bytes()
                )))
            }
            Err(e) => {
                self.budget.free_kv(bytes);
                Err(e)
            }
        }
    }

    /// Puts back the caches taken for a micro-batch that is refused, so that the
    /// failure path frees them (and their budget) like any other.
    fn put_back(&mut self, seqs: &[lime_schemas::SeqSlot], taken: Vec<KvCache>) {
        for (slot, c) in seqs.iter().zip(taken) {
            self.caches.insert(slot.id, c);
        }
    }
}

/// Local adaptation: the split between resident and streamed layers follows the
/// room KV caches leave ([`adaptation`] picks the layers).
impl Worker {
    /// Streams as many more layers as `bytes` of new KV caches need, choosing
    /// those whose reads are best hidden. Fails, changing nothing, when even
    /// streaming every layer would not make the room (the starter's admission
    /// control keeps that from happening).
    fn make_room(&mut self, bytes: u64) -> Result<(), String> {
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
            let floor = self.kv_room_bytes().unwrap_or(u64::MAX);
            return Err(Exhausted {
                what: "sequence's KV cache, even with every layer streamed,",
                wanted: bytes,
                free: floor.saturating_sub(held.kv),
                limit,
            }
            .to_string());
        }
        let depth = self.config.num_hidden_layers;
        let mut streamed = self.residency.offloaded().to_vec();
        for _ in 0..count {
            let Some(victim) = adaptation::to_evict(&resident, &streamed, depth) else {
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
        self.residency.stream().map_err(|e| e.to_string())?;
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
    fn relax(&mut self) {
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
            self.restoring = adaptation::to_restore(streamed, self.config.num_hidden_layers);
        }
    }

    /// Keeps the layer `slot` holds resident, if the room is still there.
    fn keep_streamed(&mut self, slot: Slot) -> lime_kernels::Result<()> {
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

fn to_bytes(t: &Tensor) -> lime_kernels::Result<Vec<u8>> {
    let t = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(t.len() * 4);
    for v in t {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}
