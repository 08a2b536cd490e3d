//! The model pieces one stage holds (its chunks and, at the starter, the ends of
//! the model), every sequence's KV cache for its layers, and the memory budget all
//! of them are accounted against.
//!
//! Layers come from the [`Residency`] manager, resident or streamed, so the
//! pipeline loop never knows which are which.

use crate::config::MemoryConfig;
use crate::memory::{self, Budget, Costs, Held, Split};
use crate::residency::{LoadStats, Residency};
use anyhow::Context;
use lime_kernels::{
    Checkpoint, Config, DType, Device, Embedding, Head, KvCache, MicroBatch, Rope, SeqSpan, Tensor,
};
use lime_schemas::frame::ActivationDtype;
use lime_schemas::telemetry::{MemoryReport, ResidencyReport};
use lime_schemas::{Activations, Plan};
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
}

impl Worker {
    /// Splits the memory budget, then loads `stage`'s resident layers of `plan`
    /// (and the ends when it is the starter) and starts streaming the rest,
    /// reporting `(layers loaded, layers to load)`. A budget too small to run the
    /// stage at all is refused before any layer is read.
    pub fn load(
        ckpt: Arc<Checkpoint>,
        plan: &Plan,
        stage: &str,
        memory: &MemoryConfig,
        progress: impl FnMut(usize, usize),
    ) -> anyhow::Result<Self> {
        let device = Device::Cpu;
        let config = ckpt.config().clone();
        let chunks: Vec<(usize, Range<usize>)> = plan
            .chunks_of(stage)
            .into_iter()
            .map(|(i, r)| (i, r.range()))
            .collect();
        let layers: Vec<usize> = chunks.iter().flat_map(|(_, r)| r.clone()).collect();
        let ends = if plan.starter().is_some_and(|s| s.name == stage) {
            let embedding = Embedding::load(&ckpt, &device)?;
            let head = Head::load(&ckpt, &device, Some(&embedding))?;
            Some(Ends { embedding, head })
        } else {
            None
        };
        let rope = Rope::new(&config, config.max_context(), &device)?;
        let dtype = ckpt
            .entry("model.embed_tokens.weight")
            .and_then(|e| lime_kernels::checkpoint::compute_dtype(e.dtype, &device))
            .unwrap_or(DType::F32);
        let costs = Costs::of(&ckpt, layers.len(), ends.is_some(), memory)?;
        let ends_bytes = ends
            .as_ref()
            .map_or(0, |e| e.embedding.bytes() + e.head.bytes());
        if (ends_bytes + rope.bytes()) as u64 != costs.fixed_weights {
            tracing::warn!(
                held = ends_bytes + rope.bytes(),
                accounted = costs.fixed_weights,
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
        let residency = Residency::start(
            ckpt.clone(),
            &split.resident,
            &split.offloaded,
            split.slots,
            memory.prefetch,
            progress,
        )?;
        let staging = if split.offloaded.is_empty() {
            0
        } else {
            residency.slots() as u64 * costs.layer + costs.read_buffer
        };
        let budget = Budget::new(
            memory.budget_bytes,
            Held {
                weights: residency.resident_bytes() + costs.fixed_weights,
                staging,
                kv: 0,
                activations: costs.activations,
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
        })
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
        let mut waited = Duration::ZERO;
        let result = {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let mut x = Ok(x);
            for index in range {
                x = x.and_then(|x| {
                    let (layer, wait) = self.residency.layer(index)?;
                    waited += wait;
                    layer.forward(&x, &batch, &mut refs)
                });
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

    /// Frees finished sequences' caches.
    pub fn release(&mut self, seqs: &[u64]) {
        for id in seqs {
            if let Some(cache) = self.caches.remove(id) {
                self.budget.free_kv(cache.bytes() as u64);
            }
        }
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
                        self.restore(seqs, out);
                        return Err(e);
                    }
                },
                other => {
                    // Put back what was taken so a refused batch changes nothing.
                    if let Some(c) = other {
                        self.caches.insert(s.id, c);
                    }
                    self.restore(seqs, out);
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
        let bytes = memory::kv_bytes(
            &self.config,
            self.layers.len(),
            capacity,
            self.dtype.size_in_bytes(),
        );
        self.budget
            .take_kv(bytes)
            .map_err(|e| lime_kernels::Error::Input(e.to_string()))?;
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
    fn restore(&mut self, seqs: &[lime_schemas::SeqSlot], taken: Vec<KvCache>) {
        for (slot, c) in seqs.iter().zip(taken) {
            self.caches.insert(slot.id, c);
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
