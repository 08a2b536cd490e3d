//! lime's CUDA side: its own kernels (`lime.cu`), compiled once per process by
//! NVRTC and loaded into each GPU through candle's module cache, and the loader
//! that streams layers into GPU memory ([`loader`]).
//!
//! Compiling at run time keeps the build free of a second nvcc step and lets the
//! driver generate code for whichever GPU it finds, a Jetson's sm_87 or an H200's
//! sm_90.

pub mod loader;
pub(crate) mod mapped;

use crate::kv_append::Placement;
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda::{cudarc, CudaDevice, CudaStorage, WrapErr};
use candle_core::{Layout, Shape};
use half::{bf16, f16};
use std::sync::OnceLock;

const SOURCE: &str = include_str!("lime.cu");
const MODULE: &str = "lime-kernels";
/// Threads per row of a norm: eight warps cover a 4096-wide row in 16 steps.
const NORM_THREADS: u32 = 256;
const COPY_THREADS: u32 = 256;

/// The kernels' PTX, compiled on first use. NVRTC needs no GPU, so a failure here
/// is a bug in `lime.cu` and says so.
pub fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let _span = tracing::info_span!("nvrtc_compile", module = MODULE).entered();
        cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|ptx| ptx.to_src())
            .map_err(|e| format!("compiling lime.cu with NVRTC: {e}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Cuda(e.clone().into()))
}

fn launch_rows(rows: usize) -> candle_core::Result<LaunchConfig> {
    let rows = u32::try_from(rows)
        .ok()
        .filter(|&r| r > 0)
        .ok_or_else(|| candle_core::Error::Msg(format!("cannot launch over {rows} rows")))?;
    Ok(LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (NORM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn small(v: usize, what: &str) -> candle_core::Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} {v} exceeds 32 bits")))
}

/// The fused RMSNorm of [`crate::rms_norm::RmsNormOp`], one block per row.
pub(crate) fn rms_norm(
    eps: f32,
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (hidden, (x0, x1), (w0, w1)) = crate::rms_norm::operands(xl, wl)?;
    let dev = xs.device.clone();
    let cfg = launch_rows((x1 - x0) / hidden)?;
    let hidden_arg = small(hidden, "row length")? as i32;
    macro_rules! run {
        ($t:ty, $name:literal) => {{
            let x = xs.as_cuda_slice::<$t>()?.slice(x0..x1);
            let w = ws.as_cuda_slice::<$t>()?.slice(w0..w1);
            // SAFETY: every element is written by the kernel before it is read.
            let out = unsafe { dev.alloc::<$t>(x1 - x0)? };
            let func = dev.get_or_load_custom_func($name, MODULE, ptx()?)?;
            let mut b = func.builder();
            b.arg(&x).arg(&w).arg(&out).arg(&hidden_arg).arg(&eps);
            // SAFETY: the argument list matches `rms_norm_*` in lime.cu; `x` and
            // `out` hold `rows × hidden` elements and `w` holds `hidden`, checked by
            // `operands`, and the grid has one block per row.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match (xs.dtype(), ws.dtype()) {
        (candle_core::DType::F32, candle_core::DType::F32) => run!(f32, "rms_norm_f32"),
        (candle_core::DType::F16, candle_core::DType::F16) => run!(f16, "rms_norm_f16"),
        (candle_core::DType::BF16, candle_core::DType::BF16) => run!(bf16, "rms_norm_bf16"),
        (x, w) => candle_core::bail!("rms-norm of {x:?} rows with a {w:?} weight"),
    };
    Ok((out, xl.shape().clone()))
}

/// The cache append of [`crate::kv_append::KvAppend`], one thread per element.
pub(crate) fn kv_append(
    cache: &mut CudaStorage,
    src: &CudaStorage,
    p: &Placement,
) -> candle_core::Result<()> {
    if cache.dtype() != src.dtype() {
        candle_core::bail!(
            "kv-append of {:?} rows into a {:?} cache",
            src.dtype(),
            cache.dtype()
        );
    }
    let dev: CudaDevice = cache.device.clone();
    let elems = p.src.1 - p.src.0;
    if elems == 0 {
        return Ok(());
    }
    let args = [
        small(p.n, "token count")?,
        small(p.heads, "head count")?,
        small(p.dim, "head dim")?,
        small(p.capacity, "capacity")?,
        small(p.pos, "position")?,
    ];
    let cfg = LaunchConfig {
        grid_dim: (
            small(elems.div_ceil(COPY_THREADS as usize), "grid")?.min(65_535),
            1,
            1,
        ),
        block_dim: (COPY_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    macro_rules! run {
        ($t:ty, $name:literal) => {{
            let s = src.as_cuda_slice::<$t>()?.slice(p.src.0..p.src.1);
            let mut c = cache
                .as_cuda_slice_mut::<$t>()?
                .slice_mut(p.cache.0..p.cache.1);
            let func = dev.get_or_load_custom_func($name, MODULE, ptx()?)?;
            let mut b = func.builder();
            b.arg(&s).arg(&mut c);
            for a in &args {
                b.arg(a);
            }
            // SAFETY: the argument list matches `kv_append_b*` in lime.cu, whose
            // element width equals `$t`'s; `place` checked that rows `pos..pos + n`
            // of every head lie inside the cache, and the grid-stride loop stops at
            // the source's `n × heads × dim` elements.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match cache.dtype() {
        candle_core::DType::F32 => run!(f32, "kv_append_b32"),
        candle_core::DType::F16 => run!(f16, "kv_append_b16"),
        candle_core::DType::BF16 => run!(bf16, "kv_append_b16"),
        other => candle_core::bail!("kv-append of {other:?} is not supported"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// NVRTC runs without a GPU: every kernel of lime.cu compiles and is exported
    /// under the name the launches use.
    #[test]
    fn the_kernels_compile_and_export_their_entry_points() {
        let ptx = super::ptx().expect("lime.cu compiles");
        for name in [
            "rms_norm_f32",
            "rms_norm_f16",
            "rms_norm_bf16",
            "kv_append_b16",
            "kv_append_b32",
        ] {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{name} missing from the PTX"
            );
        }
    }

    /// The GPU kernels against their CPU twins; needs a GPU (`field-tests/gpu.sh`).
    mod on_gpu {
        use crate::kv_append::KvAppend;
        use crate::rms_norm::RmsNormOp;
        use candle_core::{DType, Device, Tensor};

        fn gpu() -> Device {
            Device::new_cuda(0).expect("these tests need a GPU")
        }

        use crate::test_support::f32_values as values;

        #[test]
        fn fused_norm_matches_its_cpu_twin() {
            let (gpu, cpu) = (gpu(), Device::Cpu);
            for hidden in [64, 1000, 4096, 8192] {
                let x = Tensor::randn(0f32, 2.0, (7, hidden), &cpu).unwrap();
                let w = Tensor::randn(1f32, 0.1, hidden, &cpu).unwrap();
                for (dtype, tol) in [(DType::F32, 1e-6), (DType::F16, 1e-3), (DType::BF16, 8e-3)] {
                    let (x, w) = (x.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
                    let op = RmsNormOp { eps: 1e-5 };
                    let want = values(&x.apply_op2_no_bwd(&w, &op).unwrap());
                    let got = values(
                        &x.to_device(&gpu)
                            .unwrap()
                            .apply_op2_no_bwd(&w.to_device(&gpu).unwrap(), &op)
                            .unwrap(),
                    );
                    // The sums differ in order only: at most one rounding step apart.
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= tol * b.abs().max(1.0),
                            "{dtype:?} hidden {hidden} [{i}]: {a} vs {b}"
                        );
                    }
                }
            }
        }

        #[test]
        fn kv_append_matches_its_cpu_twin_exactly() {
            let (gpu, cpu) = (gpu(), Device::Cpu);
            let (heads, cap, dim) = (8, 48, 128);
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let rows = Tensor::randn(0f32, 1.0, (20, heads, dim), &cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let on_cpu = Tensor::zeros((heads, cap, dim), dtype, &cpu).unwrap();
                let on_gpu = Tensor::zeros((heads, cap, dim), dtype, &gpu).unwrap();
                let rows_gpu = rows.to_device(&gpu).unwrap();
                for (pos, n) in [(0, 13), (13, 1), (14, 6)] {
                    let op = KvAppend { pos };
                    on_cpu
                        .inplace_op2(&rows.narrow(0, pos, n).unwrap(), &op)
                        .unwrap();
                    on_gpu
                        .inplace_op2(&rows_gpu.narrow(0, pos, n).unwrap(), &op)
                        .unwrap();
                }
                let (a, b) = (values(&on_gpu), values(&on_cpu));
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{dtype:?}"
                );
                let past_end = KvAppend { pos: cap - 1 };
                assert!(on_gpu
                    .inplace_op2(&rows_gpu.narrow(0, 0, 2).unwrap(), &past_end)
                    .is_err());
            }
        }
    }
}
