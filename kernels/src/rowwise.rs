//! The CPU's dense projection `y = x Wᵀ`, computed so that every output element's
//! arithmetic depends only on its own row of `x` and row of `W`.
//!
//! General gemm kernels tile the reduction differently for different numbers of
//! rows, so a sequence's logits would change in the last bits depending on which
//! other sequences shared its micro-batch. lime's exactness contract is stronger
//! than that: a sequence must get the same bits alone, in any batch, and in any
//! stage layout. Here each dot product runs over `k` in fixed 16-lane partial sums
//! reduced by a fixed tree, whatever `m` is, whatever SIMD width the compiler picks
//! (lanes never change, only how many are processed per instruction), and with no
//! fused multiply-add, so x86 and aarch64 agree too.
//!
//! It is also faster than candle's gemm for the small `m` of decoding: each weight
//! row is streamed from memory once and applied to up to four activation rows while
//! it is in registers.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape};
use rayon::prelude::*;

const LANES: usize = 16;
/// Weight rows per parallel task: 16 rows of a 4096-wide layer are 256 KiB, which
/// stays in L2 while every group of activation rows passes over it.
const ROWS_PER_TASK: usize = 16;

/// `x [m, k] · w [n, k]ᵀ -> [m, n]`, f32, both contiguous.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowwiseLinear;

impl CustomOp2 for RowwiseLinear {
    fn name(&self) -> &'static str {
        "rowwise-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("rowwise-linear needs contiguous operands");
        };
        let (&[m, k], &[n, k2]) = (xl.dims(), wl.dims()) else {
            candle_core::bail!(
                "rowwise-linear needs [m, k] x [n, k], got {:?} x {:?}",
                xl.dims(),
                wl.dims()
            );
        };
        if k != k2 {
            candle_core::bail!("rowwise-linear: inner dimensions {k} and {k2} differ");
        }
        let x = &xs.as_slice::<f32>()?[x0..x1];
        let w = &ws.as_slice::<f32>()?[w0..w1];
        Ok((
            CpuStorage::F32(matmul_t(x, m, w, n, k)),
            Shape::from((m, n)),
        ))
    }
}

/// `x [m, k] · w [n, k]ᵀ` as a row-major `[m, n]` vector.
pub(crate) fn matmul_t(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    // Tasks own blocks of weight rows, so results are gathered transposed ([n, m])
    // and turned around at the end; for m == 1 the two layouts coincide.
    let mut out_t = vec![0f32; n * m];
    if m == 0 || n == 0 {
        return out_t;
    }
    out_t
        .par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, out)| {
            let rows = &w[task * ROWS_PER_TASK * k..][..out.len() / m * k];
            block(x, m, rows, k, out);
        });
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for (j, col) in out_t.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            out[i * n + j] = *v;
        }
    }
    out
}

/// One task: weight rows `w` against every activation row, into `out [rows, m]`.
fn block(x: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: as below, for AVX-512F, which the condition checked.
        unsafe { block_avx512(x, m, w, k, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: `block_avx2` only differs from `block_portable` in being compiled
        // for AVX2, and the line above checked that this CPU executes AVX2.
        unsafe { block_avx2(x, m, w, k, out) };
        return;
    }
    block_portable(x, m, w, k, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn block_avx512(x: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32]) {
    block_portable(x, m, w, k, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn block_avx2(x: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32]) {
    block_portable(x, m, w, k, out);
}

/// Activation rows go four at a time (the accumulators of four fill the vector
/// registers of AVX2), then one at a time.
#[inline(always)]
fn block_portable(x: &[f32], m: usize, w: &[f32], k: usize, out: &mut [f32]) {
    let mut i = 0;
    while i + 4 <= m {
        let xs = [
            &x[i * k..][..k],
            &x[(i + 1) * k..][..k],
            &x[(i + 2) * k..][..k],
            &x[(i + 3) * k..][..k],
        ];
        for (j, wr) in w.chunks_exact(k).enumerate() {
            out[j * m + i..j * m + i + 4].copy_from_slice(&dot4(xs, wr));
        }
        i += 4;
    }
    for i in i..m {
        let xr = &x[i * k..][..k];
        for (j, wr) in w.chunks_exact(k).enumerate() {
            out[j * m + i] = dot1(xr, wr);
        }
    }
}

/// Sums lanes pairwise in a fixed order, then the tail in index order.
#[inline(always)]
fn finish(mut acc: [f32; LANES], x: &[f32], w: &[f32]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    let tail = x.len() / LANES * LANES;
    x[tail..]
        .iter()
        .zip(&w[tail..])
        .fold(acc[0], |s, (a, b)| s + a * b)
}

/// One fixed-order dot product, the same bits as any row of [`matmul_t`].
pub(crate) fn dot(x: &[f32], w: &[f32]) -> f32 {
    dot1(x, w)
}

#[inline(always)]
fn dot1(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (xc, wc) in x
        .as_chunks::<LANES>()
        .0
        .iter()
        .zip(w.as_chunks::<LANES>().0)
    {
        for l in 0..LANES {
            acc[l] += xc[l] * wc[l];
        }
    }
    finish(acc, x, w)
}

/// Four dot products sharing one pass over `w`; each equals `dot1` bit for bit.
/// (Written out by hand: the compiler vectorises this form, not a loop over rows.)
#[inline(always)]
fn dot4(x: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    let (mut a0, mut a1, mut a2, mut a3) =
        ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let (x0, x1, x2, x3) = (
        x[0].as_chunks::<LANES>().0,
        x[1].as_chunks::<LANES>().0,
        x[2].as_chunks::<LANES>().0,
        x[3].as_chunks::<LANES>().0,
    );
    let wc = w.as_chunks::<LANES>().0;
    let n = wc
        .len()
        .min(x0.len())
        .min(x1.len())
        .min(x2.len())
        .min(x3.len());
    for c in 0..n {
        let (w, y0, y1, y2, y3) = (&wc[c], &x0[c], &x1[c], &x2[c], &x3[c]);
        for l in 0..LANES {
            a0[l] += y0[l] * w[l];
            a1[l] += y1[l] * w[l];
            a2[l] += y2[l] * w[l];
            a3[l] += y3[l] * w[l];
        }
    }
    [
        finish(a0, x[0], w),
        finish(a1, x[1], w),
        finish(a2, x[2], w),
        finish(a3, x[3], w),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, salt: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| ((i.wrapping_mul(2654435761) ^ salt) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn matches_a_plain_dot_product() {
        for (m, n, k) in [(1, 5, 3), (3, 17, 40), (5, 33, 100), (9, 40, 257)] {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let got = matmul_t(&x, m, &w, n, k);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                        .sum();
                    assert!(
                        (got[i * n + j] as f64 - want).abs() < 1e-4,
                        "({m},{n},{k}) [{i},{j}]"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_in_any_batch() {
        let (n, k) = (70, 300);
        let w = data(n * k, 3);
        let rows = 11;
        let x = data(rows * k, 4);
        let alone: Vec<Vec<u32>> = (0..rows)
            .map(|i| {
                matmul_t(&x[i * k..][..k], 1, &w, n, k)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            })
            .collect();
        for m in 1..=rows {
            let batch = matmul_t(&x[..m * k], m, &w, n, k);
            for (i, want) in alone.iter().enumerate().take(m) {
                let got: Vec<u32> = batch[i * n..][..n].iter().map(|v| v.to_bits()).collect();
                assert_eq!(&got, want, "row {i} in a batch of {m}");
            }
        }
    }
}
