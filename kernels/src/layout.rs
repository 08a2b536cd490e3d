//! The one description of a checkpoint's tensors: every weight's Hugging Face
//! name and the shape lime reads it as, for a decoder layer and for the model's
//! two ends. Loading, allocating and refilling a layer, synthesising a model and
//! sizing one all walk these descriptions, so a weight name is spelled here and
//! nowhere else.
//!
//! The dtype a weight computes in is not part of the name: it is the stored
//! dtype at a placement ([`crate::Placement::compute_dtype`]), f32 on the CPU and
//! the checkpoint's own on a GPU.

use crate::Config;

/// What every decoder layer's tensor names start with.
pub const LAYERS_PREFIX: &str = "model.layers.";

/// One tensor as lime reads it: its name in the checkpoint and its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightSpec {
    /// The name in the checkpoint, e.g. `model.layers.3.mlp.up_proj.weight`.
    pub name: String,
    /// The shape, PyTorch's order (`[out, in]` for a projection).
    pub shape: Vec<usize>,
}

impl WeightSpec {
    fn new(name: String, shape: &[usize]) -> Self {
        Self {
            name,
            shape: shape.to_vec(),
        }
    }

    /// Values in the tensor.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A dense projection's tensors: the weight and, where the architecture has one,
/// the bias.
#[derive(Debug, Clone)]
pub struct Projection<T> {
    /// `[out, in]`.
    pub weight: T,
    /// `[out]`, present when the config says the projection has a bias.
    pub bias: Option<T>,
}

/// Self-attention's four projections, `self_attn.*`.
#[derive(Debug, Clone)]
pub struct AttentionWeights<T> {
    /// Queries, `[heads × head_dim, hidden]`.
    pub q_proj: Projection<T>,
    /// Keys, `[kv_heads × head_dim, hidden]`.
    pub k_proj: Projection<T>,
    /// Values, `[kv_heads × head_dim, hidden]`.
    pub v_proj: Projection<T>,
    /// The output, `[hidden, heads × head_dim]`.
    pub o_proj: Projection<T>,
}

/// The SwiGLU feed-forward block's three projections, `mlp.*`.
#[derive(Debug, Clone)]
pub struct MlpWeights<T> {
    /// `[intermediate, hidden]`.
    pub gate_proj: Projection<T>,
    /// `[intermediate, hidden]`.
    pub up_proj: Projection<T>,
    /// `[hidden, intermediate]`.
    pub down_proj: Projection<T>,
}

/// A decoder layer's tensors, `model.layers.{index}.*`, in the checkpoint's own
/// hierarchy. `T` is a [`WeightSpec`] for the description, a tensor for a loaded
/// layer: one shape of data, so a layer's tensors and their names cannot drift.
#[derive(Debug, Clone)]
pub struct LayerWeights<T> {
    /// The norm before attention, `[hidden]`.
    pub input_layernorm: T,
    /// Self-attention.
    pub self_attn: AttentionWeights<T>,
    /// The norm before the MLP, `[hidden]`.
    pub post_attention_layernorm: T,
    /// The feed-forward block.
    pub mlp: MlpWeights<T>,
}

impl<T> Projection<T> {
    fn try_map<U, E>(&self, f: &mut impl FnMut(&T) -> Result<U, E>) -> Result<Projection<U>, E> {
        Ok(Projection {
            weight: f(&self.weight)?,
            bias: self.bias.as_ref().map(&mut *f).transpose()?,
        })
    }

    fn each<'a>(&'a self, out: &mut Vec<&'a T>) {
        out.push(&self.weight);
        out.extend(self.bias.as_ref());
    }
}

impl<T> LayerWeights<T> {
    /// The same layer with every tensor passed through `f`, in [`Self::iter`]'s
    /// order; the first error stops it.
    pub fn try_map<U, E>(
        &self,
        mut f: impl FnMut(&T) -> Result<U, E>,
    ) -> Result<LayerWeights<U>, E> {
        let (a, m) = (&self.self_attn, &self.mlp);
        Ok(LayerWeights {
            input_layernorm: f(&self.input_layernorm)?,
            self_attn: AttentionWeights {
                q_proj: a.q_proj.try_map(&mut f)?,
                k_proj: a.k_proj.try_map(&mut f)?,
                v_proj: a.v_proj.try_map(&mut f)?,
                o_proj: a.o_proj.try_map(&mut f)?,
            },
            post_attention_layernorm: f(&self.post_attention_layernorm)?,
            mlp: MlpWeights {
                gate_proj: m.gate_proj.try_map(&mut f)?,
                up_proj: m.up_proj.try_map(&mut f)?,
                down_proj: m.down_proj.try_map(&mut f)?,
            },
        })
    }

    /// Every tensor, in one fixed order: that of the fields.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        let mut out = Vec::with_capacity(16);
        out.push(&self.input_layernorm);
        let a = &self.self_attn;
        for p in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
            p.each(&mut out);
        }
        out.push(&self.post_attention_layernorm);
        let m = &self.mlp;
        for p in [&m.gate_proj, &m.up_proj, &m.down_proj] {
            p.each(&mut out);
        }
        out.into_iter()
    }

    /// Pairs each tensor with its counterpart in `other`, a layer of the same
    /// config (the description of the one a slot is refilled with, say).
    pub fn zip<'a, U>(
        &'a self,
        other: &'a LayerWeights<U>,
    ) -> impl Iterator<Item = (&'a T, &'a U)> {
        self.iter().zip(other.iter())
    }
}

