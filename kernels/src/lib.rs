//! lime's model math.
//!
//! A checkpoint is read one tensor at a time ([`Checkpoint`]), so any subset of the
//! decoder layers can be loaded ([`DecoderLayer`], [`LayerStack`]) and dropped
//! independently. A forward pass runs a [`MicroBatch`] of sequences, each at its own
//! position with its own preallocated [`KvCache`]. On the CPU every weight is widened
//! exactly to f32; on a GPU (the `cuda` feature) weights stay in the checkpoint's
//! dtype, bf16 and f16 natively. Nothing is ever quantized or narrowed.

pub mod accelerator;
pub mod batch;
mod causal_attention;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod generate;
mod kv_append;
pub mod kv_cache;
pub mod layout;
pub mod llama;
pub mod model;
mod rms_norm;
pub mod rope;
mod rowwise;
pub mod sampling;
pub mod storage;
pub mod synth;
pub mod text;

pub use accelerator::{DeviceSpec, GpuTraits, LoadPath, Placement};
pub use batch::{MicroBatch, SeqSpan};
pub use checkpoint::Checkpoint;
pub use config::{Architecture, Config, RopeScaling};
pub use error::{Error, Result};
pub use generate::{generate, FinishReason, GenerateRequest, Generation};
pub use kv_cache::KvCache;
pub use layout::{EndWeights, LayerWeights, WeightSpec};
pub use llama::{DecoderLayer, Embedding, Head};
pub use model::{LayerStack, Model};
pub use rope::Rope;
pub use sampling::Sampler;
pub use storage::{ReadOptions, StagingBuffer};
pub use text::{TextStream, TextTokenizer};

pub use candle_core::{DType, Device, Tensor};

/// Helpers the unit tests share.
#[cfg(test)]
mod test_support {
    use candle_core::{DType, Device, Tensor};

    /// A tensor's values on the host, widened to f32, in row-major order.
    pub(crate) fn f32_values(t: &Tensor) -> Vec<f32> {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("a tensor's values")
    }
}
