//! Synthetic checkpoints: random-weight Llama models in the exact Hugging Face
//! layout, so that tests and benchmarks run real loading code without downloads.
//!
//! Every tensor draws from its own ChaCha8 stream, keyed by the seed and the
//! tensor's name, so a checkpoint is the same bytes on every machine. Weights are
//! uniform with variances chosen to keep activations finite and logits varied:
//! projections preserve the scale of their normalised inputs, queries and keys are
//! scaled up so attention is sharp, and the LM head gives logits a standard
//! deviation of about 3.

pub mod tokenizer;

use crate::checkpoint::{CONFIG_FILE, INDEX_FILE};
use crate::config::{Architecture, Config, RopeScaling};
use crate::layout::{
    AttentionWeights, EndWeights, LayerWeights, MlpWeights, Projection, WeightSpec,
};
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Named model sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// ~3 MB in f32, 12 layers, tied embeddings: for tests.
    Tiny,
    /// ~100 MB in f32, 8 layers.
    Small,
    /// ~750 MB in f32, 16 layers: for benchmarks.
    Bench,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tiny" => Ok(Self::Tiny),
            "small" => Ok(Self::Small),
            "bench" => Ok(Self::Bench),
            _ => Err(format!("unknown preset `{s}` (tiny, small, bench)")),
        }
    }
}

/// The stored dtype of a synthetic checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
}

impl std::str::FromStr for StoredDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            _ => Err(format!("unknown dtype `{s}` (f32, f16, bf16)")),
        }
    }
}

impl StoredDtype {
    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            Self::BF16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    }
}

/// Everything that decides a synthetic checkpoint's bytes.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Requested vocabulary; the trained tokenizer may come out a little smaller,
    /// and the model's vocabulary is then the tokenizer's.
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub dtype: StoredDtype,
    pub seed: u64,
    /// Largest shard file; the model is split into several shards of about this size.
    pub shard_bytes: u64,
}

impl SynthSpec {
    pub fn preset(preset: Preset, dtype: StoredDtype, seed: u64) -> Self {
        let llama3 = |original| {
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: original,
            })
        };
        let (h, i, l, heads, kv, vocab, ctx, tie, shard) = match preset {
            Preset::Tiny => (64, 176, 12, 4, 2, 512, 2048, true, 1 << 20),
            Preset::Small => (512, 1536, 8, 8, 4, 2048, 4096, false, 40 << 20),
            Preset::Bench => (1024, 2816, 16, 16, 4, 2048, 4096, false, 256 << 20),
        };
        Self {
            hidden_size: h,
            intermediate_size: i,
            num_hidden_layers: l,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            vocab_size: vocab,
            max_position_embeddings: ctx,
            rope_theta: 500_000.0,
            rope_scaling: llama3(ctx / 4),
            tie_word_embeddings: tie,
            attention_bias: false,
            dtype,
            seed,
            shard_bytes: shard,
        }
    }

    pub(crate) fn config(&self, vocab_size: usize, bos: u32, eos: Vec<u32>) -> Config {
        Config {
            architecture: Architecture::Llama,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.hidden_size / self.num_attention_heads,
            rms_norm_eps: 1e-5,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone(),
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            vocab_size,
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: false,
            sliding_window: None,
            bos_token_id: Some(bos),
            eos_token_ids: eos,
            torch_dtype: Some(self.dtype.torch_name().into()),
        }
    }
}

/// How a tensor's values are drawn: uniform with this standard deviation around `mean`.
#[derive(Debug, Clone, Copy)]
struct Init {
    mean: f32,
    std: f32,
}

/// Every tensor of the model, in file order, with its shape and initialisation.
fn tensor_plan(cfg: &Config) -> Vec<(String, Vec<usize>, Init)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let rsqrt = |n: usize| 1.0 / (n as f32).sqrt();
    let w = |std: f32| Init { mean: 0.0, std };
    let norm = Init {
        mean: 1.0,
        std: 0.1,
    };
    // Gains chosen by generating 512 greedy tokens from each preset and comparing
    // with an f64 reference: queries and keys at 2.5x make attention sharp and
    // position-dependent, which with full-scale output projections keeps random
    // models from settling on one repeated token; at 3x the output varies no more
    // but rounding differences grow about twice as fast with context.
    let (eg, og, qg) = (3.0, 1.0, 2.5);
    let bias = w(0.02);
    let projection = |p: &Projection<WeightSpec>, weight: Init| Projection {
        weight,
        bias: p.bias.as_ref().map(|_| bias),
    };
    let ends = EndWeights::of(cfg);
    let entry = |spec: &WeightSpec, init: Init| (spec.name.clone(), spec.shape.clone(), init);
    let mut plan = vec![entry(&ends.embed_tokens, w(eg * rsqrt(h)))];
    for l in 0..cfg.num_hidden_layers {
        let spec = LayerWeights::of(cfg, l);
        let (a, m) = (&spec.self_attn, &spec.mlp);
        let inits = LayerWeights {
            input_layernorm: norm,
            self_attn: AttentionWeights {
                q_proj: projection(&a.q_proj, w(qg * rsqrt(h))),
                k_proj: projection(&a.k_proj, w(qg * rsqrt(h))),
                v_proj: projection(&a.v_proj, w(rsqrt(h))),
                o_proj: projection(&a.o_proj, w(og * rsqrt(q))),
            },
            post_attention_layernorm: norm,
            mlp: MlpWeights {
                gate_proj: projection(&m.gate_proj, w(rsqrt(h))),
                up_proj: projection(&m.up_proj, w(rsqrt(h))),
                down_proj: projection(&m.down_proj, w(og * rsqrt(i))),
            },
        };
        let mut layer: Vec<_> = spec.zip(&inits).map(|(s, &init)| entry(s, init)).collect();
        layer.sort_by(|a, b| a.0.cmp(&b.0));
        plan.extend(layer);
    }
    plan.push(entry(&ends.norm, norm));
    if !cfg.tie_word_embeddings {
        plan.push(entry(&ends.lm_head, w(3.0 * rsqrt(h))));
    }
    plan
}

