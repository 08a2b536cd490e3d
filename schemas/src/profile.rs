//! What the planner knows about the model and the hardware: the model's shape in
//! the units the cost model counts, each device's profile (measured by
//! `lime-stage --profile` or written by hand from published figures) and the links
//! between devices.
//!
//! Profiles are files (TOML or JSON) and are published retained on
//! `lime/profile/<stage>` by each stage, so the broker can plan from them.

use serde::{Deserialize, Serialize};

/// A decoder-only model as the cost model sees it: parameter counts and the sizes
/// that scale with tokens. Every layer is assumed to have the same shape (true of
/// every family lime loads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// A name for tables and for matching measured profiles.
    pub name: String,
    /// Decoder layers: what the planner cuts into chunks.
    pub layers: usize,
    /// Width of the hidden state: sets the bytes of activations on the wire.
    pub hidden: usize,
    /// Parameters of one decoder layer (projections, norms, biases).
    pub layer_params: u64,
    /// Parameters of the largest single tensor of a layer (sizes the read buffer).
    pub largest_tensor_params: u64,
    /// Parameters held only by the starter: embedding, final norm and the LM head
    /// (not counted twice when tied).
    pub end_params: u64,
    /// Parameters the LM head multiplies per token (the head's matrix).
    pub head_params: u64,
    /// Values cached per token per layer: keys and values, `2·kv_heads·head_dim`.
    pub kv_values_per_token: u64,
    /// f32 values of activation workspace per token of a micro-batch.
    pub activation_values_per_token: u64,
    /// f32 values of the rotary tables every stage holds.
    pub rope_values: u64,
    /// The longest sequence the model supports, in tokens: bounds the KV caches.
    pub max_context: usize,
    /// Bytes per parameter as stored in the checkpoint (2 for bf16/f16, 4 for f32).
    pub stored_dtype_bytes: u32,
}

impl ModelShape {
    /// Bytes read from storage to stream one layer.
    pub fn layer_read_bytes(&self) -> u64 {
        self.layer_params * self.stored_dtype_bytes as u64
    }

    /// Bytes of one decode activation (one token) on the wire: always f32.
    pub fn activation_wire_bytes(&self, tokens: usize) -> u64 {
        (tokens * self.hidden * 4) as u64
    }

    /// Whether a measured compute curve was taken on this model's layer shape.
    pub fn matches(&self, key: &ShapeKey) -> bool {
        self.layer_params == key.layer_params && self.hidden == key.hidden
    }

    /// What a measured compute curve records of this model, to be matched later.
    pub fn key(&self) -> ShapeKey {
        ShapeKey {
            name: self.name.clone(),
            layer_params: self.layer_params,
            hidden: self.hidden,
        }
    }
}

/// The layer shape a measured compute curve belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeKey {
    /// For people; matching looks only at the other two.
    pub name: String,
    /// Parameters of one decoder layer, as in [`ModelShape`].
    pub layer_params: u64,
    /// Hidden width, as in [`ModelShape`].
    pub hidden: usize,
}

/// Time to run something over a micro-batch of `tokens` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimePoint {
    /// Tokens in the micro-batch: sequences when decoding, prompt length when
    /// prefilling.
    pub tokens: usize,
    /// Wall-clock seconds measured.
    pub seconds: f64,
}

/// Compute times measured on one model's layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasuredCompute {
    /// The layer shape measured; other models fall back to the roofline.
    pub model: ShapeKey,
    /// One decoder layer, decode: `tokens` sequences of one token each.
    pub decode: Vec<TimePoint>,
    /// One decoder layer, prefill: one sequence of `tokens` tokens.
    #[serde(default)]
    pub prefill: Vec<TimePoint>,
    /// The starter's ends per pass (embedding, final norm, LM head, sampling),
    /// for `tokens` sequences.
    #[serde(default)]
    pub ends: Vec<TimePoint>,
}

