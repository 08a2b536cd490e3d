//! Appending a sequence's new keys or values to its preallocated cache as one
//! operation, in place.
//!
//! The projections leave a sequence's rows as `[n, kv_heads, head_dim]`; the cache
//! is `[kv_heads, capacity, head_dim]`. With tensor ops that is a transpose, a
//! contiguous copy and a strided copy into the cache, per tensor per layer per
//! sequence; here it is one scatter (one kernel launch on a GPU), and nothing is
//! allocated.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout};

/// Writes `src [n, heads, dim]` into `cache [heads, capacity, dim]` at positions
/// `pos..pos + n`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvAppend {
    pub pos: usize,
}

/// The shapes of one append, checked: where the rows go and that they fit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placement {
    pub n: usize,
    pub heads: usize,
    pub dim: usize,
    pub capacity: usize,
    pub pos: usize,
    /// Element ranges of the cache and the source rows in their storages.
    pub cache: (usize, usize),
    pub src: (usize, usize),
}

impl KvAppend {
    pub(crate) fn place(&self, cl: &Layout, sl: &Layout) -> candle_core::Result<Placement> {
        let (Some(cache), Some(src)) = (cl.contiguous_offsets(), sl.contiguous_offsets()) else {
            candle_core::bail!("kv-append needs a contiguous cache and contiguous rows");
        };
        let (&[heads, capacity, dim], &[n, src_heads, src_dim]) = (cl.dims(), sl.dims()) else {
            candle_core::bail!(
                "kv-append needs a [heads, capacity, dim] cache and [n, heads, dim] rows, got {:?} and {:?}",
                cl.dims(),
                sl.dims()
            );
        };
        if (heads, dim) != (src_heads, src_dim) {
            candle_core::bail!(
                "kv-append: rows of {src_heads}×{src_dim} do not fit a cache of {heads}×{dim}"
            );
        }
        if self.pos.checked_add(n).is_none_or(|end| end > capacity) {
            candle_core::bail!(
                "kv-append: {n} tokens at position {} exceed the capacity of {capacity}",
                self.pos
            );
        }
        Ok(Placement {
            n,
            heads,
            dim,
            capacity,
            pos: self.pos,
            cache,
            src,
        })
    }
}

impl InplaceOp2 for KvAppend {
    fn name(&self) -> &'static str {
        "lime-kv-append"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let p = self.place(cl, sl)?;
        match (cache, src) {
            (CpuStorage::F32(c), CpuStorage::F32(s)) => scatter(c, s, &p),
            (CpuStorage::F16(c), CpuStorage::F16(s)) => scatter(c, s, &p),
            (CpuStorage::BF16(c), CpuStorage::BF16(s)) => scatter(c, s, &p),
            (c, s) => candle_core::bail!(
                "kv-append of {:?} rows into a {:?} cache: the dtypes must match",
                s.dtype(),
                c.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cl: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let p = self.place(cl, sl)?;
        crate::cuda::kv_append(cache, src, &p)
    }
}

fn scatter<T: Copy>(cache: &mut [T], src: &[T], p: &Placement) {
    let cache = &mut cache[p.cache.0..p.cache.1];
    let src = &src[p.src.0..p.src.1];
    for (t, token) in src.chunks_exact(p.heads * p.dim).take(p.n).enumerate() {
        for (h, row) in token.chunks_exact(p.dim).enumerate() {
            let at = (h * p.capacity + p.pos + t) * p.dim;
            cache[at..at + p.dim].copy_from_slice(row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::f32_values;
    use candle_core::{DType, Device, IndexOp, Tensor};

    #[test]
    fn appends_land_where_the_transposed_copy_puts_them() {
        let dev = Device::Cpu;
        let (heads, cap, dim) = (3, 10, 4);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let cache = Tensor::zeros((heads, cap, dim), dtype, &dev).unwrap();
            let want = Tensor::zeros((heads, cap, dim), dtype, &dev).unwrap();
            let all = Tensor::arange(0f32, (7 * heads * dim) as f32, &dev)
                .unwrap()
                .reshape((7, heads, dim))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            // A prompt of 5, then two decoded tokens: rows are narrowed views.
            for (pos, n) in [(0, 5), (5, 1), (6, 1)] {
                let rows = all.narrow(0, pos, n).unwrap();
                cache.inplace_op2(&rows, &KvAppend { pos }).unwrap();
                let t = rows.transpose(0, 1).unwrap().contiguous().unwrap();
                want.slice_set(&t, 1, pos).unwrap();
            }
            let (a, b) = (f32_values(&cache), f32_values(&want));
            assert_eq!(a, b, "{dtype:?}");
            // Past the appended tokens the cache is untouched.
            let tail = f32_values(&cache.i((.., 7.., ..)).unwrap());
            assert!(tail.iter().all(|v| *v == 0.0));
        }
    }

    #[test]
    fn appends_that_do_not_fit_are_errors() {
        let dev = Device::Cpu;
        let cache = Tensor::zeros((2, 4, 3), DType::F32, &dev).unwrap();
        let rows = Tensor::ones((2, 2, 3), DType::F32, &dev).unwrap();
        assert!(cache.inplace_op2(&rows, &KvAppend { pos: 3 }).is_err());
        assert!(cache
            .inplace_op2(&rows, &KvAppend { pos: usize::MAX })
            .is_err());
        let wrong_heads = Tensor::ones((1, 3, 3), DType::F32, &dev).unwrap();
        assert!(cache
            .inplace_op2(&wrong_heads, &KvAppend { pos: 0 })
            .is_err());
        let wrong_dtype = Tensor::ones((1, 2, 3), DType::BF16, &dev).unwrap();
        assert!(cache
            .inplace_op2(&wrong_dtype, &KvAppend { pos: 0 })
            .is_err());
        // Nothing was written by the refused appends.
        let sum: f32 = cache.sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(sum, 0.0);
    }
}
