//! Causal self-attention of one sequence on the CPU, computed so that a query's
//! output depends only on its own query vector and the cached keys and values up
//! to its position, never on how many other queries are computed with it.
//!
//! That makes a prompt prefilled in one pass, in chunks, or token by token produce
//! the same bits, so a KV cache rebuilt by recomputation (after a re-plan) equals
//! the one built while decoding. Each score is a fixed-order dot product (the
//! projection kernel's, [`crate::rowwise`]); softmax and the weighted sum of values
//! run over keys in index order; the arithmetic follows transformers' order
//! (scale after the product, f32 softmax with a division by the sum).

use crate::rowwise::dot;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

/// Attention of `n` queries at positions `pos..pos + n` over cache rows `0..pos + n`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CausalAttention {
    pub pos: usize,
    pub group: usize,
    pub scale: f32,
}

/// Below this many multiply-adds a call runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 16;

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    /// `q [n, heads, d]`, `k` and `v [kv_heads, capacity, d]` -> `[n, heads * d]`.
    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some(qo), Some(ko), Some(vo)) = (
            ql.contiguous_offsets(),
            kl.contiguous_offsets(),
            vl.contiguous_offsets(),
        ) else {
            candle_core::bail!("causal-attention needs contiguous operands");
        };
        let (&[n, heads, d], &[kv_heads, capacity, d2]) = (ql.dims(), kl.dims()) else {
            candle_core::bail!(
                "causal-attention needs q [n, h, d] and a cache [kv, cap, d], got {:?} and {:?}",
                ql.dims(),
                kl.dims()
            );
        };
        if d != d2
            || kl.dims() != vl.dims()
            || heads != kv_heads * self.group
            || self.pos + n > capacity
        {
            candle_core::bail!(
                "causal-attention: q {:?}, k {:?}, v {:?}, group {}, positions {}..{}",
                ql.dims(),
                kl.dims(),
                vl.dims(),
                self.group,
                self.pos,
                self.pos + n
            );
        }
        let q = &qs.as_slice::<f32>()?[qo.0..qo.1];
        let k = &ks.as_slice::<f32>()?[ko.0..ko.1];
        let v = &vs.as_slice::<f32>()?[vo.0..vo.1];
        let mut out = vec![0f32; n * heads * d];
        let task = |(row, o): (usize, &mut [f32])| {
            let (i, h) = (row / heads, row % heads);
            let keys = self.pos + i + 1;
            let kv = (h / self.group) * capacity * d;
            attend(
                &q[row * d..][..d],
                &k[kv..][..keys * d],
                &v[kv..][..keys * d],
                self.scale,
                o,
            );
        };
        if n * heads * (self.pos + n) * d < PARALLEL_WORK {
            out.chunks_mut(d).enumerate().for_each(task);
        } else {
            out.par_chunks_mut(d).enumerate().for_each(task);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, heads * d))))
    }
}

/// One query against `k`, `v` (`keys` rows of `d`), written to `out` (`d`).
fn attend(q: &[f32], k: &[f32], v: &[f32], scale: f32, out: &mut [f32]) {
    let d = q.len();
    let mut probs: Vec<f32> = k.chunks_exact(d).map(|kr| dot(q, kr) * scale).collect();
    let max = probs.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0f32;
    for p in probs.iter_mut() {
        *p = (*p - max).exp();
        sum += *p;
    }
    out.fill(0.0);
    for (p, vr) in probs.iter().zip(v.chunks_exact(d)) {
        let p = p / sum;
        for (o, x) in out.iter_mut().zip(vr) {
            *o += p * x;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn data(len: usize, salt: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| ((i.wrapping_mul(2654435761) ^ salt) % 2001) as f32 / 500.0 - 2.0)
            .collect()
    }

    /// Softmax attention in f64 with explicit causal masking.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: (usize, usize, usize, usize, usize),
        pos: usize,
    ) -> Vec<f64> {
        let (n, heads, kv_heads, cap, d) = dims;
        let group = heads / kv_heads;
        let mut out = vec![0f64; n * heads * d];
        for i in 0..n {
            for h in 0..heads {
                let kv = (h / group) * cap * d;
                let qv = &q[(i * heads + h) * d..][..d];
                let scores: Vec<f64> = (0..=pos + i)
                    .map(|j| {
                        (0..d)
                            .map(|t| qv[t] as f64 * k[kv + j * d + t] as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    for t in 0..d {
                        out[(i * heads + h) * d + t] += w / sum * v[kv + j * d + t] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_masked_softmax_attention() {
        let (n, heads, kv_heads, cap, d, pos) = (5, 6, 2, 12, 20, 4);
        let dev = Device::Cpu;
        let (q, k, v) = (
            data(n * heads * d, 1),
            data(kv_heads * cap * d, 2),
            data(kv_heads * cap * d, 3),
        );
        let op = CausalAttention {
            pos,
            group: heads / kv_heads,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let got = Tensor::from_slice(&q, (n, heads, d), &dev)
            .unwrap()
            .apply_op3_no_bwd(
                &Tensor::from_slice(&k, (kv_heads, cap, d), &dev).unwrap(),
                &Tensor::from_slice(&v, (kv_heads, cap, d), &dev).unwrap(),
                &op,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = naive(&q, &k, &v, (n, heads, kv_heads, cap, d), pos);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn refuses_positions_beyond_the_cache() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((3, 2, 4), candle_core::DType::F32, &dev).unwrap();
        let kv = Tensor::zeros((1, 4, 4), candle_core::DType::F32, &dev).unwrap();
        let op = CausalAttention {
            pos: 2,
            group: 2,
            scale: 0.5,
        };
        assert!(q.apply_op3_no_bwd(&kv, &kv, &op).is_err());
    }
}
