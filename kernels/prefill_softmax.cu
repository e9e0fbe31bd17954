// Prefill attention's softmax in one pass over the scores: scale, causal mask from the keys'
// positions, softmax in f32, probabilities back in the compute dtype for the p @ v matmul, and
// (for the probed queries, e.g. KV-Compress's observation window) the f32 probabilities.
//
// The unfused candle chain it replaces (scale, cast to f32, build the mask from positions,
// broadcast-add it, softmax, cast back) made ~75 % of a SmolLM2 prefill's GPU time on the
// H200: 170 of 226 ms for 4000 tokens, seven passes over a [heads, queries, keys] tensor
// (ncu, docs/results/sweep-speed-vs-transformers/decode-kernel-fused-prefill-softmax/). Here: two reads of the scores and one write.
//
// Numerics follow that chain: the scaled score is rounded to the compute dtype
// (candle's affine in T: x * T(scale)), the softmax is expf(x - max) * (1 / sum) in f32, and the
// probabilities are rounded to T (nearest even). Rows are summed in a different order than
// candle's softmax, so probabilities may differ by an ulp of f32.
//
//   prefill_softmax_<dtype>: grid (rows), 256 threads; rows = kv_heads * group * t.
//
// Contract (the Rust twin is kvc::kvcache::ops::prefill_softmax):
// - row r is kv-head r / (group * t), query head (r / t) % group of it, query q = r % t at
//   position q_start + q; key j of the row's kv-head is visible iff key_pos[kv-head][j] <=
//   q_start + q (padding keys carry u32::MAX and are never visible);
// - p_out[r] = softmax over the visible keys (0 for hidden keys), in T;
// - probs (when not null) holds the f32 probabilities of the last `probed` queries of every
//   query head: row ((kvh * group + j) * probed + (q - (t - probed))), for q >= t - probed;
// - a row without a visible key is all zeros (cannot happen in a causal prefill: a query
//   always sees its own key).
#include "common.cuh"
#include <float.h>

namespace kvc {

constexpr int SM_THREADS = 256;

// Scaled score of key j, as candle's affine in T computes it (product rounded to T), or -inf
// when the key is hidden.
template <typename T>
__device__ __forceinline__ float masked_score(const T* __restrict__ row, const uint32_t* kpos,
                                              int j, uint32_t qpos, float scale_t) {
  if (kpos[j] > qpos) return -INFINITY;
  return to_f32(from_f32<T>(to_f32(row[j]) * scale_t));
}

template <typename T>
__device__ void prefill_softmax(
    T* __restrict__ p_out,              // [rows, n] (out)
    float* __restrict__ probs,          // [kv_heads * group, probed, n] f32 (out) or null
    const T* __restrict__ att,          // [rows, n] raw q . k
    const uint32_t* __restrict__ key_pos,  // [kv_heads, n] u32 (u32::MAX: padding)
    int n,                              // keys per row
    int t,                              // queries per head
    int group,                          // query heads per kv-head
    int probed,                         // last queries whose f32 probabilities are written
    uint32_t q_start,                   // position of query 0
    float scale) {                      // softmax scale
  __shared__ float red_m[SM_THREADS / 32], red_s[SM_THREADS / 32];
  __shared__ float tot_m, tot_s;
  const size_t r = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int kvh = (int)(r / ((size_t)group * t));
  const int j_head = (int)((r / t) % group);
  const int q = (int)(r % t);
  const uint32_t qpos = q_start + (uint32_t)q;
  const T* row = att + r * n;
  const uint32_t* kpos = key_pos + (size_t)kvh * n;
  const float scale_t = to_f32(from_f32<T>(scale));

  // Pass 1: running max and sum of exp per thread (online rescaling), then over the block.
  float m = -INFINITY, s = 0.f;
  for (int j = tid; j < n; j += SM_THREADS) {
    const float x = masked_score(row, kpos, j, qpos, scale_t);
    if (x == -INFINITY) continue;
    if (x > m) {
      s = s * expf(m - x) + 1.f;
      m = x;
    } else {
      s += expf(x - m);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    const float mn = fmaxf(m, m2);
    s = (m == -INFINITY ? 0.f : s * expf(m - mn)) + (m2 == -INFINITY ? 0.f : s2 * expf(m2 - mn));
    m = mn;
  }
  if (lane == 0) {
    red_m[warp] = m;
    red_s[warp] = s;
  }
  __syncthreads();
  if (tid == 0) {
    float M = -INFINITY;
    for (int w = 0; w < SM_THREADS / 32; ++w) M = fmaxf(M, red_m[w]);
    float S = 0.f;
    for (int w = 0; w < SM_THREADS / 32; ++w)
      if (red_m[w] != -INFINITY) S += red_s[w] * expf(red_m[w] - M);
    tot_m = M;
    tot_s = S;
  }
  __syncthreads();
  const float M = tot_m, inv = 1.f / tot_s;

  // Pass 2: probabilities.
  const int first_probed = t - probed;
  float* prow = (probs != nullptr && q >= first_probed)
                    ? probs + (((size_t)kvh * group + j_head) * probed + (q - first_probed)) * n
                    : nullptr;
  T* orow = p_out + r * n;
  for (int j = tid; j < n; j += SM_THREADS) {
    const float x = masked_score(row, kpos, j, qpos, scale_t);
    const float p = (x == -INFINITY || M == -INFINITY) ? 0.f : expf(x - M) * inv;
    orow[j] = from_f32<T>(p);
    if (prow != nullptr) prow[j] = p;
  }
}

}  // namespace kvc

#define KVC_PREFILL_SOFTMAX(NAME, T)                                                         \
  extern "C" __global__ void __launch_bounds__(kvc::SM_THREADS) NAME(                        \
      T* p_out,                /* [rows, n] */                                               \
      float* probs,            /* [kv_heads * group, probed, n] f32 or null */               \
      const T* att,            /* [rows, n] */                                               \
      const uint32_t* key_pos, /* [kv_heads, n] */                                           \
      int n, int t, int group, int probed, uint32_t q_start, float scale) {                  \
    kvc::prefill_softmax<T>(p_out, probs, att, key_pos, n, t, group, probed, q_start, scale); \
  }

KVC_PREFILL_SOFTMAX(prefill_softmax_f32, float)
KVC_PREFILL_SOFTMAX(prefill_softmax_bf16, __nv_bfloat16)
KVC_PREFILL_SOFTMAX(prefill_softmax_f16, __half)
