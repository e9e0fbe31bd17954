// The attention scorer of every window-based method (KV-Compress, SnapKV, PyramidKV, Ada-SnapKV,
// H2O) on the device: from the f32 probabilities of the probed queries to one score per
// (kv-head, slot), in one launch. Only [kv_heads, max_len] comes back to the host, `group x
// probed` times less than the probabilities (96x for SmolLM2's 32-query window), and the host
// no longer pools (it took ~40 ms per 7.5k-token prompt on the H200's host cores).
//
//   window_score: grid (ceil(max_len / WS_TILE), kv_heads), WS_TILE threads,
//                 shared (WS_TILE + pool_k) * group floats.
//
// Contract (the Rust twin is kvc::compress::score::window_score_twin, the host path itself):
// - m[hq][j] = sum over probed queries i = 0.. of p[hq][i][j] (squared first when `squared`),
//   the queries summed in ascending order; with `positions` (buffer > 0), query i sits at
//   position last_query - (probed - 1 - i) and counts for slot j only when
//   positions[h][j] + buffer <= that position;
// - for kv-head h with len L = lens[h] (<= max_len) and P = max(L - pool_skip_last, 0): the
//   slots j < P are pooled along the slot axis over [j - pool_k / 2, j - pool_k / 2 + pool_k)
//   clipped to [0, P) (max ignores the clipped part; avg divides by pool_k, PyTorch's
//   count_include_pad); slots P <= j < L are not pooled; pool_k <= 1 is no pooling;
// - out[h][j] = sum over the group's query heads hq = h * group .. in ascending order, for j < L;
//   out[h][j] = 0 for L <= j < max_len.
#include <float.h>
#include <stdint.h>

constexpr int WS_TILE = 256;

// Summed (and squared) probability of slot j of query head hq; queries before `first` (those
// closer to the key than the buffer allows) do not count.
__device__ __forceinline__ float window_sum(const float* __restrict__ p, int hq, int j,
                                            int probed, int max_len, bool squared, int first) {
  const float* col = p + (size_t)hq * probed * max_len + j;
  float s = 0.f;
  for (int i = max(first, 0); i < probed; ++i) {
    const float x = col[(size_t)i * max_len];
    s += squared ? x * x : x;
  }
  return s;
}

extern "C" __global__ void window_score(
    float* __restrict__ out,          // [kv_heads, max_len] f32 (out)
    const float* __restrict__ p,      // [kv_heads * group, probed, max_len] f32 probabilities
    const uint32_t* __restrict__ lens,  // [kv_heads] slots of each kv-head (<= max_len)
    const uint32_t* __restrict__ positions,  // [kv_heads, max_len] slot positions, or null
    long long last_query,             // position of the last probed query (with positions)
    int buffer,                       // a pair counts when key_pos + buffer <= query_pos
    int group,                        // query heads per kv-head
    int probed,                       // probed queries (>= 1)
    int max_len,                      // columns of p and out
    int squared,                      // 1: sum p^2 (L2), 0: sum p (L1)
    int pool_k,                       // pooling kernel (<= 1: none)
    int pool_max,                     // 1: max pooling, 0: average
    int pool_skip_last) {             // slots at the end of each head left unpooled
  extern __shared__ float sums[];     // [group][WS_TILE + pool_k]
  const int h = blockIdx.y;
  const int j0 = blockIdx.x * WS_TILE;
  const int j = j0 + threadIdx.x;
  const int len = min((int)lens[h], max_len);
  const int pooled_len = max(len - pool_skip_last, 0);
  const bool pooling = pool_k > 1;
  const int pad = pooling ? pool_k / 2 : 0;
  const int span = WS_TILE + (pooling ? pool_k : 0);
  // Stage the window sums of [j0 - pad, j0 - pad + span) of every query head of the group.
  for (int g = 0; g < group; ++g) {
    for (int x = threadIdx.x; x < span; x += WS_TILE) {
      const int c = j0 - pad + x;
      // The first query far enough from the key: position >= key_pos + buffer.
      int first = 0;
      if (positions != nullptr && c >= 0 && c < len) {
        const long long kp = positions[(size_t)h * max_len + c];
        first = (int)max(0LL, kp + buffer - (last_query - (probed - 1)));
      }
      sums[g * span + x] =
          (c >= 0 && c < len)
              ? window_sum(p, h * group + g, c, probed, max_len, squared != 0, first)
              : 0.f;
    }
  }
  __syncthreads();
  if (j >= max_len) return;
  float acc = 0.f;
  if (j < len) {
    for (int g = 0; g < group; ++g) {
      const float* s = sums + g * span;
      float v;
      if (pooling && j < pooled_len) {
        const int lo = max(j - pad, 0), hi = min(j - pad + pool_k, pooled_len);
        if (pool_max) {
          v = -FLT_MAX;
          for (int c = lo; c < hi; ++c) v = fmaxf(v, s[c - j0 + pad]);
        } else {
          v = 0.f;
          for (int c = lo; c < hi; ++c) v += s[c - j0 + pad];
          v /= (float)pool_k;
        }
      } else {
        v = s[j - j0 + pad];
      }
      acc += v;
    }
  }
  out[(size_t)h * max_len + j] = acc;
}