/// One device: what it can hold, read and compute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    /// The device (the stage's name when published by a stage).
    pub name: String,
    /// What kind of device, for people.
    #[serde(default)]
    pub kind: String,
    /// Built from published specifications rather than measured here.
    #[serde(default)]
    pub estimate: bool,
    /// Where the figures come from.
    #[serde(default)]
    pub source: String,
    /// Memory lime may use on the device: weights, KV caches, buffers.
    pub memory_bytes: u64,
    /// Sustained storage read bandwidth for streamed layers.
    pub read_bytes_per_s: f64,
    /// Bytes per weight in memory; absent, the checkpoint's (a GPU computes in it,
    /// the CPU backend widens narrower dtypes to f32 exactly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_bytes: Option<u32>,
    /// Streamed layers go through an aligned read buffer (`O_DIRECT`).
    #[serde(default)]
    pub direct_io: bool,
    /// Effective memory bandwidth of the compute (weights streamed through it):
    /// decode at small batches is bound by it.
    pub memory_bandwidth_bytes_per_s: f64,
    /// Effective arithmetic rate: prefill and large batches are bound by it.
    pub flops: f64,
    /// Fixed cost per layer visit (kernel launches, synchronisation).
    #[serde(default)]
    pub layer_overhead_s: f64,
    /// Times measured on a particular model, preferred over the roofline for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<MeasuredCompute>,
    /// Where its data plane listens (`host:port`), when published by a stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_addr: Option<String>,
}

/// What a stage publishes retained on `lime/profile/<stage>`: its device and the
/// model it serves, everything the broker's planner needs from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageProfile {
    /// The hardware the stage runs on, measured or estimated.
    pub device: DeviceProfile,
    /// The checkpoint the stage loaded; the broker plans only when every stage's
    /// agrees.
    pub model: ModelShape,
}

impl From<(DeviceProfile, ModelShape)> for StageProfile {
    fn from((device, model): (DeviceProfile, ModelShape)) -> Self {
        Self { device, model }
    }
}

/// Why a profile cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("profile {name}: {reason}")]
pub struct ProfileError {
    /// The device or link the complaint is about.
    pub name: String,
    /// What is wrong, for whoever wrote the profile.
    pub reason: String,
}

impl DeviceProfile {
    /// Checks that every figure is usable by the cost model.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let fail = |reason: String| {
            Err(ProfileError {
                name: self.name.clone(),
                reason,
            })
        };
        if !crate::topics::is_topic_level(&self.name) {
            return fail("the name must be 1 to 128 characters without '/', '+' or '#'".into());
        }
        if self.memory_bytes == 0 {
            return fail("memory_bytes must be positive".into());
        }
        for (what, v) in [
            ("read_bytes_per_s", self.read_bytes_per_s),
            (
                "memory_bandwidth_bytes_per_s",
                self.memory_bandwidth_bytes_per_s,
            ),
            ("flops", self.flops),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return fail(format!("{what} must be a positive number, not {v}"));
            }
        }
        if !(self.layer_overhead_s.is_finite() && self.layer_overhead_s >= 0.0) {
            return fail("layer_overhead_s must be a non-negative number".into());
        }
        if let Some(b) = self.weight_bytes {
            if ![1, 2, 4, 8].contains(&b) {
                return fail(format!("weight_bytes must be 1, 2, 4 or 8, not {b}"));
            }
        }
        if let Some(m) = &self.measured {
            if m.decode.is_empty() {
                return fail("measured.decode has no points".into());
            }
            for p in m.decode.iter().chain(&m.prefill).chain(&m.ends) {
                if p.tokens == 0 || !(p.seconds.is_finite() && p.seconds >= 0.0) {
                    return fail(format!("bad measured point {p:?}"));
                }
            }
        }
        Ok(())
    }
}

/// One direction of a link between two devices.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpeed {
    /// Bandwidth in megabits per second (10^6 bits).
    pub mbit_per_s: f64,
    /// One-way latency in milliseconds.
    #[serde(default)]
    pub latency_ms: f64,
}

impl LinkSpeed {
    /// The bandwidth in bytes per second, the unit the cost model counts in.
    pub fn bytes_per_s(&self) -> f64 {
        self.mbit_per_s * 1e6 / 8.0
    }

