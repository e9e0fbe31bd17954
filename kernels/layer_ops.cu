// Fused ops of a llama decoder layer, for the GPU forward of a small model, where every
// candle op is one launch and a decode step of SmolLM2 (30 layers) was ~20 launches per layer
// whose host-side cost set the step time. Each kernel here replaces two or three of them:
//
// - add_rms_norm: the residual add and the next RMSNorm (two outputs: the sum, the normed);
// - silu_mul: SiLU(gate) * up over the merged gate/up projection's output;
// - rope_split_qkv: the merged q/k/v projection's output split into per-head q, k, v with the
//   half-rotation RoPE applied to q and k, each row at its own position.
//
// Arithmetic follows candle's kernels (candle-kernels 0.11 reduce.cu `rmsnorm`, `rope`;
// unary.cu `usilu`; binary add/mul), so the fused forward matches the op chain it replaces up to
// the compiler's contraction of a multiply and a subtract in RoPE.
//
// Rust twins (same contracts, candle op chains): kvc::model::fused::{add_rms_norm, silu_mul,
// rope_split_qkv}.
//
// And the greedy pick after the LM head, argmax_rows_f32 (twin: kvc::model::Llama::argmax_host
// per row): one launch where candle's ops took five, and none of candle's binary-op module,
// whose PTX the driver compiles on a machine's first kvc run (~10 s on the H200 host).
#include <climits>

#include "common.cuh"

namespace kvc {

__device__ __forceinline__ float warp_sum_xor(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffff, x, m, 32);
  return x;
}

// One block per row: sum = x + r (rounded to T, as candle's binary add), then
// normed = T(rsqrt(mean(sum^2) + eps) * sum * w). The block size and reduction order are
// candle's rmsnorm: 32 threads below 1024 columns, 1024 from there.
template <typename T>
__device__ void add_rms_norm(
    T* __restrict__ sum,           // [rows, cols] (out) x + r
    T* __restrict__ normed,        // [rows, cols] (out) RMSNorm(x + r) * w
    const T* __restrict__ x,       // [rows, cols]
    const T* __restrict__ r,       // [rows, cols]
    const T* __restrict__ w,       // [cols]
    int cols,                      // hidden size
    float eps) {
  const size_t base = (size_t)blockIdx.x * cols;
  const int tid = threadIdx.x, bs = blockDim.x;
  float acc = 0.f;
  for (int c = tid; c < cols; c += bs) {
    const T s = x[base + c] + r[base + c];
    sum[base + c] = s;
    const float f = static_cast<float>(s);
    acc += f * f;
  }
  acc = warp_sum_xor(acc);
  if (bs > 32) {
    __shared__ float part[32];
    const int warp = tid / 32, lane = tid % 32;
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    acc = warp_sum_xor(part[lane]);
  }
  const float scale = rsqrtf(acc / cols + eps);
  // Each thread reads back only the sums it wrote itself: no barrier needed.
  for (int c = tid; c < cols; c += bs) {
    const float s = static_cast<float>(sum[base + c]);
    normed[base + c] = static_cast<T>(scale * s * static_cast<float>(w[c]));
  }
}

// SiLU as candle computes it per dtype (bf16 and f32 in f32; f16 in half arithmetic).
__device__ __forceinline__ float silu_of(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ __nv_bfloat16 silu_of(__nv_bfloat16 x) {
  return __float2bfloat16(silu_of(__bfloat162float(x)));
}
__device__ __forceinline__ __half silu_of(__half x) {
  return x / (__float2half(1.0f) + hexp(-x));
}

// out[m, j] = SiLU(gu[m, j]) * gu[m, inter + j]: the merged projection's row holds the gate's
// `inter` outputs, then the up projection's.
template <typename T>
__device__ void silu_mul(
    T* __restrict__ out,        // [rows, inter] (out)
    const T* __restrict__ gu,   // [rows, 2 * inter]
    int rows,
    int inter) {
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)rows * inter) return;
  const size_t m = idx / inter, j = idx % inter;
  const T g = silu_of(gu[m * 2 * inter + j]);
  out[idx] = g * gu[m * 2 * inter + inter + j];
}

