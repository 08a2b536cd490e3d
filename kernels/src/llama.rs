//! The Llama family's decoder (and Mistral's and Qwen2's, which differ only in
//! config), in pieces that load and run independently: the embedding, any single
//! decoder layer, and the head. Weight names are exactly those of the Hugging Face
//! checkpoint.

use crate::batch::MicroBatch;
use crate::causal_attention::CausalAttention;
use crate::kv_append::KvAppend;
use crate::kv_cache::KvCache;
use crate::rms_norm::RmsNormOp;
use crate::{rope, Checkpoint, Config, Error, Result, StagingBuffer};
use candle_core::{DType, Device, Tensor, D};

/// Makes a zeroed tensor of a shape, for a slot's weights.
type Alloc<'a> = &'a mut dyn FnMut(&[usize]) -> Result<Tensor>;
/// Reads the checkpoint tensor of a name into a slot's tensor.
type Fill<'a> = &'a mut dyn FnMut(&str, &Tensor) -> Result<()>;

/// A dense projection `y = x Wᵀ (+ b)` with `W` stored `[out, in]` as in PyTorch.
#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        dims: (usize, usize),
        bias: bool,
        dev: &Device,
    ) -> Result<Self> {
        let (out_dim, in_dim) = dims;
        let weight = ckpt.tensor(&format!("{prefix}.weight"), &[out_dim, in_dim], dev)?;
        let bias = if bias {
            Some(ckpt.tensor(&format!("{prefix}.bias"), &[out_dim], dev)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Zeroed weights of the shape `load` would read, to be filled later.
    fn zeros(dims: (usize, usize), bias: bool, alloc: Alloc<'_>) -> Result<Self> {
        Ok(Self {
            weight: alloc(&[dims.0, dims.1])?,
            bias: if bias { Some(alloc(&[dims.0])?) } else { None },
        })
    }

    fn fill(&self, prefix: &str, fill: Fill<'_>) -> Result<()> {
        fill(&format!("{prefix}.weight"), &self.weight)?;
        if let Some(b) = &self.bias {
            fill(&format!("{prefix}.bias"), b)?;
        }
        Ok(())
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = project(x, &self.weight)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    fn bytes(&self) -> usize {
        tensor_bytes(&self.weight) + self.bias.as_ref().map_or(0, tensor_bytes)
    }
}

/// Root-mean-square normalisation, computed in f32 whatever the weights' dtype.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(ckpt: &Checkpoint, name: &str, cfg: &Config, dev: &Device) -> Result<Self> {
        Ok(Self {
            weight: ckpt.tensor(name, &[cfg.hidden_size], dev)?,
            eps: cfg.rms_norm_eps,
        })
    }

    fn zeros(cfg: &Config, alloc: Alloc<'_>) -> Result<Self> {
        Ok(Self {
            weight: alloc(&[cfg.hidden_size])?,
            eps: cfg.rms_norm_eps,
        })
    }

    fn fill(&self, name: &str, fill: Fill<'_>) -> Result<()> {
        fill(name, &self.weight)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let op = RmsNormOp {
            eps: self.eps as f32,
        };
        Ok(x.contiguous()?.apply_op2_no_bwd(&self.weight, &op)?)
    }
}

/// Grouped-query self-attention with a preallocated per-sequence cache.
#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(ckpt: &Checkpoint, prefix: &str, cfg: &Config, dev: &Device) -> Result<Self> {
        let (h, q, kv) = (
            cfg.hidden_size,
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        Ok(Self {
            q_proj: Linear::load(ckpt, &format!("{prefix}.q_proj"), (q, h), cfg.qkv_bias, dev)?,
            k_proj: Linear::load(
                ckpt,
                &format!("{prefix}.k_proj"),
                (kv, h),
                cfg.qkv_bias,
                dev,
            )?,
            v_proj: Linear::load(
                ckpt,
                &format!("{prefix}.v_proj"),
                (kv, h),
                cfg.qkv_bias,
                dev,
            )?,
            o_proj: Linear::load(ckpt, &format!("{prefix}.o_proj"), (h, q), cfg.o_bias, dev)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        })
    }

    fn zeros(cfg: &Config, alloc: Alloc<'_>) -> Result<Self> {
        let (h, q, kv) = (
            cfg.hidden_size,
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        Ok(Self {
            q_proj: Linear::zeros((q, h), cfg.qkv_bias, alloc)?,
            k_proj: Linear::zeros((kv, h), cfg.qkv_bias, alloc)?,
            v_proj: Linear::zeros((kv, h), cfg.qkv_bias, alloc)?,
            o_proj: Linear::zeros((h, q), cfg.o_bias, alloc)?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        })
    }

    fn fill(&self, prefix: &str, fill: Fill<'_>) -> Result<()> {
        for (proj, name) in [
            (&self.q_proj, "q_proj"),
            (&self.k_proj, "k_proj"),
            (&self.v_proj, "v_proj"),
            (&self.o_proj, "o_proj"),
        ] {
            proj.fill(&format!("{prefix}.{name}"), fill)?;
        }
        Ok(())
    }

    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        batch: &MicroBatch,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let tokens = batch.tokens();
        let q = self
            .q_proj
            .forward(x)?
            .reshape((tokens, self.heads, self.head_dim))?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape((tokens, self.kv_heads, self.head_dim))?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((tokens, self.kv_heads, self.head_dim))?;
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
        self.o_proj.forward(&Tensor::cat(&outputs, 0)?)
    }

    fn bytes(&self) -> usize {
        self.q_proj.bytes() + self.k_proj.bytes() + self.v_proj.bytes() + self.o_proj.bytes()
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
#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(ckpt: &Checkpoint, prefix: &str, cfg: &Config, dev: &Device) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: Linear::load(ckpt, &format!("{prefix}.gate_proj"), (i, h), b, dev)?,
            up_proj: Linear::load(ckpt, &format!("{prefix}.up_proj"), (i, h), b, dev)?,
            down_proj: Linear::load(ckpt, &format!("{prefix}.down_proj"), (h, i), b, dev)?,
        })
    }

    fn zeros(cfg: &Config, alloc: Alloc<'_>) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: Linear::zeros((i, h), b, alloc)?,
            up_proj: Linear::zeros((i, h), b, alloc)?,
            down_proj: Linear::zeros((h, i), b, alloc)?,
        })
    }

    fn fill(&self, prefix: &str, fill: Fill<'_>) -> Result<()> {
        for (proj, name) in [
            (&self.gate_proj, "gate_proj"),
            (&self.up_proj, "up_proj"),
            (&self.down_proj, "down_proj"),
        ] {
            proj.fill(&format!("{prefix}.{name}"), fill)?;
        }
        Ok(())
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = (self.gate_proj.forward(x)?.silu()? * self.up_proj.forward(x)?)?;
        self.down_proj.forward(&gated)
    }

    fn bytes(&self) -> usize {
        self.gate_proj.bytes() + self.up_proj.bytes() + self.down_proj.bytes()
    }
}

