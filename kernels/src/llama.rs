//! The Llama family's decoder (and Mistral's and Qwen2's, which differ only in
//! config), in pieces that load and run independently: the embedding, any single
//! decoder layer, and the head. Which tensors each piece holds, and their names
//! and shapes, is [`crate::layout`]'s; this file is what they compute.

use crate::batch::MicroBatch;
use crate::causal_attention::CausalAttention;
use crate::kv_append::KvAppend;
use crate::kv_cache::KvCache;
use crate::layout::{AttentionWeights, EndWeights, LayerWeights, MlpWeights, Projection};
use crate::rms_norm::RmsNormOp;
use crate::{rope, Checkpoint, Config, Error, Result, StagingBuffer};
use candle_core::{DType, Device, Tensor, D};

/// A dense projection `y = x Wᵀ (+ b)` with `W` stored `[out, in]` as in PyTorch.
fn linear(p: &Projection<Tensor>, x: &Tensor) -> Result<Tensor> {
    let y = project(x, &p.weight)?;
    Ok(match &p.bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// Root-mean-square normalisation, computed in f32 whatever the weights' dtype.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let op = RmsNormOp { eps: eps as f32 };
    Ok(x.contiguous()?.apply_op2_no_bwd(weight, &op)?)
}

/// What a layer's forward pass needs of the config besides its weights.
#[derive(Debug, Clone, Copy)]
struct Heads {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
}

impl Heads {
    fn of(cfg: &Config) -> Self {
        Self {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            eps: cfg.rms_norm_eps,
        }
    }

    /// Grouped-query self-attention over each sequence's preallocated cache.
    fn attention(
        &self,
        w: &AttentionWeights<Tensor>,
        x: &Tensor,
        layer: usize,
        batch: &MicroBatch,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let tokens = batch.tokens();
        let q = linear(&w.q_proj, x)?.reshape((tokens, self.heads, self.head_dim))?;
        let k = linear(&w.k_proj, x)?.reshape((tokens, self.kv_heads, self.head_dim))?;
        let v = linear(&w.v_proj, x)?.reshape((tokens, self.kv_heads, self.head_dim))?;
        let q = rope::apply(&q, &batch.cos, &batch.sin)?;
        let k = rope::apply(&k, &batch.cos, &batch.sin)?.contiguous()?;
        let v = v.contiguous()?;
        let group = self.heads / self.kv_heads;
        let scale = 1.0 / (self.head_dim as f64).sqrt();

        let mut outputs = Vec::with_capacity(caches.len());
        let mut row = 0;
        for ((span, mask), cache) in batch
            .spans()
            .iter()
            .zip(&batch.masks)
            .zip(caches.iter_mut())
        {
            let n = span.len;
            let kv = cache.layer_mut(layer)?;
            if kv.len != span.pos {
                return Err(Error::Input(format!(
                    "layer {layer}: sequence cache holds {} tokens but the batch continues at position {}",
                    kv.len, span.pos
                )));
            }
            let keys = span.pos + n;
            if keys > kv.k.dim(1)? {
                return Err(Error::Input(format!(
                    "sequence of {keys} tokens exceeds its KV capacity of {}",
                    kv.k.dim(1)?
                )));
            }
            let append = KvAppend { pos: span.pos };
            kv.k.inplace_op2(&k.narrow(0, row, n)?, &append)?;
            kv.v.inplace_op2(&v.narrow(0, row, n)?, &append)?;
            kv.len = keys;
            let q_seq = q.narrow(0, row, n)?;
            let out = if q_seq.device().is_cpu() && q_seq.dtype() == DType::F32 {
                let op = CausalAttention {
                    pos: span.pos,
                    group,
                    scale: scale as f32,
                };
                q_seq.contiguous()?.apply_op3_no_bwd(&kv.k, &kv.v, &op)?
            } else {
                attend_with_matmul(
                    &q_seq,
                    &kv.k.narrow(1, 0, keys)?,
                    &kv.v.narrow(1, 0, keys)?,
                    mask.as_ref(),
                    scale,
                )?
            };
            outputs.push(out);
            row += n;
        }
        linear(&w.o_proj, &Tensor::cat(&outputs, 0)?)
    }
}

/// Attention through general matrix products, for devices without the exact CPU
/// kernel: `q [n, heads, d]` over `k`, `v [kv_heads, keys, d]`, with the batch's
/// causal mask when `n > 1`.
fn attend_with_matmul(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (n, heads, d) = q.dims3()?;
    let kv_heads = k.dim(0)?;
    let group = heads / kv_heads;
    // [n, heads, d] -> [kv_heads, group * n, d]: each KV head serves its group of
    // query heads in one product, without copying the cache per head.
    let q = q
        .reshape((n, kv_heads, group, d))?
        .permute((1, 2, 0, 3))?
        .contiguous()?
        .reshape((kv_heads, group * n, d))?;
    let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    Ok(probs
        .matmul(v)?
        .reshape((kv_heads, group, n, d))?
        .permute((2, 0, 1, 3))?
        .reshape((n, heads * d))?)
}

fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// The SwiGLU feed-forward block.
fn mlp(w: &MlpWeights<Tensor>, x: &Tensor) -> Result<Tensor> {
    let gated = (linear(&w.gate_proj, x)?.silu()? * linear(&w.up_proj, x)?)?;
    linear(&w.down_proj, &gated)
}

/// Where a layer's tensors live: memory of their own, or on an integrated GPU a
/// mapped slot that holds them together with the memory under them.
#[derive(Debug)]
enum Weights {
    Owned(LayerWeights<Tensor>),
    #[cfg(feature = "cuda")]
    Mapped(crate::cuda::mapped::MappedSlot),
}

impl Weights {
    fn tensors(&self) -> &LayerWeights<Tensor> {
        match self {
            Self::Owned(w) => w,
            #[cfg(feature = "cuda")]
            Self::Mapped(slot) => slot.weights(),
        }
    }
}

/// One decoder layer, `model.layers.{index}`: loaded, run and dropped on its own so
/// that a stage can hold any subset of the model and stream the rest. Its tensors
/// are those [`LayerWeights::of`] describes and never leave it.
#[derive(Debug)]
pub struct DecoderLayer {
    index: usize,
    weights: Weights,
    heads: Heads,
}

impl DecoderLayer {
    /// Reads layer `index`'s weights from the checkpoint (and nothing else).
    pub fn load(ckpt: &Checkpoint, index: usize, device: &Device) -> Result<Self> {
        let cfg = ckpt.config();
        check_index(cfg, index)?;
        let _span = tracing::debug_span!("load_layer", layer = index).entered();
        let weights =
            LayerWeights::of(cfg, index).try_map(|w| ckpt.tensor(&w.name, &w.shape, device))?;
        Ok(Self {
            index,
            weights: Weights::Owned(weights),
            heads: Heads::of(cfg),
        })
    }

    /// A layer's worth of zeroed weights in `dtype` on `device`, not yet any layer:
    /// a slot that [`DecoderLayer::reload`] fills with one offloaded layer after
    /// another. `dtype` is what the checkpoint computes in there
    /// ([`Checkpoint::layer_dtype`]). On an integrated GPU the slot lives in host
    /// memory mapped into the GPU, so refills need no device copy.
    pub fn empty(cfg: &Config, dtype: DType, device: &Device) -> Result<Self> {
        if device.is_cpu() && dtype != DType::F32 {
            return Err(Error::Input(format!(
                "a CPU layer slot computes in F32, not {dtype:?}"
            )));
        }
        let layout = LayerWeights::of(cfg, 0);
        #[cfg(feature = "cuda")]
        if !device.is_cpu()
            && crate::GpuTraits::query(device)?.load_path() == crate::LoadPath::Mapped
        {
            let slot = crate::cuda::mapped::MappedSlot::new(&layout, dtype, device)?;
            return Ok(Self {
                index: usize::MAX,
                weights: Weights::Mapped(slot),
                heads: Heads::of(cfg),
            });
        }
        let weights = layout.try_map(|w| Tensor::zeros(w.shape.as_slice(), dtype, device))?;
        Ok(Self {
            index: usize::MAX,
            weights: Weights::Owned(weights),
            heads: Heads::of(cfg),
        })
    }

    /// Reads layer `index` into this layer's memory, allocating nothing (beyond
    /// `staging`, for direct reads and narrow stored dtypes; on a GPU, staging made
    /// for it). On a discrete GPU the copies are queued, not finished, when this
    /// returns: kernels that use the layer wait for them. In a mapped slot the
    /// bytes go straight from storage into the slot. On error the slot holds no
    /// valid layer until the next successful reload.
    pub fn reload(
        &mut self,
        ckpt: &Checkpoint,
        index: usize,
        staging: &mut StagingBuffer,
    ) -> Result<()> {
        check_index(ckpt.config(), index)?;
        let _span = tracing::debug_span!("reload_layer", layer = index).entered();
        self.index = usize::MAX;
        let layout = LayerWeights::of(ckpt.config(), index);
        match &self.weights {
            Weights::Owned(tensors) => {
                for (w, t) in layout.zip(tensors) {
                    ckpt.fill(&w.name, t, staging)?;
                }
            }
            #[cfg(feature = "cuda")]
            Weights::Mapped(slot) => slot.refill(ckpt, &layout, staging)?,
        }
        self.index = index;
        Ok(())
    }

    /// Where the layer's weights live.
    pub fn device(&self) -> &Device {
        self.weights.tensors().input_layernorm.device()
    }

    /// What the layer computes in (its weights' dtype).
    pub fn dtype(&self) -> DType {
        self.weights.tensors().self_attn.q_proj.weight.dtype()
    }

    /// The model layer held, or `None` for a slot not (successfully) filled yet.
    pub fn index(&self) -> Option<usize> {
        (self.index != usize::MAX).then_some(self.index)
    }

    /// Bytes of weights this layer holds in memory.
    pub fn bytes(&self) -> usize {
        self.weights.tensors().iter().map(tensor_bytes).sum()
    }

    /// Runs the layer over a micro-batch, appending each sequence's keys and values
    /// to its cache. `caches` are in the batch's sequence order.
    pub fn forward(
        &self,
        x: &Tensor,
        batch: &MicroBatch,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        if caches.len() != batch.spans().len() {
            return Err(Error::Input(format!(
                "{} caches for a batch of {} sequences",
                caches.len(),
                batch.spans().len()
            )));
        }
        if self.index().is_none() {
            return Err(Error::Input("this layer slot holds no layer".into()));
        }
        let _span =
            tracing::trace_span!("layer", layer = self.index, tokens = batch.tokens()).entered();
        let (w, eps) = (self.weights.tensors(), self.heads.eps);
        let normed = rms_norm(x, &w.input_layernorm, eps)?;
        let attn = self
            .heads
            .attention(&w.self_attn, &normed, self.index, batch, caches)?;
        let x = (x + attn)?;
        let mlp = mlp(&w.mlp, &rms_norm(&x, &w.post_attention_layernorm, eps)?)?;
        Ok((x + mlp)?)
    }
}

fn check_index(cfg: &Config, index: usize) -> Result<()> {
    if index >= cfg.num_hidden_layers {
        return Err(Error::Input(format!(
            "layer {index} does not exist in a {}-layer model",
            cfg.num_hidden_layers
        )));
    }
    Ok(())
}

/// The token embedding, `model.embed_tokens`.
#[derive(Debug)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// Reads the embedding table from the checkpoint.
    pub fn load(ckpt: &Checkpoint, device: &Device) -> Result<Self> {
        let w = EndWeights::of(ckpt.config()).embed_tokens;
        Ok(Self {
            weight: ckpt.tensor(&w.name, &w.shape, device)?,
        })
    }

    /// `[tokens, hidden]` rows for `ids`; an id outside the vocabulary is an error.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.weight.dim(0)?;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let ids = Tensor::from_slice(ids, ids.len(), self.weight.device())?;
        Ok(self.weight.index_select(&ids, 0)?)
    }

    /// Bytes of the table in memory.
    pub fn bytes(&self) -> usize {
        tensor_bytes(&self.weight)
    }

    /// The dtype of the hidden states it produces, which every later layer keeps.
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }
}

