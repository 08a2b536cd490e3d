//! A stage's retained `lime/status/<stage>` document: who it is, what it holds,
//! whether it is up. The last will publishes the same document with `offline`.

use crate::plan::LayerRange;
use serde::{Deserialize, Serialize};

/// Where a stage is in its life, so that readers can tell a starting stage
/// from a gone one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    /// Connected, loading weights or waiting for a plan.
    Starting,
    /// Serving: weights loaded and, at the starter, the ring closed.
    Online,
    /// Gone (last will) or shut down.
    Offline,
}

/// What the plan makes a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Owns tokenizer, embedding, head, sampling and the request queue.
    Starter,
    /// Runs only its chunks' layers and passes the activations on.
    Secondary,
}

/// What a stage keeps retained on `lime/status/<stage>`, republished whenever
/// it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageStatus {
    /// The stage's name, as in its topic.
    pub stage: String,
    /// Its life-cycle state; the last will sets `offline`.
    pub state: StageState,
    /// Its part in the current plan; absent until it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Epoch of the plan the stage runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// The layer ranges of the chunks it owns, in ring order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<LayerRange>,
    /// What it holds now; absent until its weights are loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryUse>,
    /// Where its data-plane listener accepts the ring's previous hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_addr: Option<String>,
    /// Its process id on its host, for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The lime-stage crate version, to spot mixed versions in one ring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl StageStatus {
    /// The last will: nothing but the name and `offline`.
    pub fn offline(stage: &str) -> Self {
        Self {
            stage: stage.to_owned(),
            state: StageState::Offline,
            role: None,
            epoch: None,
            chunks: Vec::new(),
            memory: None,
            data_addr: None,
            pid: None,
            version: None,
        }
    }
}

/// Bytes a stage holds, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryUse {
    /// Weights kept in memory: resident layers, and the ends at the starter.
    pub weights_bytes: u64,
    /// KV caches of the admitted sequences.
    pub kv_bytes: u64,
    /// Sequences now admitted, whose caches `kv_bytes` counts.
    pub sequences: u32,
}