// One thread per (row, head, pair i < d/2). Row n = b * t + ti of `qkv` holds the token's q
// heads, then k heads, then v heads, `d` elements each; the token's position is
// pos0[b] + ti. q and k heads are rotated as candle's `rope` (x1 * cos - x2 * sin,
// x1 * sin + x2 * cos, in T arithmetic); v heads are copied.
template <typename T>
__device__ void rope_split_qkv(
    T* __restrict__ q,                // [batch, nh, t, d] (out)
    T* __restrict__ k,                // [batch, nkv, t, d] (out)
    T* __restrict__ v,                // [batch, nkv, t, d] (out)
    const T* __restrict__ qkv,        // [batch * t, (nh + 2 * nkv) * d]
    const T* __restrict__ cos,        // [max_pos, d / 2]
    const T* __restrict__ sin,        // [max_pos, d / 2]
    const uint32_t* __restrict__ pos0,  // [batch] position of each row's first token
    int batch, int t, int nh, int nkv, int d) {
  const int half = d / 2, heads = nh + 2 * nkv;
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)batch * t * heads * half) return;
  const int i = (int)(idx % half);
  const size_t nh_idx = idx / half;
  const int h = (int)(nh_idx % heads);
  const size_t n = nh_idx / heads;
  const int b = (int)(n / t), ti = (int)(n % t);
  const T* src = qkv + n * (size_t)heads * d + (size_t)h * d;
  const T x1 = src[i], x2 = src[i + half];
  T* dst;
  if (h < nh) {
    dst = q + (((size_t)b * nh + h) * t + ti) * d;
  } else if (h < nh + nkv) {
    dst = k + (((size_t)b * nkv + (h - nh)) * t + ti) * d;
  } else {
    dst = v + (((size_t)b * nkv + (h - nh - nkv)) * t + ti) * d;
    dst[i] = x1;
    dst[i + half] = x2;
    return;
  }
  const size_t p = (size_t)(pos0[b] + ti) * half + i;
  const T c = cos[p], s = sin[p];
  dst[i] = x1 * c - x2 * s;
  dst[i + half] = x1 * s + x2 * c;
}

}  // namespace kvc

// The first index of each row's maximum, as a sequential scan `if x > best` from index 0 finds
// it: a NaN never becomes the best, and a row starting with NaN gives 0. One block per row.
constexpr int ARGMAX_THREADS = 256;

__device__ __forceinline__ bool argmax_beats(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS) argmax_rows_f32(
    uint32_t* __restrict__ out,         // [rows] (out) first index of the row's maximum
    const float* __restrict__ logits,   // [rows, cols] f32
    int cols) {                         // vocabulary size (>= 1)
  const float* row = logits + (size_t)blockIdx.x * cols;
  float bv = -INFINITY;
  int bi = INT_MAX;
  for (int i = threadIdx.x; i < cols; i += ARGMAX_THREADS) {
    const float v = row[i];
    if (!isnan(v) && argmax_beats(v, i, bv, bi)) {
      bv = v;
      bi = i;
    }
  }
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffff, bv, m, 32);
    const int oi = __shfl_xor_sync(0xffffffff, bi, m, 32);
    if (argmax_beats(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  __shared__ float sv[ARGMAX_THREADS / 32];
  __shared__ int si[ARGMAX_THREADS / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < ARGMAX_THREADS / 32; ++w) {
      if (argmax_beats(sv[w], si[w], bv, bi)) {
        bv = sv[w];
        bi = si[w];
      }
    }
    // Every value NaN but possibly row[0], or row[0] itself NaN: the scan keeps index 0.
    out[blockIdx.x] = (isnan(row[0]) || bi == INT_MAX) ? 0u : (uint32_t)bi;
  }
}

#define LAYER_OPS(T, SUF)                                                                   \
  extern "C" __global__ void add_rms_norm_##SUF(T* sum, T* normed, const T* x, const T* r,  \
                                                const T* w, int cols, float eps) {          \
    kvc::add_rms_norm<T>(sum, normed, x, r, w, cols, eps);                                  \
  }                                                                                         \
  extern "C" __global__ void silu_mul_##SUF(T* out, const T* gu, int rows, int inter) {     \
    kvc::silu_mul<T>(out, gu, rows, inter);                                                 \
  }                                                                                         \
  extern "C" __global__ void rope_split_qkv_##SUF(T* q, T* k, T* v, const T* qkv,           \
                                                  const T* cos, const T* sin,               \
                                                  const uint32_t* pos0, int batch, int t,   \
                                                  int nh, int nkv, int d) {                 \
    kvc::rope_split_qkv<T>(q, k, v, qkv, cos, sin, pos0, batch, t, nh, nkv, d);             \
  }

LAYER_OPS(float, f32)
LAYER_OPS(__nv_bfloat16, bf16)
LAYER_OPS(__half, f16)