/// The final norm and LM head (`model.norm`, `lm_head`, or the embedding when tied).
#[derive(Debug)]
pub struct Head {
    norm: Tensor,
    eps: f64,
    lm_head: Tensor,
    shares_embedding: bool,
}

impl Head {
    /// Loads the head. With tied embeddings and the starter's `embedding` at hand,
    /// the LM head shares its tensor instead of holding a second copy.
    pub fn load(ckpt: &Checkpoint, device: &Device, embedding: Option<&Embedding>) -> Result<Self> {
        let ends = EndWeights::of(ckpt.config());
        let tied = ckpt.head_is_tied();
        let lm_head = match (tied, embedding) {
            (true, Some(e)) => e.weight.clone(),
            (true, None) => {
                ckpt.tensor(&ends.embed_tokens.name, &ends.embed_tokens.shape, device)?
            }
            (false, _) => ckpt.tensor(&ends.lm_head.name, &ends.lm_head.shape, device)?,
        };
        Ok(Self {
            norm: ckpt.tensor(&ends.norm.name, &ends.norm.shape, device)?,
            eps: ckpt.config().rms_norm_eps,
            lm_head,
            shares_embedding: tied && embedding.is_some(),
        })
    }

    /// Logits `[rows, vocab]` in f32 for the given rows of `hidden`.
    pub fn forward(&self, hidden: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let rows = Tensor::from_slice(rows, rows.len(), hidden.device())?;
        let x = rms_norm(&hidden.index_select(&rows, 0)?, &self.norm, self.eps)?;
        Ok(project(&x, &self.lm_head)?.to_dtype(DType::F32)?)
    }