/// One decoder layer, `model.layers.{index}`: loaded, run and dropped on its own so
/// that a stage can hold any subset of the model and stream the rest.
#[derive(Debug)]
pub struct DecoderLayer {
    index: usize,
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    /// The mapped memory of a slot on an integrated GPU. Declared last: it must
    /// outlive the tensors above, which live in it.
    #[cfg(feature = "cuda")]
    mapped: Option<std::sync::Arc<crate::cuda::mapped::MappedArena>>,
}

impl DecoderLayer {
    /// Reads layer `index`'s weights from the checkpoint (and nothing else).
    pub fn load(ckpt: &Checkpoint, index: usize, device: &Device) -> Result<Self> {
        let cfg = ckpt.config();
        if index >= cfg.num_hidden_layers {
            return Err(Error::Input(format!(
                "layer {index} does not exist in a {}-layer model",
                cfg.num_hidden_layers
            )));
        }
        let p = format!("model.layers.{index}");
        let _span = tracing::debug_span!("load_layer", layer = index).entered();
        Ok(Self {
            index,
            input_layernorm: RmsNorm::load(
                ckpt,
                &format!("{p}.input_layernorm.weight"),
                cfg,
                device,
            )?,
            self_attn: Attention::load(ckpt, &format!("{p}.self_attn"), cfg, device)?,
            post_attention_layernorm: RmsNorm::load(
                ckpt,
                &format!("{p}.post_attention_layernorm.weight"),
                cfg,
                device,
            )?,
            mlp: Mlp::load(ckpt, &format!("{p}.mlp"), cfg, device)?,
            #[cfg(feature = "cuda")]
            mapped: None,
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
        #[cfg(feature = "cuda")]
        if !device.is_cpu()
            && crate::GpuTraits::query(device)?.load_path() == crate::LoadPath::Mapped
        {
            return Self::empty_mapped(cfg, dtype, device);
        }
        Self::allocate(cfg, &mut |shape| Ok(Tensor::zeros(shape, dtype, device)?))
    }

    /// A slot's tensors, each from `alloc`.
    fn allocate(cfg: &Config, alloc: Alloc<'_>) -> Result<Self> {
        Ok(Self {
            index: usize::MAX,
            input_layernorm: RmsNorm::zeros(cfg, alloc)?,
            self_attn: Attention::zeros(cfg, alloc)?,
            post_attention_layernorm: RmsNorm::zeros(cfg, alloc)?,
            mlp: Mlp::zeros(cfg, alloc)?,
            #[cfg(feature = "cuda")]
            mapped: None,
        })
    }

    #[cfg(feature = "cuda")]
    fn empty_mapped(cfg: &Config, dtype: DType, device: &Device) -> Result<Self> {
        use crate::cuda::mapped::{footprint, MappedArena};
        // Sizes first (placeholders on the CPU), then the arena that holds them all.
        let mut bytes = 0;
        Self::allocate(cfg, &mut |shape| {
            bytes += footprint(shape.iter().product::<usize>() * dtype.size_in_bytes());
            Ok(Tensor::zeros((), dtype, &Device::Cpu)?)
        })?;
        let mut arena = MappedArena::new(device, bytes)?;
        let layer = Self::allocate(cfg, &mut |shape| arena.tensor(shape, dtype))?;
        Ok(Self {
            mapped: Some(std::sync::Arc::new(arena)),
            ..layer
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
        let cfg = ckpt.config();
        if index >= cfg.num_hidden_layers {
            return Err(Error::Input(format!(
                "layer {index} does not exist in a {}-layer model",
                cfg.num_hidden_layers
            )));
        }
        let _span = tracing::debug_span!("reload_layer", layer = index).entered();
        self.index = usize::MAX;
        #[cfg(feature = "cuda")]
        if let Some(arena) = &self.mapped {
            let arena = arena.clone();
            self.refill(index, &mut |name, t| arena.fill(ckpt, name, t, staging))?;
            self.index = index;
            return Ok(());
        }
        self.refill(index, &mut |name, t| ckpt.fill(name, t, staging))?;
        self.index = index;
        Ok(())
    }

    fn refill(&self, index: usize, fill: Fill<'_>) -> Result<()> {
        let p = format!("model.layers.{index}");
        self.input_layernorm
            .fill(&format!("{p}.input_layernorm.weight"), fill)?;
        self.self_attn.fill(&format!("{p}.self_attn"), fill)?;
        self.post_attention_layernorm
            .fill(&format!("{p}.post_attention_layernorm.weight"), fill)?;
        self.mlp.fill(&format!("{p}.mlp"), fill)
    }

    /// Where the layer's weights live.
    pub fn device(&self) -> &Device {
        self.input_layernorm.weight.device()
    }

    /// What the layer computes in (its weights' dtype).
    pub fn dtype(&self) -> DType {
        self.self_attn.q_proj.weight.dtype()
    }

    /// The model layer held, or `None` for a slot not (successfully) filled yet.
    pub fn index(&self) -> Option<usize> {
        (self.index != usize::MAX).then_some(self.index)
    }

    /// Bytes of weights this layer holds in memory.
    pub fn bytes(&self) -> usize {
        self.self_attn.bytes()
            + self.mlp.bytes()
            + tensor_bytes(&self.input_layernorm.weight)
            + tensor_bytes(&self.post_attention_layernorm.weight)
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
        let attn =
            self.self_attn
                .forward(&self.input_layernorm.forward(x)?, self.index, batch, caches)?;
        let x = (x + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + mlp)?)
    }
}

/// The token embedding, `model.embed_tokens`.
#[derive(Debug)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    pub fn load(ckpt: &Checkpoint, device: &Device) -> Result<Self> {
        let cfg = ckpt.config();
        Ok(Self {
            weight: ckpt.tensor(
                "model.embed_tokens.weight",
                &[cfg.vocab_size, cfg.hidden_size],
                device,
            )?,
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
    norm: RmsNorm,
    lm_head: Tensor,
    shares_embedding: bool,
}

impl Head {
    /// Loads the head. With tied embeddings and the starter's `embedding` at hand,
    /// the LM head shares its tensor instead of holding a second copy.
    pub fn load(ckpt: &Checkpoint, device: &Device, embedding: Option<&Embedding>) -> Result<Self> {
        let cfg = ckpt.config();
        let tied = ckpt.head_is_tied();
        let lm_head = match (tied, embedding) {
            (true, Some(e)) => e.weight.clone(),
            (true, None) => ckpt.tensor(
                "model.embed_tokens.weight",
                &[cfg.vocab_size, cfg.hidden_size],
                device,
            )?,
            (false, _) => {
                ckpt.tensor("lm_head.weight", &[cfg.vocab_size, cfg.hidden_size], device)?
            }
        };
        Ok(Self {
            norm: RmsNorm::load(ckpt, "model.norm.weight", cfg, device)?,
            lm_head,
            shares_embedding: tied && embedding.is_some(),
        })
    }

    /// Logits `[rows, vocab]` in f32 for the given rows of `hidden`.
    pub fn forward(&self, hidden: &Tensor, rows: &[u32]) -> Result<Tensor> {
        let rows = Tensor::from_slice(rows, rows.len(), hidden.device())?;
        let x = self.norm.forward(&hidden.index_select(&rows, 0)?)?;
        Ok(project(&x, &self.lm_head)?.to_dtype(DType::F32)?)
    }

    /// Bytes of weights one forward pass reads (the LM head even when it is shared).
    pub fn bytes_read(&self) -> usize {
        tensor_bytes(&self.norm.weight) + tensor_bytes(&self.lm_head)
    }

    /// Bytes of weights this head alone holds in memory.
    pub fn bytes(&self) -> usize {
        if self.shares_embedding {
            tensor_bytes(&self.norm.weight)
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
