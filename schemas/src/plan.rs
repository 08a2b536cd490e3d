//! The plan: which stage runs which chunks, in what order around the ring.
//!
//! Stages are listed in ring order and the first is the starter. Chunks are listed in
//! model order and dealt round-robin: chunk `i` belongs to stage `i % stages`, so with
//! `k` chunks per stage (interleave degree `v = k`) a micro-batch goes round the ring
//! `v` times per token and every hop is always the same stage-to-successor link.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;

/// Decoder layers `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerRange {
    /// First layer of the range.
    pub start: usize,
    /// One past the last layer.
    pub end: usize,
}

impl LayerRange {
    /// From a standard range, for code that computes with those.
    pub fn new(range: Range<usize>) -> Self {
        Self {
            start: range.start,
            end: range.end,
        }
    }

    /// As a standard range, to iterate over or test for a layer.
    pub fn range(self) -> Range<usize> {
        self.start..self.end
    }

    /// Layers covered; 0 when `end` is not past `start`.
    pub fn len(self) -> usize {
        self.end.saturating_sub(self.start)
    }

    /// Whether no layer is covered (never so for a chunk of a valid plan).
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// The broker's instruction to the stages, retained and signed on
/// `lime/control/plan`: the ring's order and which stage runs which layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Increases with every new plan; the data-plane hello carries it so that stages
    /// on different plans never exchange activations.
    pub epoch: u64,
    /// Ring order; the first is the starter.
    pub stages: Vec<PlanStage>,
    /// Model order; chunk `i` belongs to `stages[i % stages.len()]`.
    pub chunks: Vec<PlanChunk>,
    /// Micro-batches the starter keeps in flight, when the planner chose it (a
    /// starter configured with its own `max_inflight` keeps that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<usize>,
    /// What the planner predicts for this plan, when a planner made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction: Option<PlanPrediction>,
    /// HMAC-SHA-256 (hex) of the plan without it, made with the ring key
    /// ([`crate::signing`]): stages with the key follow no plan without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// The planner's figures for a plan, carried with it so that operators and
/// benchmarks can hold the cluster to them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanPrediction {
    /// Seconds between two tokens of one sequence.
    pub time_per_token_s: f64,
    /// Tokens per second over all the sequences generating at once.
    pub tokens_per_s: f64,
    /// Seconds to the first token of a prompt of the planned workload's length.
    pub ttft_s: f64,
    /// Bursty: seconds until every sequence of a burst of the planned
    /// concurrency has its first token (all its prompts prefilled).
    #[serde(default)]
    pub burst_prefill_s: f64,
    /// The slowest link the plan was made for, Mb/s.
    pub slowest_link_mbit_per_s: f64,
    /// Why the planner made it: `"profiles"` for the first plan, else what
    /// changed.
    pub reason: String,
}

/// The planner's verdict on conditions that changed under the running plan,
/// published whether or not a new plan follows: an operator sees that a
/// bandwidth swing was weighed, and why the plan stayed when it did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanReview {
    /// The plan running when the change was weighed.
    pub epoch: u64,
    /// What changed, as a new plan's `reason` would say it.
    pub changes: String,
    /// Whether the running plan stays (else the next epoch is on its way).
    pub kept: bool,
    /// The running plan's figures under the new conditions, when the cost
    /// model can still evaluate it there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<PlanPrediction>,
    /// The best plan's figures under them.
    pub best: PlanPrediction,
    /// Seconds the switch would spend recomputing the cached tokens.
    pub rebuild_s: f64,
    /// Seconds of the faster plan's output that repay the rebuild; absent when
    /// the best plan is no faster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payback_s: Option<f64>,
}

/// One stage's place in the ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanStage {
    /// The stage's configured name, as in its `lime/status/<stage>` topic.
    pub name: String,
    /// `host:port` of its data-plane listener.
    pub data_addr: String,
    /// The layers this stage streams from storage instead of keeping resident;
    /// absent, the stage chooses them to fit its memory budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offloaded: Option<Vec<usize>>,
}