    /// Bytes of weights one forward pass reads (the LM head even when it is shared).
    pub fn bytes_read(&self) -> usize {
        tensor_bytes(&self.norm) + tensor_bytes(&self.lm_head)
    }

    /// Bytes of weights this head alone holds in memory.
    pub fn bytes(&self) -> usize {
        if self.shares_embedding {
            tensor_bytes(&self.norm)
        } else {
            self.bytes_read()
        }
    }
}

/// `x Wᵀ`; on the CPU with the batch-invariant kernel of [`crate::rowwise`].
fn project(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 {
        Ok(x.contiguous()?
            .apply_op2_no_bwd(weight, &crate::rowwise::RowwiseLinear)?)
    } else {
        Ok(x.matmul(&weight.t()?)?)
    }
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{causal_mask, SeqSpan};

    /// The GPU's attention (general matmuls and the batch's causal mask) computes
    /// what the CPU's exact kernel does, over a cache view narrowed to the keys.
    #[test]
    fn matmul_attention_matches_the_exact_kernel() {
        let dev = Device::Cpu;
        let (n, heads, kv_heads, cap, d, pos) = (5, 8, 2, 16, 32, 3);
        let q = Tensor::randn(0f32, 1.0, (n, heads, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (kv_heads, cap, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (kv_heads, cap, d), &dev).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let exact = q
            .apply_op3_no_bwd(
                &k,
                &v,
                &CausalAttention {
                    pos,
                    group: heads / kv_heads,
                    scale: scale as f32,
                },
            )
            .unwrap();
        let keys = pos + n;
        let mask = causal_mask(heads / kv_heads, &SeqSpan { pos, len: n }, &dev).unwrap();
        let general = attend_with_matmul(
            &q,
            &k.narrow(1, 0, keys).unwrap(),
            &v.narrow(1, 0, keys).unwrap(),
            Some(&mask),
            scale,
        )
        .unwrap();
        assert_eq!(general.dims(), exact.dims());
        let diff: f32 = (general - exact)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-5, "largest difference {diff}");
    }
}
