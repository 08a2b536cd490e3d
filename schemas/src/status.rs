//! A stage's retained `lime/status/<stage>` document: who it is, what it holds,
//! whether it is up. The last will publishes the same document with `offline`.

use crate::plan::LayerRange;
use serde::{Deserialize, Serialize};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Owns tokenizer, embedding, head, sampling and the request queue.
    Starter,
    Secondary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageStatus {
    pub stage: String,
    pub state: StageState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Epoch of the plan the stage runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// The layer ranges of the chunks it owns, in ring order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<LayerRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryUse>,
    /// Where its data-plane listener accepts the ring's previous hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
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
    pub weights_bytes: u64,
    pub kv_bytes: u64,
    /// KV bytes of the sequences now admitted.
    pub sequences: u32,
}
