//! Single-process generation: the reference every distributed run is held to.

use crate::sampling::Sampler;
use crate::{Error, Model, Result};
use lime_schemas::SamplingParams;
use std::ops::ControlFlow;

/// Why a generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token was produced.
    Stop,
    /// `max_tokens` were produced.
    Length,
    /// The caller's callback asked to stop.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// One request for the reference generator.
#[derive(Debug, Clone)]
pub struct GenerateRequest<'a> {
    pub prompt: &'a [u32],
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end the sequence (usually the model's EOS ids).
    pub stop_tokens: Vec<u32>,
}

/// Runs a prompt through the model and samples up to `max_tokens` tokens, calling
/// `on_token(token, logits)` after each; the logits are those the token was drawn from.
pub fn generate(
    model: &Model,
    req: &GenerateRequest<'_>,
    mut on_token: impl FnMut(u32, &[f32]) -> ControlFlow<()>,
) -> Result<Generation> {
    if req.prompt.is_empty() {
        return Err(Error::Input("the prompt has no tokens".into()));
    }
    req.sampling
        .validate()
        .map_err(|e| Error::Input(e.to_string()))?;
    let context = req.prompt.len() + req.max_tokens;
    let limit = model.config().max_context();
    if context > limit {
        return Err(Error::Input(format!(
            "prompt ({}) + max_tokens ({}) exceeds the model's context of {limit}",
            req.prompt.len(),
            req.max_tokens
        )));
    }
    let _span = tracing::info_span!(
        "generate",
        prompt = req.prompt.len(),
        max_tokens = req.max_tokens
    )
    .entered();
    let mut cache = model.new_cache(context.max(1))?;
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut history = req.prompt.to_vec();
    let mut tokens = Vec::new();
    let mut input = req.prompt.to_vec();
    let mut pos = 0;
    while tokens.len() < req.max_tokens {
        let logits = model
            .forward(&[&input], &[pos], &mut [&mut cache])?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        pos += input.len();
        let next = sampler.next(&logits, &history);
        tokens.push(next);
        history.push(next);
        if on_token(next, &logits).is_break() {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Cancelled,
            });
        }
        if req.stop_tokens.contains(&next) {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Stop,
            });
        }
        input = vec![next];
    }
    Ok(Generation {
        tokens,
        finish: FinishReason::Length,
    })
}