/// Consecutive layers and the stage that runs them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanChunk {
    /// The owning stage: the one the round-robin deal gives this chunk.
    pub stage: String,
    /// Decoder layers; each chunk starts where the one before it ends.
    pub layers: LayerRange,
}

/// Why a plan cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid plan (epoch {epoch}): {reason}")]
pub struct PlanError {
    /// The refused plan's epoch, to tell plans apart in logs.
    pub epoch: u64,
    /// What is wrong with it, for the operator.
    pub reason: String,
}

impl Plan {
    /// Chunks cut at `cuts` (layer indices, increasing, within `1..num_layers`) and
    /// dealt round-robin over `stages`.
    pub fn from_cuts(
        epoch: u64,
        stages: Vec<PlanStage>,
        cuts: &[usize],
        num_layers: usize,
    ) -> Result<Self, PlanError> {
        let mut bounds = Vec::with_capacity(cuts.len() + 2);
        bounds.push(0);
        bounds.extend_from_slice(cuts);
        bounds.push(num_layers);
        let chunks = bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| PlanChunk {
                stage: stages
                    .get(i % stages.len().max(1))
                    .map(|s| s.name.clone())
                    .unwrap_or_default(),
                layers: LayerRange {
                    start: w[0],
                    end: w[1],
                },
            })
            .collect();
        let plan = Self {
            epoch,
            stages,
            chunks,
            max_inflight: None,
            prediction: None,
            signature: None,
        };
        plan.validate(num_layers)?;
        Ok(plan)
    }

    /// Layers split as evenly as possible into `interleave` chunks per stage.
    pub fn even(
        epoch: u64,
        stages: Vec<PlanStage>,
        interleave: usize,
        num_layers: usize,
    ) -> Result<Self, PlanError> {
        let n = stages.len() * interleave;
        if n == 0 || n > num_layers {
            return Err(PlanError {
                epoch,
                reason: format!(
                    "{} stages with {interleave} chunks each cannot split {num_layers} layers",
                    stages.len()
                ),
            });
        }
        let cuts: Vec<usize> = (1..n).map(|i| i * num_layers / n).collect();
        Self::from_cuts(epoch, stages, &cuts, num_layers)
    }

    /// Checks that the plan covers `0..num_layers` exactly, in order, with the
    /// round-robin ownership, and that names and addresses are usable.
    pub fn validate(&self, num_layers: usize) -> Result<(), PlanError> {
        let fail = |reason: String| {
            Err(PlanError {
                epoch: self.epoch,
                reason,
            })
        };
        if self.stages.is_empty() {
            return fail("no stages".into());
        }
        for (i, s) in self.stages.iter().enumerate() {
            if !crate::topics::is_topic_level(&s.name) {
                return fail(format!("stage name {:?} is not a usable name", s.name));
            }
            if self.stages[..i].iter().any(|o| o.name == s.name) {
                return fail(format!("stage {} is listed twice", s.name));
            }
            if self.stages.len() > 1 && s.data_addr.parse::<std::net::SocketAddr>().is_err() {
                return fail(format!(
                    "stage {}: data_addr {:?} is not host:port",
                    s.name, s.data_addr
                ));
            }
        }
        if self.chunks.is_empty() || !self.chunks.len().is_multiple_of(self.stages.len()) {
            return fail(format!(
                "{} chunks cannot be dealt evenly over {} stages",
                self.chunks.len(),
                self.stages.len()
            ));
        }
        let mut next = 0;
        for (i, c) in self.chunks.iter().enumerate() {
            let owner = &self.stages[i % self.stages.len()].name;
            if &c.stage != owner {
                return fail(format!(
                    "chunk {i} ({}) belongs to {} but the ring order gives it to {owner}",
                    c.layers, c.stage
                ));
            }
            if c.layers.start != next || c.layers.is_empty() {
                return fail(format!(
                    "chunk {i} is {} but should start at layer {next} and be non-empty",
                    c.layers
                ));
            }
            next = c.layers.end;
        }
        if next != num_layers {
            return fail(format!(
                "chunks end at layer {next}, the model has {num_layers}"
            ));
        }
        for s in &self.stages {
            let owned = self.chunks_of(&s.name);
            for &layer in s.offloaded.iter().flatten() {
                if !owned.iter().any(|(_, r)| r.range().contains(&layer)) {
                    return fail(format!(
                        "stage {} offloads layer {layer}, which none of its chunks holds",
                        s.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// The stage that owns the ends of the model (none only in an invalid plan).
    pub fn starter(&self) -> Option<&PlanStage> {
        self.stages.first()
    }

    /// Where `stage` sits in the ring.
    pub fn position(&self, stage: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == stage)
    }

    /// The stage `stage` sends to.
    pub fn successor(&self, stage: &str) -> Option<&PlanStage> {
        let i = self.position(stage)?;
        self.stages.get((i + 1) % self.stages.len())
    }

    /// The stage `stage` receives from.
    pub fn predecessor(&self, stage: &str) -> Option<&PlanStage> {
        let i = self.position(stage)?;
        self.stages
            .get((i + self.stages.len() - 1) % self.stages.len())
    }

    /// `(chunk index, layers)` of every chunk `stage` owns, in ring order.
    pub fn chunks_of(&self, stage: &str) -> Vec<(usize, LayerRange)> {
        self.chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.stage == stage)
            .map(|(i, c)| (i, c.layers))
            .collect()
    }

    /// Chunks per stage.
    pub fn interleave(&self) -> usize {
        self.chunks.len() / self.stages.len().max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stages(n: usize) -> Vec<PlanStage> {
        (0..n)
            .map(|i| PlanStage {
                name: format!("s{i}"),
                data_addr: format!("127.0.0.1:{}", 7000 + i),
                offloaded: None,
            })
            .collect()
    }

    #[test]
    fn even_plans_cover_every_layer() {
        for n in 1..=4 {
            for v in 1..=3 {
                let p = Plan::even(1, stages(n), v, 12).unwrap();
                assert_eq!(p.chunks.len(), n * v);
                assert_eq!(p.interleave(), v);
                let total: usize = p.chunks.iter().map(|c| c.layers.len()).sum();
                assert_eq!(total, 12);
            }
        }
    }

    #[test]
    fn ring_neighbours() {
        let p = Plan::even(1, stages(3), 2, 12).unwrap();
        assert_eq!(p.successor("s2").unwrap().name, "s0");
        assert_eq!(p.predecessor("s0").unwrap().name, "s2");
        let mine: Vec<usize> = p.chunks_of("s1").iter().map(|c| c.0).collect();
        assert_eq!(mine, vec![1, 4]);
    }

    #[test]
    fn bad_plans_are_refused() {
        assert!(Plan::from_cuts(1, stages(2), &[3], 12).is_ok());
        assert!(
            Plan::from_cuts(1, stages(2), &[3, 5], 12).is_err(),
            "3 chunks, 2 stages"
        );
        assert!(
            Plan::from_cuts(1, stages(2), &[0], 12).is_err(),
            "empty chunk"
        );
        assert!(
            Plan::from_cuts(1, stages(2), &[13], 12).is_err(),
            "past the end"
        );
        let mut p = Plan::even(1, stages(2), 1, 12).unwrap();
        p.chunks.swap(0, 1);
        assert!(p.validate(12).unwrap_err().reason.contains("ring order"));
        let mut p = Plan::even(1, stages(2), 1, 12).unwrap();
        p.stages[1].data_addr = "nowhere".into();
        assert!(p.validate(12).is_err());
        assert!(Plan::even(1, stages(1), 1, 10)
            .unwrap()
            .validate(12)
            .is_err());
    }
}
