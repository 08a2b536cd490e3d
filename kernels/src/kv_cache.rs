//! Per-sequence key/value caches, preallocated to the sequence's capacity so that
//! decoding writes each new token in place instead of growing tensors.

use crate::{Config, Error, Result};
use candle_core::{DType, Device, Tensor};

/// Keys and values of one layer for one sequence: `[kv_heads, capacity, head_dim]` each.
#[derive(Debug)]
pub(crate) struct LayerKv {
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
    pub(crate) len: usize,
}

/// One sequence's cache for the layers a process runs (any subset of the model).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    capacity: usize,
    bytes: usize,
}

impl KvCache {
    /// Allocates room for `capacity` tokens in each of `layers`.
    pub fn new(
        cfg: &Config,
        layers: impl IntoIterator<Item = usize>,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if capacity == 0 || capacity > cfg.max_context() {
            return Err(Error::Input(format!(
                "KV capacity {capacity} is outside 1..={} (the model's context)",
                cfg.max_context()
            )));
        }
        let mut slots: Vec<Option<LayerKv>> = (0..cfg.num_hidden_layers).map(|_| None).collect();
        let shape = (cfg.num_key_value_heads, capacity, cfg.head_dim);
        let mut bytes = 0;
        for layer in layers {
            let slot = slots.get_mut(layer).ok_or_else(|| {
                Error::Input(format!(
                    "layer {layer} does not exist in a {}-layer model",
                    cfg.num_hidden_layers
                ))
            })?;
            let k = Tensor::zeros(shape, dtype, device)?;
            let v = Tensor::zeros(shape, dtype, device)?;
            bytes += 2 * k.elem_count() * dtype.size_in_bytes();
            *slot = Some(LayerKv { k, v, len: 0 });
        }
        Ok(Self {
            layers: slots,
            capacity,
            bytes,
        })
    }

    /// Tokens this cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes allocated for keys and values.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Tokens cached so far for `layer`, or `None` if this cache does not hold it.
    pub fn len(&self, layer: usize) -> Option<usize> {
        self.layers.get(layer)?.as_ref().map(|l| l.len)
    }

    /// Forgets the cached tokens of `layers` (those this cache holds): the
    /// sequence is computed again from its first token there.
    pub fn clear_layers(&mut self, layers: std::ops::Range<usize>) {
        for l in self
            .layers
            .iter_mut()
            .skip(layers.start)
            .take(layers.len())
            .flatten()
        {
            l.len = 0;
        }
    }

    /// Forgets every cached token, keeping the allocation for the next sequence.
    pub fn clear(&mut self) {
        for l in self.layers.iter_mut().flatten() {
            l.len = 0;
        }
    }

    pub(crate) fn layer_mut(&mut self, layer: usize) -> Result<&mut LayerKv> {
        self.layers
            .get_mut(layer)
            .and_then(|l| l.as_mut())
            .ok_or_else(|| Error::Input(format!("this KV cache does not hold layer {layer}")))
    }
}
