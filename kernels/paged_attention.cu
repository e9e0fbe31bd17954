// Paged decode attention over per-(layer, kv-head) block tables (KV-Compress layout), one query
// token per sequence, GQA: all query heads of a kv-head's group are handled by one CUDA block,
// so every K/V row is read once per group. f32 accumulation for bf16/f16/f32 inputs.
//
// Two kernels, always launched as a pair (the partitioned, "split-K" form; one partition is the
// plain form):
//   paged_decode_part_<dtype>_d<D>_g<GMAX>: grid (num_parts, num_kv_heads, batch), 128 threads.
//     Partition `part` covers logical slots [part * part_slots, min((part+1) * part_slots, len)).
//     Writes the scaled scores q.k * scale of its slots to `scores` (the probability buffer, used
//     as scratch), and its partial softmax state: max, sum of exp(s - max), and the unnormalised
//     output sum_i exp(s_i - max) * v_i.
//   paged_decode_reduce_<dtype>: grid (num_kv_heads, batch), 128 threads.
//     Combines the partitions into the output, then (when asked) turns the scores into
//     probabilities p (zero beyond each head's length) and adds the KV-Compress decode metric
//     metric[slot] += sum over the group's query heads of p^2.
//
// Contract (the Rust twin is kvc::kvcache::ops::paged_decode):
// - logical slot i of (b, kv-head g) is physical slot
//   block_tables[b][g][i / block_size] * block_size + i % block_size, for i < ctx_lens[b][g];
// - no two (b, g) rows share a block (the metric update has no atomics);
// - query head h uses kv-head h / group; a head with ctx_len 0 outputs zeros;
// - rows are 16-byte aligned, head_dim = D in {64, 128} (other head dims: the Rust side uses
//   candle ops).
#include "common.cuh"
#include <float.h>

