//! The model shard: the part of the model this stage computes. Its chunks' layer
//! ranges, and at the starter the model's ends (embedding and head), with the
//! rotary tables every layer uses; what arrives on the wire is checked against it.
//!
//! The layers themselves are the memory governor's ([`super::governor`]): the
//! shard says which layers a chunk runs, the governor hands each one over.

use super::Error;
use lime_kernels::{
    Checkpoint, Config, DType, Device, Embedding, Head, MicroBatch, Rope, SeqSpan, Tensor,
};
use lime_schemas::frame::ActivationDtype;
use lime_schemas::{Activations, Plan, Round, SeqSlot};
use std::ops::Range;

/// Embedding and head: what only the starter holds.
pub struct Ends {
    /// The token embedding, which starts every micro-batch.
    pub embedding: Embedding,
    /// The final norm and LM head, which turn the last hidden states into logits.
    pub head: Head,
}

/// What this stage computes of the model under one plan.
pub(super) struct ModelShard {
    config: Config,
    device: Device,
    rope: Rope,
    /// `(plan chunk index, layers)`, in ring order.
    chunks: Vec<(usize, Range<usize>)>,
    /// Every layer of every chunk held, in ring order.
    layers: Vec<usize>,
    ends: Option<Ends>,
    /// What layers compute in (f32 on the CPU); the wire always carries f32, which
    /// holds every narrower float exactly.
    dtype: DType,
    /// Largest micro-batch, in tokens, the activation workspace was reserved for.
    activation_tokens: usize,
}

impl ModelShard {
    /// `stage`'s part of `plan`: its chunks and, at the starter, the ends
    /// (`kept` when the stage held them under the previous plan, else read now).
    pub(super) fn new(
        ckpt: &Checkpoint,
        device: Device,
        plan: &Plan,
        stage: &str,
        activation_tokens: usize,
        kept: Option<Ends>,
    ) -> Result<Self, Error> {
        let config = ckpt.config().clone();
        let chunks: Vec<(usize, Range<usize>)> = plan
            .chunks_of(stage)
            .into_iter()
            .map(|(i, r)| (i, r.range()))
            .collect();
        let layers = chunks.iter().flat_map(|(_, r)| r.clone()).collect();
        let ends = match (plan.starter().is_some_and(|s| s.name == stage), kept) {
            (true, Some(ends)) => Some(ends),
            (true, None) => {
                let embedding = Embedding::load(ckpt, &device)?;
                let head = Head::load(ckpt, &device, Some(&embedding))?;
                Some(Ends { embedding, head })
            }
            (false, _) => None,
        };
        let rope = Rope::new(&config, config.max_context(), &device)?;
        Ok(Self {
            dtype: ckpt.hidden_dtype(&device),
            config,
            device,
            rope,
            chunks,
            layers,
            ends,
            activation_tokens,
        })
    }

    pub(super) fn config(&self) -> &Config {
        &self.config
    }

    pub(super) fn device(&self) -> &Device {
        &self.device
    }

    /// What layers and caches compute in here.
    pub(super) fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every layer this stage runs, in ring order.
    pub(super) fn layers(&self) -> &[usize] {
        &self.layers
    }

    pub(super) fn activation_tokens(&self) -> usize {
        self.activation_tokens
    }

    pub(super) fn is_starter(&self) -> bool {
        self.ends.is_some()
    }

    /// The ends, for the next plan (the starter stays the starter).
    pub(super) fn into_ends(self) -> Option<Ends> {
        self.ends
    }

    /// Bytes the ends and rotary tables hold.
    pub(super) fn fixed_bytes(&self) -> u64 {
        let ends = self
            .ends
            .as_ref()
            .map_or(0, |e| e.embedding.bytes() + e.head.bytes());
        (ends + self.rope.bytes()) as u64
    }

    /// The layers chunk `index` runs, if it is this stage's.
    pub(super) fn chunk(&self, index: u32) -> Option<Range<usize>> {
        self.chunks
            .iter()
            .find(|(i, _)| *i == index as usize)
            .map(|(_, r)| r.clone())
    }

    /// The rotary positions and masks of a micro-batch of `spans`.
    pub(super) fn batch(&self, seqs: &[SeqSlot]) -> Result<MicroBatch, Error> {
        let spans: Vec<SeqSpan> = seqs
            .iter()
            .map(|s| SeqSpan {
                pos: s.pos as usize,
                len: s.len as usize,
            })
            .collect();
        Ok(MicroBatch::new(
            &self.config,
            &self.rope,
            &spans,
            &self.device,
        )?)
    }

    /// The header agrees with the data and the model, and the micro-batch fits the
    /// activation workspace.
    pub(super) fn check_shape(&self, act: &Activations) -> Result<(), Error> {
        act.check(self.config.hidden_size, self.config.max_context())
            .map_err(|e| Error::Refused(e.to_string()))?;
        if act.tokens() > self.activation_tokens {
            return Err(Error::Refused(format!(
                "a micro-batch of {} tokens exceeds this stage's activation workspace of {} (memory.activation_tokens)",
                act.tokens(),
                self.activation_tokens
            )));
        }
        Ok(())
    }

    /// Embeds the micro-batch's tokens (starter only): the activations for chunk 0.
    pub(super) fn embed(
        &self,
        batch: u64,
        round: Round,
        seqs: Vec<SeqSlot>,
        ids: &[u32],
    ) -> Result<Activations, Error> {
        let hidden = self.ends()?.embedding.forward(ids)?;
        Ok(Activations {
            batches: vec![batch],
            chunk: 0,
            seqs,
            dtype: ActivationDtype::F32,
            data: to_bytes(&hidden)?,
            round,
        })
    }

    /// Next-token logits, one row of the vocabulary each, for the given rows of a
    /// finished micro-batch (starter only).
    pub(super) fn logits(&self, act: &Activations, rows: &[u32]) -> Result<Vec<Vec<f32>>, Error> {
        let ends = self.ends()?;
        let logits = ends.head.forward(&self.hidden(act)?, rows)?;
        Ok(logits.to_vec2::<f32>().map_err(lime_kernels::Error::from)?)
    }

    /// The micro-batch's hidden states as a tensor on this stage's device.
    pub(super) fn hidden(&self, act: &Activations) -> Result<Tensor, Error> {
        if act.dtype != ActivationDtype::F32 {
            return Err(Error::Refused(format!(
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
        )
        .map_err(lime_kernels::Error::from)?;
        Ok(x.to_dtype(self.dtype).map_err(lime_kernels::Error::from)?)
    }

    fn ends(&self) -> Result<&Ends, Error> {
        self.ends
            .as_ref()
            .ok_or_else(|| Error::Refused("only the starter holds the embedding and head".into()))
    }
}

/// Hidden states as the wire carries them: f32, little-endian.
pub(super) fn to_bytes(t: &Tensor) -> Result<Vec<u8>, Error> {
    let values = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(lime_kernels::Error::from)?;
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(out)
}
