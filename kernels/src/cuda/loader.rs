//! Streaming weights from storage into a GPU layer slot while the GPU computes.
//!
//! Each tensor is read into one of two page-locked host buffers and copied to the
//! slot on the loader's own stream: the read of tensor `i + 1` overlaps the copy of
//! tensor `i`, and both overlap whatever the compute stream is running. Ordering
//! with the compute stream is cudarc's per-allocation event tracking: the copy into
//! a slot waits for the kernels still reading its previous layer, and kernels
//! reading the new layer wait for the copy.
//!
//! This is the path of discrete GPUs. On an integrated GPU (a Jetson) slots live in
//! mapped host memory instead and are read into in place ([`super::mapped`]), so
//! no loader is made there.

use crate::accelerator::{GpuTraits, LoadPath};
use crate::{Checkpoint, Error, Result, StagingBuffer};
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{
    result, sys, CudaEvent, CudaStream, DevicePtrMut, PinnedHostSlice,
};
use candle_core::cuda::{CudaStorage, WrapErr};
use candle_core::{DType, Device, InplaceOp1, Layout, Tensor};
use half::{bf16, f16};
use std::sync::Arc;

/// Page-locked buffers and the copy stream of one loader thread.
pub struct DeviceLoader {
    device: Device,
    copy: Arc<CudaStream>,
    buffers: [Buffer; 2],
    next: usize,
    path: LoadPath,
}

struct Buffer {
    host: PinnedHostSlice<u8>,
    /// Recorded on the copy stream after the last copy out of `host`.
    copied: Option<CudaEvent>,
}

impl std::fmt::Debug for DeviceLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLoader")
            .field("device", &self.device)
            .field("buffer_bytes", &self.buffers[0].host.len())
            .field("path", &self.path)
            .finish()
    }
}

impl DeviceLoader {
    /// A loader for `device` able to stream tensors of up to `largest` bytes.
    pub fn new(device: &Device, largest: usize) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(Error::Input(format!(
                "a GPU loader needs a GPU, not {device:?}"
            )));
        };
        let traits = GpuTraits::query(device)?;
        let path = traits.load_path();
        let ctx = dev.cuda_stream().context().clone();
        let copy = ctx.new_stream().w()?;
        let flags = match path {
            LoadPath::Mapped => sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
            // Write-combined: the CPU only writes these and the copy engine reads
            // them, so they need not pollute the CPU's caches.
            LoadPath::PinnedCopy => {
                sys::CU_MEMHOSTALLOC_WRITECOMBINED | sys::CU_MEMHOSTALLOC_PORTABLE
            }
        };
        let alloc = || -> Result<Buffer> {
            // SAFETY: the memory is written (by a storage read) before any copy
            // reads it; `fill` copies only the bytes the read produced.
            let host = unsafe { ctx.alloc_pinned_with_flags::<u8>(largest.max(1), flags) }.w()?;
            Ok(Buffer { host, copied: None })
        };
        tracing::info!(
            gpu = %traits.name,
            integrated = traits.integrated,
            ?path,
            buffer_mb = largest >> 20,
            "GPU layer loader"
        );
        Ok(Self {
            device: device.clone(),
            copy,
            buffers: [alloc()?, alloc()?],
            next: 0,
            path,
        })
    }

    /// How this loader moves bytes to the GPU.
    pub fn load_path(&self) -> LoadPath {
        self.path
    }

    /// Page-locked bytes held.
    pub fn bytes(&self) -> usize {
        self.buffers.iter().map(|b| b.host.len()).sum()
    }

    /// Reads tensor `name` into `dst`, a GPU tensor of its shape and stored dtype,
    /// returning once the copy is queued (not finished).
    pub fn fill(
        &mut self,
        ckpt: &Checkpoint,
        name: &str,
        dst: &Tensor,
        staging: &mut StagingBuffer,
    ) -> Result<()> {
        if !dst.device().same_device(&self.device) {
            return Err(Error::Input(format!(
                "tensor `{name}` is on {:?}, this loader serves {:?}",
                dst.device(),
                self.device
            )));
        }
        let buffer = &mut self.buffers[self.next];
        self.next = 1 - self.next;
        if let Some(copied) = buffer.copied.take() {
            copied.synchronize().w()?;
        }
        let host = buffer.host.as_mut_slice().w()?;
        let len = ckpt.read_stored(name, dst.dims(), dst.device(), host, staging)?;
        dst.inplace_op1(&CopyIn {
            bytes: &host[..len],
            stream: &self.copy,
        })?;
        buffer.copied = Some(self.copy.record_event(None).w()?);
        Ok(())
    }

    /// Waits for every queued copy (for timing a load end to end).
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.copy.synchronize().w()?)
    }
}

impl Drop for DeviceLoader {
    fn drop(&mut self) {
        // The buffers are freed next: no copy may still be reading them.
        if let Err(e) = self.copy.synchronize() {
            tracing::error!(error = %e, "GPU loader: copy stream failed at shutdown");
        }
    }
}

/// Queues the copy of page-locked `bytes` into a GPU tensor's storage on `stream`.
struct CopyIn<'a> {
    bytes: &'a [u8],
    stream: &'a Arc<CudaStream>,
}

impl InplaceOp1 for CopyIn<'_> {
    fn name(&self) -> &'static str {
        "lime-copy-in"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("lime-copy-in copies into GPU tensors only")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("lime-copy-in needs a contiguous tensor");
        };
        macro_rules! copy {
            ($t:ty) => {{
                if (end - start) * std::mem::size_of::<$t>() != self.bytes.len() {
                    candle_core::bail!(
                        "lime-copy-in: {} bytes for a tensor of {} elements",
                        self.bytes.len(),
                        end - start
                    );
                }
                let mut view = storage.as_cuda_slice_mut::<$t>()?.slice_mut(start..end);
                // Waits (on the copy stream) for the kernels still using the old
                // contents; dropping `_sync` records the write for later readers.
                let (ptr, _sync) = view.device_ptr_mut(self.stream);
                // SAFETY: `ptr` addresses `end - start` elements of `$t`, exactly
                // `bytes.len()` bytes (checked above). `bytes` is page-locked memory
                // owned by the loader, which neither writes nor frees it before the
                // event recorded after this copy has completed (see `fill` and
                // `Drop`).
                unsafe { result::memcpy_htod_async(ptr, self.bytes, self.stream.cu_stream()) }
                    .w()?;
            }};
        }
        match storage.dtype() {
            DType::F32 => copy!(f32),
            DType::F16 => copy!(f16),
            DType::BF16 => copy!(bf16),
            other => candle_core::bail!("lime-copy-in of {other:?} is not supported"),
        }
        Ok(())
    }
}
