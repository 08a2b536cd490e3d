//! `lime/telemetry/<stage>`: what a stage measures about itself, published
//! periodically (retained) for the planner, `lime status` and `lime bench`.
//!
//! Times and byte counts are cumulative since the stage started, so a reader takes
//! the difference of two reports to measure an interval.

use serde::{Deserialize, Serialize};

/// A stage's periodic account of itself, retained on `lime/telemetry/<stage>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// The reporting stage.
    pub stage: String,
    /// The plan the stage ran when it reported, so that readers can drop figures
    /// from an older layout.
    pub epoch: u64,
    /// Increments with every report, so readers can wait for a fresh one.
    pub report: u64,
    /// Bytes held against the budget.
    pub memory: MemoryReport,
    /// Which layers are kept and which streamed.
    pub residency: ResidencyReport,
    /// Where the stage's time went.
    pub time: StageTime,
    /// What the stage read from its checkpoint.
    pub loads: LoadReport,
    /// The link to the next stage, measured by this stage from the data plane's
    /// large frames and from probes while the link is idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_out: Option<LinkMeasurement>,
    /// Sequences still recomputing their KV caches after a plan change (the
    /// starter only): the switch costs throughput until this is back to 0.
    #[serde(default)]
    pub rebuilding: u32,
    /// Tokens in the KV caches of the sequences generating (the starter only):
    /// what a plan change would have to recompute.
    #[serde(default)]
    pub context_tokens: u64,
}

/// A data-plane link as its sender measured it: the median of the recent
/// samples. Bandwidth comes from how long a large frame's bytes took to arrive
/// (the receiver's clock, reported back); latency is half a probe's round trip
/// less that transfer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkMeasurement {
    /// The receiving stage.
    pub to: String,
    /// The smallest recent probe round trip, in milliseconds: the others waited
    /// behind activations.
    pub rtt_ms: f64,
    /// Bandwidth in megabits per second (10^6 bits), from timed large frames.
    pub mbit_per_s: f64,
    /// Samples behind the figures.
    pub samples: u32,
    /// Age of the newest sample.
    pub age_ms: u64,
}

/// The memory budget and everything accounted against it, in bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// `None`: no budget, every layer resident.
    pub budget_bytes: Option<u64>,
    /// Of the budget, what the stage reserves for the process itself (not
    /// accounted term by term): the account's limit is the budget less this.
    #[serde(default)]
    pub overhead_bytes: u64,
    /// Resident layers, plus the embedding and head at the starter and the rotary
    /// tables.
    pub weights_bytes: u64,
    /// Layer slots for streamed layers and the raw read buffer.
    pub staging_bytes: u64,
    /// KV caches of the sequences held here.
    pub kv_bytes: u64,
    /// The workspace reserved for the largest micro-batch the stage computes.
    pub activation_bytes: u64,
    /// The sum of the above.
    pub accounted_bytes: u64,
    /// The largest sum seen since start.
    pub peak_accounted_bytes: u64,
    /// Resident set size of the process (Linux).
    pub rss_bytes: Option<u64>,
    /// The high-water mark of `rss_bytes`.
    pub peak_rss_bytes: Option<u64>,
    /// Sequences holding KV caches here.
    pub sequences: u32,
}

/// Which layers stay in memory and how the rest are streamed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResidencyReport {
    /// Layers kept in memory rather than streamed.
    pub resident: Vec<usize>,
    /// In the order the stage visits them; the offload depth is its length.
    pub offloaded: Vec<usize>,
    /// Streamed layers that may be in memory at once.
    pub slots: usize,
    /// Whether the next offloaded layer is read ahead of need.
    pub prefetch: bool,
    /// Streamed layers are read with `O_DIRECT`, bypassing the page cache.
    pub direct_io: bool,
    /// Emulated storage bandwidth, when reads are paced.
    pub read_limit_bytes_per_s: Option<u64>,
    /// Layers moved out of memory to make room for KV caches, since start.
    #[serde(default)]
    pub evictions: u64,
    /// Evicted layers brought back when the room freed, since start.
    #[serde(default)]
    pub restorations: u64,
    /// Visits to a streamed layer that found it kept from an earlier
    /// micro-batch of the same round, and so read nothing, since start.
    #[serde(default)]
    pub shared_visits: u64,
}

/// Where the stage's wall-clock time went, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTime {
    /// Running layers, the embedding, the head and sampling.
    pub compute_s: f64,
    /// Waiting for a streamed layer's weights: the loading bubble.
    pub load_wait_s: f64,
    /// Waiting for activations while sequences are in flight (the network and the
    /// other stages' work).
    pub network_wait_s: f64,
    /// Nothing in flight.
    pub idle_s: f64,
}

impl StageTime {
    /// The time accounted, which the four shares divide.
    pub fn total_s(&self) -> f64 {
        self.compute_s + self.load_wait_s + self.network_wait_s + self.idle_s
    }

    /// The change from `earlier` to `self`.
    pub fn since(&self, earlier: &StageTime) -> StageTime {
        StageTime {
            compute_s: self.compute_s - earlier.compute_s,
            load_wait_s: self.load_wait_s - earlier.load_wait_s,
            network_wait_s: self.network_wait_s - earlier.network_wait_s,
            idle_s: self.idle_s - earlier.idle_s,
        }
    }
}

/// Reads of streamed layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Streamed layer reads completed since start.
    pub layers_read: u64,
    /// Every byte read from the checkpoint since start, the initial load included.
    pub bytes_read: u64,
    /// Seconds the loader spent reading streamed layers.
    pub read_busy_s: f64,
    /// Of them, seconds the loader thread ran on a CPU (copies out of the page
    /// cache, conversion): what streaming takes from compute.
    #[serde(default)]
    pub read_cpu_s: f64,
    /// Bytes of streamed layers read.
    pub streamed_bytes: u64,
    /// The loader's read bandwidth over its recent reads, in MB/s (10^6 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_mb_per_s: Option<f64>,
}