    /// Time to deliver a frame of `bytes`.
    pub fn transfer_s(&self, bytes: u64) -> f64 {
        self.latency_ms / 1e3 + bytes as f64 / self.bytes_per_s()
    }
}

/// A link from one device to another (one direction, as activations flow).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// The sending device.
    pub from: String,
    /// The receiving device.
    pub to: String,
    /// Bandwidth in megabits per second (10^6 bits), as in [`LinkSpeed`].
    pub mbit_per_s: f64,
    /// One-way latency in milliseconds; 0 when not given.
    #[serde(default)]
    pub latency_ms: f64,
}

impl Link {
    /// The figures without the names, as [`Links::between`] returns them.
    pub fn speed(&self) -> LinkSpeed {
        LinkSpeed {
            mbit_per_s: self.mbit_per_s,
            latency_ms: self.latency_ms,
        }
    }
}

/// The network: a default for every pair and the exceptions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Links {
    /// Speed between every pair of devices not listed.
    pub default: LinkSpeed,
    /// The pairs that differ from the default (`[[link]]` tables in TOML).
    #[serde(default, rename = "link")]
    pub links: Vec<Link>,
}

impl Links {
    /// The same speed between every pair: one switch, or an emulated cluster.
    pub fn uniform(speed: LinkSpeed) -> Self {
        Self {
            default: speed,
            links: Vec::new(),
        }
    }

    /// The link `from → to` (the listed one, else the default).
    pub fn between(&self, from: &str, to: &str) -> LinkSpeed {
        self.links
            .iter()
            .find(|l| l.from == from && l.to == to)
            .map_or(self.default, Link::speed)
    }

    /// Checks that every speed is usable by the cost model: bandwidth positive,
    /// latency not negative.
    pub fn validate(&self) -> Result<(), ProfileError> {
        for (name, s) in std::iter::once(("default".to_owned(), self.default)).chain(
            self.links
                .iter()
                .map(|l| (format!("{} -> {}", l.from, l.to), l.speed())),
        ) {
            let usable = s.mbit_per_s.is_finite()
                && s.mbit_per_s > 0.0
                && s.latency_ms.is_finite()
                && s.latency_ms >= 0.0;
            if !usable {
                return Err(ProfileError {
                    name: format!("link {name}"),
                    reason: format!(
                        "bandwidth must be positive and latency non-negative ({} Mb/s, {} ms)",
                        s.mbit_per_s, s.latency_ms
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_fall_back_to_the_default() {
        let links: Links = serde_json::from_str(
            r#"{"default":{"mbit_per_s":1000,"latency_ms":0.5},
                "link":[{"from":"a","to":"b","mbit_per_s":100,"latency_ms":2}]}"#,
        )
        .unwrap();
        links.validate().unwrap();
        assert_eq!(links.between("a", "b").mbit_per_s, 100.0);
        assert_eq!(links.between("b", "a").mbit_per_s, 1000.0);
        let t = links.between("a", "b").transfer_s(12_500_000);
        assert!((t - 1.002).abs() < 1e-9, "{t}");
        assert!(serde_json::from_str::<Links>(r#"{"default":{"mbit_per_s":1,"x":1}}"#).is_err());
    }

    #[test]
    fn absurd_profiles_are_refused() {
        let mut p = DeviceProfile {
            name: "d".into(),
            kind: String::new(),
            estimate: true,
            source: String::new(),
            memory_bytes: 1 << 30,
            read_bytes_per_s: 1e9,
            weight_bytes: None,
            direct_io: false,
            memory_bandwidth_bytes_per_s: 1e11,
            flops: 1e12,
            layer_overhead_s: 0.0,
            measured: None,
            data_addr: None,
        };
        p.validate().unwrap();
        p.flops = f64::NAN;
        assert!(p.validate().unwrap_err().reason.contains("flops"));
        p.flops = 1e12;
        p.weight_bytes = Some(3);
        assert!(p.validate().is_err());
    }
}
