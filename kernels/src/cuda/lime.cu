// lime's own CUDA kernels, compiled at run time by NVRTC for the GPU at hand.
//
// No CUDA headers are included: f16 and bf16 are carried as their 16-bit patterns
// and converted here, so the source compiles the same with every NVRTC from 11.4 on,
// on a Jetson as on a data-centre GPU. Conversions round to nearest even, as the
// host's `half` crate does, so a kernel and its CPU twin agree on every rounding.

typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float v) { return v; }
};
struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(u16 v) { return f16_to_f32(v); }
    static __device__ __forceinline__ u16 store(float v) { return f32_to_f16(v); }
};
struct BF16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(u16 v) { return bf16_to_f32(v); }
    static __device__ __forceinline__ u16 store(float v) { return f32_to_bf16(v); }
};

// Sum of one value per thread over the block, returned to every thread. The
// reduction order is fixed by the block size, so a row gets the same bits whatever
// else the launch holds.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? partial[lane] : 0.0f;
    if (warp == 0)
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    v = partial[0];
    __syncthreads();
    return v;
}

// RMSNorm of one row per block, as Hugging Face's Llama computes it: the mean
// square in f32, the normalised row rounded to the input dtype, then multiplied by
// the weight in that dtype. One pass over the row instead of six tensor ops.
template <typename D>
__device__ void rms_norm(const typename D::T* x, const typename D::T* w, typename D::T* out,
                         int hidden, float eps) {
    const typename D::T* row = x + (size_t)blockIdx.x * hidden;
    typename D::T* dst = out + (size_t)blockIdx.x * hidden;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = D::load(row[i]);
        acc += v * v;
    }
    const float inv = 1.0f / sqrtf(block_sum(acc) / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float normed = D::load(D::store(D::load(row[i]) * inv));
        dst[i] = D::store(normed * D::load(w[i]));
    }
}

extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float* out, int hidden,
                                        float eps) {
    rms_norm<F32>(x, w, out, hidden, eps);
}
extern "C" __global__ void rms_norm_f16(const u16* x, const u16* w, u16* out, int hidden,
                                        float eps) {
    rms_norm<F16>(x, w, out, hidden, eps);
}
extern "C" __global__ void rms_norm_bf16(const u16* x, const u16* w, u16* out, int hidden,
                                         float eps) {
    rms_norm<BF16>(x, w, out, hidden, eps);
}

// Appends a sequence's new keys (or values) to its preallocated cache in one
// launch: rows `src [n, heads, dim]` as the projection left them go to
// `cache [heads, capacity, dim]` at positions `pos..pos + n`. Replaces a transpose,
// a contiguous copy and a strided copy per tensor.
template <typename T>
__device__ void kv_append(const T* src, T* cache, u32 n, u32 heads, u32 dim, u32 capacity,
                          u32 pos) {
    const size_t total = (size_t)n * heads * dim;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t e = i % dim;
        const size_t h = (i / dim) % heads;
        const size_t t = i / ((size_t)dim * heads);
        cache[(h * capacity + pos + t) * dim + e] = src[i];
    }
}

extern "C" __global__ void kv_append_b16(const u16* src, u16* cache, u32 n, u32 heads, u32 dim,
                                         u32 capacity, u32 pos) {
    kv_append<u16>(src, cache, n, heads, dim, capacity, pos);
}
extern "C" __global__ void kv_append_b32(const u32* src, u32* cache, u32 n, u32 heads, u32 dim,
                                         u32 capacity, u32 pos) {
    kv_append<u32>(src, cache, n, heads, dim, capacity, pos);
}
