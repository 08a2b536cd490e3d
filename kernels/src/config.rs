//! The model's shape, read from a Hugging Face `config.json`.
//!
//! One `Config` covers the Llama family (Llama 2, 3, 3.1, 3.2, 3.3) and the two
//! architectures that differ from it only in details lime handles: Mistral (a
//! sliding window, honoured by capping the context at the window so attention stays
//! exact) and Qwen2 (biases on the q, k and v projections).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which Hugging Face model class a checkpoint was written by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

const SUPPORTED: &str = "LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM";

impl Architecture {
    fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "MistralForCausalLM" => Some(Self::Mistral),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            _ => None,
        }
    }

    /// The class name Hugging Face writes in `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// How rotary position frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1's piecewise rescaling of the frequency bands.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor` (every frequency divided by it).
    Linear { factor: f64 },
}

/// A token id field that Hugging Face writes either as one id or as a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// The fields of `config.json` that decide the computation, under their HF names.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    vocab_size: usize,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// A validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub vocab_size: usize,
    /// Biases on the q, k and v projections (Qwen2, or Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Mistral's attention window; the usable context is capped to it.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint declares (informational; tensors carry their own).
    pub torch_dtype: Option<String>,
}

/// Sizes beyond these are refused as corrupt rather than attempted.
const MAX_DIM: usize = 1 << 20;
const MAX_VOCAB: usize = 1 << 24;
const MAX_LAYERS: usize = 4096;