impl LayerWeights<WeightSpec> {
    /// The description of layer `index` of a model of `cfg`.
    pub fn of(cfg: &Config, index: usize) -> Self {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let q = cfg.num_attention_heads * cfg.head_dim;
        let kv = cfg.num_key_value_heads * cfg.head_dim;
        let prefix = layer_prefix(index);
        let at = |part: &str| format!("{prefix}{part}");
        let projection = |part: &str, dims: [usize; 2], bias: bool| Projection {
            weight: WeightSpec::new(at(&format!("{part}.weight")), &dims),
            bias: bias.then(|| WeightSpec::new(at(&format!("{part}.bias")), &dims[..1])),
        };
        Self {
            input_layernorm: WeightSpec::new(at("input_layernorm.weight"), &[h]),
            self_attn: AttentionWeights {
                q_proj: projection("self_attn.q_proj", [q, h], cfg.qkv_bias),
                k_proj: projection("self_attn.k_proj", [kv, h], cfg.qkv_bias),
                v_proj: projection("self_attn.v_proj", [kv, h], cfg.qkv_bias),
                o_proj: projection("self_attn.o_proj", [h, q], cfg.o_bias),
            },
            post_attention_layernorm: WeightSpec::new(at("post_attention_layernorm.weight"), &[h]),
            mlp: MlpWeights {
                gate_proj: projection("mlp.gate_proj", [i, h], cfg.mlp_bias),
                up_proj: projection("mlp.up_proj", [i, h], cfg.mlp_bias),
                down_proj: projection("mlp.down_proj", [h, i], cfg.mlp_bias),
            },
        }
    }

    /// Values in the layer's tensors.
    pub fn elements(&self) -> usize {
        self.iter().map(WeightSpec::elements).sum()
    }
}

/// The tensors at the model's two ends: what only the starter holds.
#[derive(Debug, Clone)]
pub struct EndWeights {
    /// The token embedding, `[vocab, hidden]`.
    pub embed_tokens: WeightSpec,
    /// The final norm, `[hidden]`.
    pub norm: WeightSpec,
    /// The LM head, `[vocab, hidden]`; a tied checkpoint reads `embed_tokens`
    /// instead where it does not store one ([`crate::Checkpoint::head_is_tied`]).
    pub lm_head: WeightSpec,
}

impl EndWeights {
    /// The description of a model of `cfg`'s ends.
    pub fn of(cfg: &Config) -> Self {
        let table = [cfg.vocab_size, cfg.hidden_size];
        Self {
            embed_tokens: WeightSpec::new("model.embed_tokens.weight".into(), &table),
            norm: WeightSpec::new("model.norm.weight".into(), &[cfg.hidden_size]),
            lm_head: WeightSpec::new("lm_head.weight".into(), &table),
        }
    }
}

/// What layer `index`'s tensor names start with, dot included.
pub fn layer_prefix(index: usize) -> String {
    format!("{LAYERS_PREFIX}{index}.")
}

/// Whether a checkpoint tensor belongs to a decoder layer.
pub fn is_layer_weight(name: &str) -> bool {
    name.starts_with(LAYERS_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{Preset, StoredDtype, SynthSpec};

    #[test]
    fn a_layer_is_described_with_the_checkpoints_names_and_shapes() {
        let cfg = SynthSpec::preset(Preset::Tiny, StoredDtype::F32, 0).config(64, 1, vec![2]);
        let layer = LayerWeights::of(&cfg, 3);
        let names: Vec<&str> = layer.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names[0], "model.layers.3.input_layernorm.weight");
        assert!(names.contains(&"model.layers.3.self_attn.k_proj.weight"));
        assert!(names.contains(&"model.layers.3.mlp.down_proj.weight"));
        assert!(names
            .iter()
            .all(|n| is_layer_weight(n) && n.starts_with(&layer_prefix(3))));
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        assert_eq!(layer.mlp.down_proj.weight.shape, vec![h, i]);
        assert!(layer.self_attn.q_proj.bias.is_none());
        let (q, kv) = (
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        assert_eq!(layer.elements(), 2 * h + h * (2 * q + 2 * kv) + 3 * h * i);
        let ends = EndWeights::of(&cfg);
        assert_eq!(ends.lm_head.elements(), cfg.vocab_size * h);
    }

    #[test]
    fn biases_follow_the_config() {
        let mut cfg = SynthSpec::preset(Preset::Tiny, StoredDtype::F32, 0).config(64, 1, vec![2]);
        cfg.qkv_bias = true;
        let layer = LayerWeights::of(&cfg, 0);
        let q = &layer.self_attn.q_proj;
        assert_eq!(
            q.bias.as_ref().map(|b| b.name.as_str()),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(q.bias.as_ref().unwrap().shape, vec![q.weight.shape[0]]);
        assert!(layer.self_attn.o_proj.bias.is_none());
        assert_eq!(layer.iter().count(), 9 + 3);
        let doubled = layer.try_map(|w| Ok::<_, ()>(w.elements() * 2)).unwrap();
        assert_eq!(doubled.iter().sum::<usize>(), 2 * layer.elements());
    }
}