namespace kvc {

constexpr int NT = 128;       // threads per block
constexpr int NWARPS = NT / 32;
constexpr int UNROLL = 4;     // keys per thread group in flight

template <typename T, int D, int GMAX>
__device__ void paged_decode_part(
    float* __restrict__ scores,          // [batch, n_heads, probs_stride] f32 (out: scaled scores)
    float* __restrict__ part_max,        // [batch, n_heads, num_parts] f32 (out)
    float* __restrict__ part_sum,        // [batch, n_heads, num_parts] f32 (out)
    float* __restrict__ part_out,        // [batch, n_heads, num_parts, D] f32 (out)
    const T* __restrict__ q,             // [batch, n_heads, D]
    const T* __restrict__ k_cache,       // [num_slots, D]
    const T* __restrict__ v_cache,       // [num_slots, D]
    const uint32_t* __restrict__ block_tables,  // [batch, num_kv_heads, max_blocks]
    const uint32_t* __restrict__ ctx_lens,      // [batch, num_kv_heads]
    int num_kv_heads,                    // kv-heads per layer
    int group,                           // query heads per kv-head (<= GMAX)
    int max_blocks,                      // row length of block_tables
    int block_size,                      // tokens per block
    int probs_stride,                    // row length of scores (>= every ctx_len)
    int part_slots,                      // slots per partition (>= 1)
    int num_parts,                       // partitions per head (grid x)
    float scale) {                       // softmax scale
  constexpr int TPK = D / 8;             // threads per key: 8 elements each
  constexpr int NGROUPS = NT / TPK;      // keys per block-iteration
  __shared__ float q_s[GMAX * D];
  __shared__ float red[NWARPS * (D > GMAX ? D : GMAX)];
  __shared__ float m_s[GMAX];

  const int part = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid % TPK, gid = tid / TPK;
  const int warp = tid / 32, wlane = tid % 32;
  const int n_heads = num_kv_heads * group;
  const uint32_t* table = block_tables + ((size_t)b * num_kv_heads + kvh) * max_blocks;
  const int len = (int)ctx_lens[b * num_kv_heads + kvh];
  const int start = part * part_slots;
  const int end = min(start + part_slots, len);
  const size_t head0 = (size_t)b * n_heads + (size_t)kvh * group;  // first query head

  if (start >= end) {  // empty partition: neutral softmax state
    for (int h = 0; h < group; ++h) {
      const size_t hp = (head0 + h) * num_parts + part;
      if (tid == 0) {
        part_max[hp] = -FLT_MAX;
        part_sum[hp] = 0.f;
      }
      for (int d = tid; d < D; d += NT) part_out[hp * D + d] = 0.f;
    }
    return;
  }

  // Queries of the group, scaled, into shared memory (zeros for padding heads).
  for (int i = tid; i < GMAX * D; i += NT) {
    const int h = i / D;
    q_s[i] = h < group ? to_f32(q[(head0 + h) * D + i % D]) * scale : 0.f;
  }
  __syncthreads();
  float qr[GMAX][8];
#pragma unroll
  for (int h = 0; h < GMAX; ++h)
#pragma unroll
    for (int e = 0; e < 8; ++e) qr[h][e] = q_s[h * D + lane * 8 + e];

  // Phase 1: scores of this partition's keys, running max per head.
  float mx[GMAX];
#pragma unroll
  for (int h = 0; h < GMAX; ++h) mx[h] = -FLT_MAX;
  for (int base = start; base < end; base += NGROUPS * UNROLL) {
    float kr[UNROLL][8];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i = base + u * NGROUPS + gid;
      if (i < end) {
        const uint32_t s = slot_of(table, i, block_size);
        load8(k_cache + (size_t)s * D + lane * 8, kr[u]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) kr[u][e] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i = base + u * NGROUPS + gid;
#pragma unroll
      for (int h = 0; h < GMAX; ++h) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot += qr[h][e] * kr[u][e];
#pragma unroll
        for (int o = TPK / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (i < end) {
          mx[h] = fmaxf(mx[h], dot);
          if (lane == 0 && h < group) scores[(head0 + h) * probs_stride + i] = dot;
        }
      }
    }
  }
  // Block max per head.
#pragma unroll
  for (int h = 0; h < GMAX; ++h) {
    const float m = warp_max(mx[h]);
    if (wlane == 0) red[warp * GMAX + h] = m;
  }
  __syncthreads();  // also makes this block's score writes visible to all its threads
  if (tid < GMAX) {
    float m = -FLT_MAX;
    for (int w = 0; w < NWARPS; ++w) m = fmaxf(m, red[w * GMAX + tid]);
    m_s[tid] = m;
  }
  __syncthreads();
  float mh[GMAX];
#pragma unroll
  for (int h = 0; h < GMAX; ++h) mh[h] = m_s[h];

  // Phase 2: p = exp(s - max), sum p, sum p * v.
  float acc[GMAX][8];
  float sum[GMAX];
#pragma unroll
  for (int h = 0; h < GMAX; ++h) {
    sum[h] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[h][e] = 0.f;
  }
  for (int base = start; base < end; base += NGROUPS * UNROLL) {
    float vr[UNROLL][8];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i = base + u * NGROUPS + gid;
      if (i < end) {
        const uint32_t s = slot_of(table, i, block_size);
        load8(v_cache + (size_t)s * D + lane * 8, vr[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int i = base + u * NGROUPS + gid;
      if (i < end) {
#pragma unroll
        for (int h = 0; h < GMAX; ++h) {
          if (h < group) {
            const float p = expf(scores[(head0 + h) * probs_stride + i] - mh[h]);
            sum[h] += p;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[h][e] += p * vr[u][e];
          }
        }
      }
    }
  }
  // Reduce over the thread groups: first inside each warp, then across warps in shared memory.
  // (Loops over GMAX with a uniform guard so acc stays in registers.)
#pragma unroll
  for (int h = 0; h < GMAX; ++h) {
    if (h < group) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float a = acc[h][e];
#pragma unroll
        for (int o = 16; o >= TPK; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
        acc[h][e] = a;
      }
      const float s = warp_sum(lane == 0 ? sum[h] : 0.f);
      __syncthreads();  // red is free
      if (wlane < TPK) {
#pragma unroll
        for (int e = 0; e < 8; ++e) red[warp * D + wlane * 8 + e] = acc[h][e];
      }
      __syncthreads();
      const size_t hp = (head0 + h) * num_parts + part;
      for (int d = tid; d < D; d += NT) {
        float a = 0.f;
        for (int w = 0; w < NWARPS; ++w) a += red[w * D + d];
        part_out[hp * D + d] = a;
      }
      __syncthreads();
      if (wlane == 0) red[warp] = s;
      __syncthreads();
      if (tid == 0) {
        float t = 0.f;
        for (int w = 0; w < NWARPS; ++w) t += red[w];
        part_sum[hp] = t;
        part_max[hp] = mh[h];
      }
    }
  }
}

template <typename T>
__device__ void paged_decode_reduce(
    T* __restrict__ out,                 // [batch, n_heads, head_dim] (out)
    float* __restrict__ probs,           // [batch, n_heads, probs_stride] f32 (in: scores, out: p)
    float* __restrict__ metric,          // [num_slots] f32 (in/out; null: no metric update)
    const float* __restrict__ part_max,  // [batch, n_heads, num_parts] f32
    const float* __restrict__ part_sum,  // [batch, n_heads, num_parts] f32
    const float* __restrict__ part_out,  // [batch, n_heads, num_parts, head_dim] f32
    const uint32_t* __restrict__ block_tables,  // [batch, num_kv_heads, max_blocks]
    const uint32_t* __restrict__ ctx_lens,      // [batch, num_kv_heads]
    int num_kv_heads,                    // kv-heads per layer
    int group,                           // query heads per kv-head
    int head_dim,                        // elements per row
    int max_blocks,                      // row length of block_tables
    int block_size,                      // tokens per block
    int probs_stride,                    // row length of probs
    int num_parts,                       // partitions per head
    int write_probs) {                   // 1: finalise probs (and zero the padding), 0: leave
  __shared__ float M_s[32], S_s[32];     // group <= 32
  const int kvh = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int n_heads = num_kv_heads * group;
  const uint32_t* table = block_tables + ((size_t)b * num_kv_heads + kvh) * max_blocks;
  const int len = (int)ctx_lens[b * num_kv_heads + kvh];
  const size_t head0 = (size_t)b * n_heads + (size_t)kvh * group;
  for (int h = 0; h < group; ++h) {
    const size_t hp = (head0 + h) * num_parts;
    float M = -FLT_MAX;
    for (int p = 0; p < num_parts; ++p) M = fmaxf(M, part_max[hp + p]);
    float S = 0.f;
    for (int p = 0; p < num_parts; ++p) S += part_sum[hp + p] * expf(part_max[hp + p] - M);
    const float inv = S > 0.f ? 1.f / S : 0.f;
    for (int d = tid; d < head_dim; d += blockDim.x) {
      float a = 0.f;
      for (int p = 0; p < num_parts; ++p)
        a += part_out[(hp + p) * head_dim + d] * expf(part_max[hp + p] - M);
      out[(head0 + h) * head_dim + d] = from_f32<T>(a * inv);
    }
    if (tid == 0) {
      M_s[h] = M;
      S_s[h] = inv;
    }
  }
  __syncthreads();
  if (!write_probs && metric == nullptr) return;
  for (int i = tid; i < len; i += blockDim.x) {
    float m2 = 0.f;
    for (int h = 0; h < group; ++h) {
      float* row = probs + (head0 + h) * probs_stride;
      const float p = expf(row[i] - M_s[h]) * S_s[h];
      if (write_probs) row[i] = p;
      m2 += p * p;
    }
    if (metric != nullptr) metric[slot_of(table, i, block_size)] += m2;
  }
  if (write_probs) {
    for (int h = 0; h < group; ++h) {
      float* row = probs + (head0 + h) * probs_stride;
      for (int i = len + tid; i < probs_stride; i += blockDim.x) row[i] = 0.f;
    }
  }
}

}  // namespace kvc

#define KVC_DECODE_PART(NAME, T, D, G)                                                        \
  extern "C" __global__ void __launch_bounds__(kvc::NT) NAME(                                 \
      float* scores,           /* [batch, n_heads, probs_stride] f32 */                       \
      float* part_max,         /* [batch, n_heads, num_parts] f32 */                          \
      float* part_sum,         /* [batch, n_heads, num_parts] f32 */                          \
      float* part_out,         /* [batch, n_heads, num_parts, D] f32 */                       \
      const T* q,              /* [batch, n_heads, D] */                                      \
      const T* k_cache,        /* [num_slots, D] */                                           \
      const T* v_cache,        /* [num_slots, D] */                                           \
      const uint32_t* block_tables, /* [batch, num_kv_heads, max_blocks] */                   \
      const uint32_t* ctx_lens,     /* [batch, num_kv_heads] */                               \
      int num_kv_heads, int group, int max_blocks, int block_size, int probs_stride,          \
      int part_slots, int num_parts, float scale) {                                           \
    kvc::paged_decode_part<T, D, G>(scores, part_max, part_sum, part_out, q, k_cache, v_cache,\
                                    block_tables, ctx_lens, num_kv_heads, group, max_blocks,  \
                                    block_size, probs_stride, part_slots, num_parts, scale);  \
  }

#define KVC_DECODE_PART_G(TN, T, D)                       \
  KVC_DECODE_PART(paged_decode_part_##TN##_d##D##_g1, T, D, 1)   \
  KVC_DECODE_PART(paged_decode_part_##TN##_d##D##_g2, T, D, 2)   \
  KVC_DECODE_PART(paged_decode_part_##TN##_d##D##_g4, T, D, 4)   \
  KVC_DECODE_PART(paged_decode_part_##TN##_d##D##_g8, T, D, 8)   \
  KVC_DECODE_PART(paged_decode_part_##TN##_d##D##_g16, T, D, 16)

#define KVC_DECODE_PART_DG(TN, T) \
  KVC_DECODE_PART_G(TN, T, 64)    \
  KVC_DECODE_PART_G(TN, T, 128)

KVC_DECODE_PART_DG(f32, float)
KVC_DECODE_PART_DG(bf16, __nv_bfloat16)
KVC_DECODE_PART_DG(f16, __half)

#define KVC_DECODE_REDUCE(NAME, T)                                                            \
  extern "C" __global__ void NAME(                                                            \
      T* out,                  /* [batch, n_heads, head_dim] */                               \
      float* probs,            /* [batch, n_heads, probs_stride] f32 */                       \
      float* metric,           /* [num_slots] f32 or null */                                  \
      const float* part_max,   /* [batch, n_heads, num_parts] f32 */                          \
      const float* part_sum,   /* [batch, n_heads, num_parts] f32 */                          \
      const float* part_out,   /* [batch, n_heads, num_parts, head_dim] f32 */                \
      const uint32_t* block_tables, /* [batch, num_kv_heads, max_blocks] */                   \
      const uint32_t* ctx_lens,     /* [batch, num_kv_heads] */                               \
      int num_kv_heads, int group, int head_dim, int max_blocks, int block_size,              \
      int probs_stride, int num_parts, int write_probs) {                                     \
    kvc::paged_decode_reduce<T>(out, probs, metric, part_max, part_sum, part_out,            \
                                block_tables, ctx_lens, num_kv_heads, group, head_dim,       \
                                max_blocks, block_size, probs_stride, num_parts,             \
                                write_probs);                                                 \
  }

KVC_DECODE_REDUCE(paged_decode_reduce_f32, float)
KVC_DECODE_REDUCE(paged_decode_reduce_bf16, __nv_bfloat16)
KVC_DECODE_REDUCE(paged_decode_reduce_f16, __half)