impl Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses and validates the text of a `config.json`; `path` is only for errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let arch_names: Vec<String> = value
            .get("architectures")
            .and_then(|a| serde_json::from_value(a.clone()).ok())
            .unwrap_or_default();
        // The architecture is checked before the fields, so an unsupported model says
        // so instead of complaining about a field it does not have.
        let architecture = match arch_names.first() {
            Some(name) => {
                Architecture::from_hf(name).ok_or_else(|| Error::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    found: name.clone(),
                    supported: SUPPORTED,
                })?
            }
            None => match value.get("model_type").and_then(|m| m.as_str()) {
                Some("llama") => Architecture::Llama,
                Some("mistral") => Architecture::Mistral,
                Some("qwen2") => Architecture::Qwen2,
                other => {
                    return Err(Error::UnsupportedArchitecture {
                        path: path.to_path_buf(),
                        found: other.unwrap_or("<no architectures, no model_type>").into(),
                        supported: SUPPORTED,
                    })
                }
            },
        };
        let raw: RawConfig = serde_path_to_error::deserialize(value)
            .map_err(|e| bad(format!("`{}`: {}", e.path(), e.inner())))?;
        Self::validate(raw, architecture).map_err(bad)
    }

    fn validate(raw: RawConfig, architecture: Architecture) -> std::result::Result<Self, String> {
        let check = |name: &str, v: usize, max: usize| {
            if v == 0 || v > max {
                Err(format!("`{name}` = {v} is outside 1..={max}"))
            } else {
                Ok(v)
            }
        };
        let hidden_size = check("hidden_size", raw.hidden_size, MAX_DIM)?;
        let intermediate_size = check("intermediate_size", raw.intermediate_size, MAX_DIM)?;
        let num_hidden_layers = check("num_hidden_layers", raw.num_hidden_layers, MAX_LAYERS)?;
        let num_attention_heads = check("num_attention_heads", raw.num_attention_heads, MAX_DIM)?;
        let num_key_value_heads = check(
            "num_key_value_heads",
            raw.num_key_value_heads.unwrap_or(num_attention_heads),
            MAX_DIM,
        )?;
        let vocab_size = check("vocab_size", raw.vocab_size, MAX_VOCAB)?;
        let max_position_embeddings = check(
            "max_position_embeddings",
            raw.max_position_embeddings,
            1 << 24,
        )?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({num_attention_heads}) is not a multiple of num_key_value_heads ({num_key_value_heads})"
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => check("head_dim", d, MAX_DIM)?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(format!(
                    "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads}) and no head_dim is given"
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(format!(
                "head_dim ({head_dim}) must be even for rotary embeddings"
            ));
        }
        if !(raw.rms_norm_eps.is_finite() && raw.rms_norm_eps > 0.0) {
            return Err(format!("rms_norm_eps ({}) must be > 0", raw.rms_norm_eps));
        }
        let rope_theta = raw.rope_theta.unwrap_or(10_000.0);
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(format!("rope_theta ({rope_theta}) must be > 0"));
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(format!("hidden_act `{act}` is not supported (only silu)"));
            }
        }
        let rope_scaling = match raw.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => parse_rope_scaling(&v)?,
        };
        let sliding_window = match architecture {
            Architecture::Qwen2 if raw.use_sliding_window == Some(true) => {
                return Err("Qwen2 with use_sliding_window=true is not supported".into())
            }
            Architecture::Mistral => raw.sliding_window,
            _ => None,
        };
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (raw.attention_bias, raw.attention_bias),
        };
        Ok(Self {
            architecture,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            vocab_size,
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias,
            sliding_window,
            bos_token_id: raw.bos_token_id.and_then(|b| b.to_vec().first().copied()),
            eos_token_ids: raw.eos_token_id.map(|e| e.to_vec()).unwrap_or_default(),
            torch_dtype: raw.torch_dtype.or(raw.dtype),
        })
    }

    /// The longest sequence (prompt + generated tokens) lime will run exactly.
    pub fn max_context(&self) -> usize {
        match self.sliding_window {
            Some(w) => w.min(self.max_position_embeddings),
            None => self.max_position_embeddings,
        }
    }

    /// The model in the planner's units, with weights stored `stored_dtype_bytes`
    /// bytes per parameter.
    pub fn shape(&self, name: &str, stored_dtype_bytes: u32) -> lime_schemas::ModelShape {
        let layer = crate::layout::LayerWeights::of(self, 0);
        let ends = crate::layout::EndWeights::of(self);
        let head = ends.lm_head.elements() as u64;
        let kv = (self.num_key_value_heads * self.head_dim) as u64;
        lime_schemas::ModelShape {
            name: name.to_owned(),
            layers: self.num_hidden_layers,
            hidden: self.hidden_size,
            layer_params: layer.elements() as u64,
            largest_tensor_params: layer.iter().map(|w| w.elements()).max().unwrap_or(0) as u64,
            end_params: (ends.embed_tokens.elements() + ends.norm.elements()) as u64
                + if self.tie_word_embeddings { 0 } else { head },
            head_params: head,
            kv_values_per_token: 2 * kv,
            activation_values_per_token: self.activation_values_per_token(),
            rope_values: (self.max_context() * self.head_dim) as u64,
            max_context: self.max_context(),
            stored_dtype_bytes,
        }
    }

    /// f32 values a stage keeps per token of a micro-batch while computing a
    /// layer: the hidden states in and out, the normed copies, queries, keys,
    /// values, the attention output and the MLP's gate, up and product, plus the
    /// wire buffers in and out.
    pub fn activation_values_per_token(&self) -> u64 {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        (9 * h + 2 * q + 2 * kv + 3 * self.intermediate_size) as u64
    }

    /// Bytes per parameter of the dtype `config.json` declares, if it names one.
    pub fn declared_dtype_bytes(&self) -> Option<u32> {
        match self.torch_dtype.as_deref()? {
            "bfloat16" | "float16" => Some(2),
            "float32" => Some(4),
            "float64" => Some(8),
            _ => None,
        }
    }

    /// Query heads that share one key/value head.
    pub fn kv_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The `config.json` text Hugging Face would write for this configuration.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let rope_scaling = match &self.rope_scaling {
            None => serde_json::Value::Null,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
        };
        let eos = match self.eos_token_ids.as_slice() {
            [one] => serde_json::json!(one),
            many => serde_json::json!(many),
        };
        serde_json::json!({
            "architectures": [self.architecture.hf_name()],
            "model_type": self.architecture.model_type(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vocab_size": self.vocab_size,
            "attention_bias": self.qkv_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "sliding_window": self.sliding_window,
            "torch_dtype": self.torch_dtype,
        })
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> std::result::Result<Option<RopeScaling>, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .ok_or("rope_scaling has no `rope_type`")?;
    let num = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_f64())
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| format!("rope_scaling `{kind}` needs a positive `{k}`"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        "llama3" => {
            let low = num("low_freq_factor")?;
            let high = num("high_freq_factor")?;
            if high <= low {
                return Err("rope_scaling: high_freq_factor must exceed low_freq_factor".into());
            }
            Ok(Some(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            }))
        }
        other => Err(format!(
            "rope_scaling type `{other}` is not supported (llama3, linear, default)"
        )),
    }
}
