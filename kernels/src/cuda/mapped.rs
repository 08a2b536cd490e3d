//! Layer slots in page-locked host memory mapped into the GPU, for integrated GPUs
//! (Jetsons) where the GPU reads the host's DRAM at full speed.
//!
//! A streamed layer is read from storage straight into the slot's own memory, and
//! the GPU computes on it there: no staging buffer, no device copy, and no second
//! copy of the layer in the one DRAM the device has. The tensors over the arena are
//! candle tensors whose storage candle did not allocate; the arena keeps a handle
//! to each and, when it goes, forgets those handles, so that candle never frees the
//! memory as a device allocation. The arena itself frees it, after the GPU is idle.
//!
//! Such a tensor must not outlive its arena, and candle's tensors are `Clone`: so
//! nothing here is public outside the crate, and the only holder of an arena is a
//! [`MappedSlot`], which owns the layer's tensors and the arena together and lends
//! the tensors out only by reference to the layer's own forward pass (whose views
//! of them end with it).

use crate::layout::{LayerWeights, WeightSpec};
use crate::{Checkpoint, Error, Result, StagingBuffer};
use candle_core::cuda::cudarc::driver::{sys, CudaStream, PinnedHostSlice};
use candle_core::cuda::{CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Storage, Tensor, TensorId};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Device allocations are 256-byte aligned; tensors in the arena are too.
const ALIGN: usize = 256;

/// A decoder layer's tensors in mapped memory, and that memory. The tensors are
/// declared first so that they drop before the arena that frees what is under them.
#[derive(Debug)]
pub(crate) struct MappedSlot {
    weights: LayerWeights<Tensor>,
    arena: MappedArena,
}

impl MappedSlot {
    /// Zeroed tensors of the layer `layout` describes, in `dtype`, in one arena
    /// sized for exactly them.
    pub(crate) fn new(
        layout: &LayerWeights<WeightSpec>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let bytes = layout
            .iter()
            .map(|w| footprint(w.elements() * dtype.size_in_bytes()))
            .sum();
        let mut arena = MappedArena::new(device, bytes)?;
        let weights = layout.try_map(|w| arena.tensor(&w.shape, dtype))?;
        Ok(Self { weights, arena })
    }

    /// The layer's tensors, for its forward pass.
    pub(crate) fn weights(&self) -> &LayerWeights<Tensor> {
        &self.weights
    }

    /// Reads the layer `layout` describes from storage straight into the slot.
    pub(crate) fn refill(
        &self,
        ckpt: &Checkpoint,
        layout: &LayerWeights<WeightSpec>,
        staging: &mut StagingBuffer,
    ) -> Result<()> {
        for (w, t) in layout.zip(&self.weights) {
            self.arena.fill(ckpt, &w.name, t, staging)?;
        }
        Ok(())
    }
}

/// One slot's worth of mapped memory and the tensors laid over it.
struct MappedArena {
    host: Mutex<PinnedHostSlice<u8>>,
    device_base: sys::CUdeviceptr,
    stream: Arc<CudaStream>,
    device: Device,
    used: usize,
    /// Byte range of each tensor made here, by tensor id.
    places: HashMap<TensorId, (usize, usize)>,
    /// A handle to every tensor made here: forgotten, never dropped (see above).
    handles: Vec<Tensor>,
}

impl std::fmt::Debug for MappedArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedArena")
            .field("used", &self.used)
            .field("tensors", &self.handles.len())
            .finish()
    }
}

/// Room `bytes` takes in an arena.
fn footprint(bytes: usize) -> usize {
    bytes.div_ceil(ALIGN) * ALIGN
}

