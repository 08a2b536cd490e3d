//! `lime generate`: single-process reference generation, streamed to stdout.

use anyhow::{bail, Context};
use lime_client::progress::Progress;
use lime_kernels::{Checkpoint, Device, GenerateRequest, Model, TextTokenizer};
use lime_schemas::SamplingParams;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

/// What to generate from, and how (`lime generate`'s arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text (tokenized with the checkpoint's tokenizer, BOS added).
    #[arg(long, conflicts_with = "prompt_ids")]
    pub prompt: Option<String>,
    /// Prompt as token ids, comma or space separated, used as given.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub prompt_ids: Option<Vec<u32>>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling's probability mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// 1 leaves the logits as they are.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed of the sampler's random stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print generated token ids instead of text.
    #[arg(long)]
    pub print_ids: bool,
    /// Write every step's logits (f32 little-endian, vocab per step) to this file.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
}

impl GenerateArgs {
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let sampling = args.sampling();
    sampling.validate()?;
    let ckpt = Checkpoint::open(&args.model)?;
    // Token ids in and out need no tokenizer (some checkpoints ship none).
    let tokenizer = if args.prompt_ids.is_some() && args.print_ids {
        None
    } else {
        Some(TextTokenizer::from_path(&args.model)?)
    };
    let prompt = match (&args.prompt, &args.prompt_ids, &tokenizer) {
        (_, Some(ids), _) => ids.clone(),
        (Some(text), None, Some(t)) => t.encode(text, true)?,
        _ => bail!("give --prompt TEXT or --prompt-ids IDS"),
    };
    let mut progress = Progress::new(format!("loading {}", args.model.display()));
    let model = Model::load(&ckpt, &Device::Cpu, |done, total| {
        progress.update(done as u64, total as u64, "layers")
    })?;
    tracing::info!(weights_mb = model.bytes() >> 20, "model loaded");
    let stop_tokens = if args.ignore_eos {
        Vec::new()
    } else {
        ckpt.eos_token_ids()?
    };
    let req = GenerateRequest {
        prompt: &prompt,
        max_tokens: args.max_tokens,
        sampling,
        stop_tokens,
    };
    let mut logits_file = match &args.logits_out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut stream = tokenizer.as_ref().map(TextTokenizer::stream);
    let mut out = std::io::stdout().lock();
    let mut failure = None;
    let started = std::time::Instant::now();
    let generation = lime_kernels::generate(&model, &req, |token, logits| {
        let step = (|| -> anyhow::Result<()> {
            if let Some(f) = logits_file.as_mut() {
                for v in logits {
                    f.write_all(&v.to_le_bytes())?;
                }
            }
            if let (false, Some(stream)) = (args.print_ids, stream.as_mut()) {
                if let Some(text) = stream.step(token)? {
                    out.write_all(text.as_bytes())?;
                    out.flush()?;
                }
            }
            Ok(())
        })();
        match step {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failure = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(mut f) = logits_file {
        f.flush()?;
    }
    if args.print_ids {
        let ids: Vec<String> = generation.tokens.iter().map(u32::to_string).collect();
        writeln!(out, "{}", ids.join(" "))?;
    } else {
        if let Some(rest) = stream.map(|s| s.finish()).transpose()?.flatten() {
            out.write_all(rest.as_bytes())?;
        }
        writeln!(out)?;
    }
    eprintln!(
        "{} prompt tokens, {} generated ({}), {:.2} tokens/s",
        prompt.len(),
        generation.tokens.len(),
        generation.finish.as_str(),
        generation.tokens.len() as f64 / elapsed
    );
    Ok(())
}
