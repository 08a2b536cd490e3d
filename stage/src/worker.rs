//! The model pieces one stage holds (its chunks and, at the starter, the ends of
//! the model) and every sequence's KV cache for its layers.
//!
//! Chunks are a list, not one range, so that interleaved plans (`v > 1`) and, later,
//! offloaded layers slot in without touching the pipeline loop.

use lime_kernels::{
    Checkpoint, Config, DType, Device, Embedding, Head, KvCache, LayerStack, MicroBatch, Rope,
    SeqSpan, Tensor,
};
use lime_schemas::frame::ActivationDtype;
use lime_schemas::{Activations, Plan};
use std::collections::HashMap;

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
    chunks: Vec<(usize, LayerStack)>,
    /// Every layer of every chunk held, for allocating caches.
    layers: Vec<usize>,
    chunk_count: usize,
    caches: HashMap<u64, KvCache>,
    ends: Option<Ends>,
    /// What layers compute in (f32 on the CPU); the wire always carries f32, which
    /// holds every narrower float exactly.
    dtype: DType,
}

impl Worker {
    /// Loads `stage`'s chunks of `plan` (and the ends when it is the starter),
    /// reporting `(layers loaded, layers to load)`.
    pub fn load(
        ckpt: &Checkpoint,
        plan: &Plan,
        stage: &str,
        device: &Device,
        mut progress: impl FnMut(usize, usize),
    ) -> lime_kernels::Result<Self> {
        let config = ckpt.config().clone();
        let mine = plan.chunks_of(stage);
        let total: usize = mine.iter().map(|(_, r)| r.len()).sum();
        let mut done = 0;
        let mut chunks = Vec::with_capacity(mine.len());
        let mut layers = Vec::with_capacity(total);
        for (index, range) in mine {
            let stack = LayerStack::load(ckpt, range.range(), device, |_| {
                done += 1;
                progress(done, total);
            })?;
            layers.extend(range.range());
            chunks.push((index, stack));
        }
        let ends = if plan.starter().is_some_and(|s| s.name == stage) {
            let embedding = Embedding::load(ckpt, device)?;
            let head = Head::load(ckpt, device, Some(&embedding))?;
            Some(Ends { embedding, head })
        } else {
            None
        };
        let rope = Rope::new(&config, config.max_context(), device)?;
        let dtype = ckpt
            .entry("model.embed_tokens.weight")
            .and_then(|e| lime_kernels::checkpoint::compute_dtype(e.dtype, device))
            .unwrap_or(DType::F32);
        Ok(Self {
            config,
            device: device.clone(),
            rope,
            chunks,
            layers,
            chunk_count: plan.chunks.len(),
            caches: HashMap::new(),
            ends,
            dtype,
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

    pub fn weights_bytes(&self) -> usize {
        let ends = self
            .ends
            .as_ref()
            .map_or(0, |e| e.embedding.bytes() + e.head.bytes());
        self.chunks.iter().map(|(_, s)| s.bytes()).sum::<usize>() + ends
    }

    pub fn kv_bytes(&self) -> usize {
        self.caches.values().map(KvCache::bytes).sum()
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
        let Some(pos) = self
            .chunks
            .iter()
            .position(|(i, _)| *i == act.chunk as usize)
        else {
            return Err(lime_kernels::Error::Input(format!(
                "this stage does not run chunk {}",
                act.chunk
            )));
        };
        act.check(self.config.hidden_size, self.config.max_context())
            .map_err(|e| lime_kernels::Error::Input(e.to_string()))?;
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
        let started = std::time::Instant::now();
        let mut caches = self.take_caches(&act.seqs)?;
        let result = {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            self.chunks[pos].1.forward(&x, &batch, &mut refs)
        };
        for (slot, cache) in act.seqs.iter().zip(caches) {
            self.caches.insert(slot.id, cache);
        }
        act.data = to_bytes(&result?)?;
        act.chunk += 1;
        tracing::debug!(ms = started.elapsed().as_secs_f64() * 1e3, "chunk computed");
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
            self.caches.remove(id);
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
                None if s.pos == 0 => KvCache::new(
                    &self.config,
                    self.layers.iter().copied(),
                    s.capacity as usize,
                    self.dtype,
                    &self.device,
                )?,
                other => {
                    // Put back what was taken so a refused batch changes nothing.
                    if let Some(c) = other {
                        self.caches.insert(s.id, c);
                    }
                    for (slot, c) in seqs.iter().zip(out) {
                        self.caches.insert(slot.id, c);
                    }
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

fn to_bytes(t: &Tensor) -> lime_kernels::Result<Vec<u8>> {
    let t = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(t.len() * 4);
    for v in t {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}
