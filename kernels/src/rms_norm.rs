//! RMSNorm as one operation: the mean square, the scaling and the weight in a
//! single pass over each row, on the CPU and (with `cuda`) in one kernel launch.
//!
//! Built from tensor ops it takes six passes and five temporaries per call, twice
//! per layer. The arithmetic is Hugging Face Llama's: the mean square in f32, the
//! normalised row rounded to the input dtype, then multiplied by the weight in that
//! dtype. Each row depends on nothing but itself, so a sequence gets the same bits
//! in any micro-batch.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape};
use half::{bf16, f16};
use rayon::prelude::*;

/// `x [.., hidden]` normalised and scaled by `weight [hidden]`, same dtype.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNormOp {
    pub eps: f32,
}

/// Start and end of an operand's elements in its storage.
type Elements = (usize, usize);

/// The row length and the element ranges of `x` and `weight`, or why not.
pub(crate) fn operands(
    xl: &Layout,
    wl: &Layout,
) -> candle_core::Result<(usize, Elements, Elements)> {
    let (Some(x), Some(w)) = (xl.contiguous_offsets(), wl.contiguous_offsets()) else {
        candle_core::bail!("rms-norm needs contiguous operands");
    };
    let hidden = *xl.dims().last().unwrap_or(&0);
    if hidden == 0 || wl.dims() != [hidden] {
        candle_core::bail!(
            "rms-norm of rows {:?} needs a weight of [{hidden}], got {:?}",
            xl.dims(),
            wl.dims()
        );
    }
    Ok((hidden, x, w))
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "lime-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (hidden, (x0, x1), (w0, w1)) = operands(xl, wl)?;
        let out = match (xs, ws) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                CpuStorage::F32(norm_rows(&x[x0..x1], &w[w0..w1], hidden, self.eps))
            }
            (CpuStorage::F16(x), CpuStorage::F16(w)) => {
                CpuStorage::F16(norm_rows(&x[x0..x1], &w[w0..w1], hidden, self.eps))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(w)) => {
                CpuStorage::BF16(norm_rows(&x[x0..x1], &w[w0..w1], hidden, self.eps))
            }
            (x, w) => candle_core::bail!(
                "rms-norm of {:?} rows with a {:?} weight: the dtypes must match",
                x.dtype(),
                w.dtype()
            ),
        };
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::rms_norm(self.eps, xs, xl, ws, wl)
    }
}

/// A float dtype a norm reads and writes, converted through f32 with rounding to
/// nearest even (what the GPU kernel does too).
pub(crate) trait Element: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

fn norm_rows<T: Element>(x: &[T], w: &[T], hidden: usize, eps: f32) -> Vec<T> {
    let mut out = vec![T::from_f32(0.0); x.len()];
    out.par_chunks_mut(hidden)
        .zip(x.par_chunks(hidden))
        .for_each_init(
            || Vec::with_capacity(hidden),
            |wide, (dst, row)| {
                wide.clear();
                wide.extend(row.iter().map(|v| v.to_f32()));
                let mean_square = crate::rowwise::dot(wide, wide) / hidden as f32;
                let inv = 1.0 / (mean_square + eps).sqrt();
                for ((d, v), g) in dst.iter_mut().zip(wide.iter()).zip(w) {
                    let normed = T::from_f32(v * inv).to_f32();
                    *d = T::from_f32(normed * g.to_f32());
                }
            },
        );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::f32_values;
    use candle_core::{DType, Device, Tensor};

    fn rows(n: usize, hidden: usize) -> Vec<f32> {
        (0..n * hidden)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1 + i / hidden) as f32)
            .collect()
    }

    /// The definition in f64, for the f32 path to be measured against.
    fn reference(x: &[f32], w: &[f32], hidden: usize, eps: f64) -> Vec<f64> {
        x.chunks(hidden)
            .flat_map(|row| {
                let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / hidden as f64;
                let inv = 1.0 / (ms + eps).sqrt();
                row.iter()
                    .zip(w)
                    .map(move |(&v, &g)| v as f64 * inv * g as f64)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn f32_rows_match_the_definition() {
        let (n, hidden) = (5, 300);
        let x = rows(n, hidden);
        let w: Vec<f32> = (0..hidden).map(|i| 0.5 + (i % 17) as f32 / 16.0).collect();
        let dev = Device::Cpu;
        let xt = Tensor::from_slice(&x, (n, hidden), &dev).unwrap();
        let wt = Tensor::from_slice(&w, hidden, &dev).unwrap();
        let got: Vec<f32> = xt
            .apply_op2_no_bwd(&wt, &RmsNormOp { eps: 1e-5 })
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, (g, r)) in got.iter().zip(reference(&x, &w, hidden, 1e-5)).enumerate() {
            assert!(
                (*g as f64 - r).abs() <= 1e-6 * r.abs().max(1.0),
                "[{i}] {g} vs {r}"
            );
        }
    }

    #[test]
    fn narrow_dtypes_round_like_hugging_face() {
        // HF: normed = (x.float() * rsqrt(mean(x²) + eps)).to(dtype); out = w * normed.
        let (n, hidden) = (3, 64);
        let x = rows(n, hidden);
        let w: Vec<f32> = (0..hidden).map(|i| 1.0 - i as f32 / 100.0).collect();
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            let xt = Tensor::from_slice(&x, (n, hidden), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let wt = Tensor::from_slice(&w, hidden, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let fused = xt.apply_op2_no_bwd(&wt, &RmsNormOp { eps: 1e-6 }).unwrap();
            assert_eq!(fused.dtype(), dtype);
            let xf = xt.to_dtype(DType::F32).unwrap();
            let inv = (xf.sqr().unwrap().mean_keepdim(1).unwrap() + 1e-6)
                .unwrap()
                .sqrt()
                .unwrap()
                .recip()
                .unwrap();
            let unfused = xf
                .broadcast_mul(&inv)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .broadcast_mul(&wt)
                .unwrap();
            let a = f32_values(&fused);
            let b = f32_values(&unfused);
            // The mean square may differ in its last f32 bit (summation order), which
            // moves a rounding at most one step of the narrow dtype.
            let step = if dtype == DType::BF16 {
                1.0 / 128.0
            } else {
                1.0 / 1024.0
            };
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (p - q).abs() <= step * q.abs().max(1e-3),
                    "{dtype:?} [{i}] {p} vs {q}"
                );
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_in_any_batch() {
        let hidden = 96;
        let x = rows(7, hidden);
        let w = vec![1.25f32; hidden];
        let whole = norm_rows(&x, &w, hidden, 1e-5);
        for (i, row) in x.chunks(hidden).enumerate() {
            let alone = norm_rows(row, &w, hidden, 1e-5);
            assert_eq!(
                alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                whole[i * hidden..][..hidden]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
            );
        }
    }

    #[test]
    fn mismatched_operands_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
        let op = RmsNormOp { eps: 1e-5 };
        let short = Tensor::zeros(7, DType::F32, &dev).unwrap();
        assert!(x.apply_op2_no_bwd(&short, &op).is_err());
        let narrow = Tensor::zeros(8, DType::BF16, &dev).unwrap();
        assert!(x.apply_op2_no_bwd(&narrow, &op).is_err());
        let strided = Tensor::zeros((8, 2), DType::F32, &dev)
            .unwrap()
            .t()
            .unwrap();
        let w = Tensor::zeros(8, DType::F32, &dev).unwrap();
        assert!(strided.apply_op2_no_bwd(&w, &op).is_err());
    }
}