/// Draws a tensor's values from its own stream, keyed by seed and name.
fn draw(seed: u64, name: &str, numel: usize, init: &Init) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(fnv1a(name.as_bytes()));
    let half_width = init.std * 3f32.sqrt();
    (0..numel)
        .map(|_| init.mean + half_width * (2.0 * rng.random::<f32>() - 1.0))
        .collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Progress of a synthesis: bytes of tensors written out of the total.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Writes a checkpoint into `dir` (created if missing) and returns its config.
pub fn synthesize(spec: &SynthSpec, dir: &Path, progress: Progress<'_>) -> Result<Config> {
    if spec.num_attention_heads == 0
        || spec.num_key_value_heads == 0
        || !spec.hidden_size.is_multiple_of(spec.num_attention_heads)
        || !spec
            .num_attention_heads
            .is_multiple_of(spec.num_key_value_heads)
    {
        return Err(Error::Input(
            "synth: heads must divide hidden size, KV heads must divide heads".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tok = tokenizer::train(spec.vocab_size)?;
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| Error::Input(format!("synth: no token {t}")))
    };
    let (bos, eos, eot) = (
        id(tokenizer::BOS)?,
        id(tokenizer::EOS)?,
        id(tokenizer::EOT)?,
    );
    let cfg = spec.config(tok.get_vocab_size(true), bos, vec![eos, eot]);
    tokenizer::save(&tok, &dir.join("tokenizer.json"))?;

    let plan = tensor_plan(&cfg);
    let dtype = spec.dtype.safetensors();
    let elem = dtype.bitsize() as u64 / 8;
    let total: u64 = plan
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>() as u64 * elem)
        .sum();
    // Shards are cut at tensor boundaries, as transformers does, so a layer may
    // straddle two files.
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for (k, (_, shape, _)) in plan.iter().enumerate() {
        let bytes = shape.iter().product::<usize>() as u64 * elem;
        if size > 0 && size + bytes > spec.shard_bytes {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        size += bytes;
        current.push(k);
    }
    shards.push(current);
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut done = 0;
    progress(0, total);
    for (s, members) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{count:05}.safetensors", s + 1);
        let tensors: Vec<(String, Bytes)> = members
            .iter()
            .map(|&k| {
                let (name, shape, init) = &plan[k];
                let values = draw(spec.seed, name, shape.iter().product(), init);
                weight_map.insert(name.clone(), file.clone());
                let t = Bytes {
                    dtype,
                    shape: shape.clone(),
                    data: spec.dtype.encode(&values),
                };
                done += t.data.len() as u64;
                (name.clone(), t)
            })
            .collect();
        let path = dir.join(&file);
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            Some(meta),
            &path,
        )
        .map_err(|e| Error::io(&path, std::io::Error::other(e.to_string())))?;
        // safetensors writes through a private temporary file; models are read by
        // service users, so give the shard ordinary file permissions.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(&path, e))?;
        progress(done, total);
    }
    let _ = std::fs::remove_file(dir.join(crate::checkpoint::SINGLE_FILE));
    write_json(
        &dir.join(INDEX_FILE),
        &serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )?;
    write_json(&dir.join(CONFIG_FILE), &cfg.to_hf_json())?;
    write_json(
        &dir.join(crate::checkpoint::GENERATION_CONFIG_FILE),
        &serde_json::json!({
            "_from_model_config": true,
            "bos_token_id": bos,
            "eos_token_id": [eos, eot],
            "do_sample": false,
        }),
    )?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tokenizer::BOS,
            "eos_token": tokenizer::EOT,
            "clean_up_tokenization_spaces": false,
            "model_max_length": cfg.max_position_embeddings,
            "chat_template": tokenizer::CHAT_TEMPLATE,
        }),
    )?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &serde_json::json!({"bos_token": tokenizer::BOS, "eos_token": tokenizer::EOT}),
    )?;
    Ok(cfg)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Input(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}