impl MappedArena {
    /// `bytes` of zeroed, mapped, page-locked memory for tensors on `device`.
    fn new(device: &Device, bytes: usize) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(Error::Input(format!(
                "mapped memory is for a GPU, not {device:?}"
            )));
        };
        let stream = dev.cuda_stream();
        let ctx = stream.context().clone();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: the memory is zeroed below before anything can read it.
        let mut host = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes.max(1), flags) }.w()?;
        host.as_mut_slice().w()?.fill(0);
        let ptr = host.as_mut_ptr().w()?;
        let mut device_base: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is the start of a live allocation made with
        // `CU_MEMHOSTALLOC_DEVICEMAP` in this context, which is what the call needs;
        // it writes one device pointer into `device_base`.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_base, ptr.cast(), 0) }
            .result()
            .w()?;
        Ok(Self {
            host: Mutex::new(host),
            device_base,
            stream,
            device: device.clone(),
            used: 0,
            places: HashMap::new(),
            handles: Vec::new(),
        })
    }

    /// A zeroed tensor of `shape` and `dtype` in the arena.
    fn tensor(&mut self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let elems: usize = shape.iter().product();
        let bytes = elems * dtype.size_in_bytes();
        let room = self.host.lock().unwrap_or_else(|p| p.into_inner()).len();
        if self.used + footprint(bytes) > room {
            return Err(Error::Input(format!(
                "a mapped slot of {room} bytes has no room for a tensor of {bytes}"
            )));
        }
        let at = self.device_base + self.used as u64;
        let Device::Cuda(dev) = &self.device else {
            unreachable!("checked in new")
        };
        // SAFETY: `at..at + bytes` lies inside this arena's mapped allocation
        // (checked above), which outlives every use of the slice: the arena holds a
        // handle to the tensor and forgets it instead of dropping it, so the slice is
        // never freed as a device allocation (see `Drop`).
        let storage = unsafe {
            match dtype {
                DType::F32 => CudaStorage::wrap_cuda_slice(
                    self.stream.upgrade_device_ptr::<f32>(at, elems),
                    dev.clone(),
                ),
                DType::F16 => CudaStorage::wrap_cuda_slice(
                    self.stream.upgrade_device_ptr::<f16>(at, elems),
                    dev.clone(),
                ),
                DType::BF16 => CudaStorage::wrap_cuda_slice(
                    self.stream.upgrade_device_ptr::<bf16>(at, elems),
                    dev.clone(),
                ),
                other => return Err(Error::Input(format!("no mapped tensors of {other:?}"))),
            }
        };
        let tensor = Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false);
        self.places.insert(tensor.id(), (self.used, bytes));
        self.handles.push(tensor.clone());
        self.used += footprint(bytes);
        Ok(tensor)
    }

    /// Reads tensor `name` from storage straight into `dst`, a tensor of this
    /// arena. Waits first for the GPU to finish the kernels queued so far, which
    /// include every use of what `dst` held (a slot is refilled only after the
    /// pipeline has handed it back).
    fn fill(
        &self,
        ckpt: &Checkpoint,
        name: &str,
        dst: &Tensor,
        staging: &mut StagingBuffer,
    ) -> Result<()> {
        let &(at, len) = self.places.get(&dst.id()).ok_or_else(|| {
            Error::Input(format!(
                "tensor `{name}`'s destination is not in this mapped slot"
            ))
        })?;
        self.stream.synchronize().w()?;
        let mut host = self.host.lock().unwrap_or_else(|p| p.into_inner());
        let out = &mut host.as_mut_slice().w()?[at..at + len];
        let read = ckpt.read_stored(name, dst.dims(), dst.device(), out, staging)?;
        if read != len {
            return Err(Error::Input(format!(
                "tensor `{name}` has {read} bytes, its mapped slot {len}"
            )));
        }
        Ok(())
    }
}

impl Drop for MappedArena {
    fn drop(&mut self) {
        if let Err(e) = self.stream.synchronize() {
            tracing::error!(error = %e, "mapped slot: the GPU failed before the slot was freed");
        }
        // candle would free these as device allocations; the memory is the host
        // allocation in `host`, freed when it drops right after this.
        for handle in self.handles.drain(..) {
            std::mem::forget(handle);
        }
    }
}
