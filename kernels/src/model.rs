//! Layer ranges and the whole model assembled from them.
//!
//! `LayerStack` is a chunk: a contiguous range of decoder layers run in one visit.
//! `Model` is the single-process reference: embedding, one stack of every layer, and
//! the head. Distributed runs chain stacks of the same layers and must reproduce its
//! logits bit for bit.

use crate::batch::{MicroBatch, SeqSpan};
use crate::kv_cache::KvCache;
use crate::llama::{DecoderLayer, Embedding, Head};
use crate::rope::Rope;
use crate::{Checkpoint, Config, Error, Result};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;

/// A contiguous range of decoder layers.
#[derive(Debug)]
pub struct LayerStack {
    range: Range<usize>,
    layers: Vec<DecoderLayer>,
}

impl LayerStack {
    /// Loads layers `range` from the checkpoint, reporting each as it arrives.
    pub fn load(
        ckpt: &Checkpoint,
        range: Range<usize>,
        device: &Device,
        mut progress: impl FnMut(usize),
    ) -> Result<Self> {
        let n = ckpt.config().num_hidden_layers;
        if range.is_empty() || range.end > n {
            return Err(Error::Input(format!(
                "layer range {range:?} is not within 0..{n}"
            )));
        }
        let mut layers = Vec::with_capacity(range.len());
        for i in range.clone() {
            layers.push(DecoderLayer::load(ckpt, i, device)?);
            progress(i);
        }
        Ok(Self { range, layers })
    }

    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(DecoderLayer::bytes).sum()
    }

    /// Runs every layer of the range over the micro-batch.
    pub fn forward(
        &self,
        x: &Tensor,
        batch: &MicroBatch,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, batch, caches)?;
        }
        Ok(x)
    }
}

/// Every piece of the model in one process: the reference for exactness.
#[derive(Debug)]
pub struct Model {
    config: Config,
    device: Device,
    rope: Rope,
    embedding: Embedding,
    layers: LayerStack,
    head: Head,
}

impl Model {
    /// Loads the whole checkpoint; `progress(done, total)` counts loaded layers.
    pub fn load(
        ckpt: &Checkpoint,
        device: &Device,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let config = ckpt.config().clone();
        let n = config.num_hidden_layers;
        let embedding = Embedding::load(ckpt, device)?;
        let layers = LayerStack::load(ckpt, 0..n, device, |i| progress(i + 1, n))?;
        let head = Head::load(ckpt, device, Some(&embedding))?;
        let rope = Rope::new(&config, config.max_context(), device)?;
        Ok(Self {
            config,
            device: device.clone(),
            rope,
            embedding,
            layers,
            head,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    pub fn embedding(&self) -> &Embedding {
        &self.embedding
    }

    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Bytes of weights in memory.
    pub fn bytes(&self) -> usize {
        self.embedding.bytes() + self.layers.bytes() + self.head.bytes()
    }

    /// Bytes of weights one decode step reads: every layer, the head, one embedding row.
    pub fn bytes_read_per_token(&self) -> usize {
        self.layers.bytes()
            + self.head.bytes_read()
            + self.config.hidden_size * self.activation_dtype().size_in_bytes()
    }

    /// The dtype activations and caches use: the weights' compute dtype (f32 on
    /// the CPU, the checkpoint's dtype on a GPU).
    pub fn activation_dtype(&self) -> DType {
        self.embedding.dtype()
    }

    /// A cache for one sequence of up to `capacity` tokens over every layer.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        KvCache::new(
            &self.config,
            0..self.config.num_hidden_layers,
            capacity,
            self.activation_dtype(),
            &self.device,
        )
    }

    /// Runs a micro-batch: `tokens[i]` continue sequence `i` at `positions[i]`.
    /// Returns each sequence's next-token logits, `[sequences, vocab]` in f32.
    pub fn forward(
        &self,
        tokens: &[&[u32]],
        positions: &[usize],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        if tokens.len() != positions.len() {
            return Err(Error::Input("one position per sequence is needed".into()));
        }
        let spans: Vec<SeqSpan> = tokens
            .iter()
            .zip(positions)
            .map(|(t, &pos)| SeqSpan { pos, len: t.len() })
            .collect();
        let batch = MicroBatch::new(&self.config, &self.rope, &spans, &self.device)?;
        let ids: Vec<u32> = tokens.concat();
        let hidden = self.embedding.forward(&ids)?;
        let hidden = self.layers.forward(&hidden, &batch, caches)?;
        self.head.forward(&hidden, &batch.last_rows())
    }
}
