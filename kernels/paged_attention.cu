// Paged decode attention over per-(layer, kv-head) block tables (KV-Compress layout), one query
// token per sequence, GQA: all query heads of a kv-head's group are handled by one CUDA block,
// so every K/V row is read once per group. f32 accumulation for bf16/f16/f32 inputs.
//
// Two kernels, always launched as a pair (the partitioned, "split-K" form; one partition is the
// plain form):
//   paged_decode_{async,part}_<dtype>_d<D>_g<GMAX>: grid (num_parts, num_kv_heads, batch), 128
//     threads; `async` streams K/V through cp.async shared-memory stages (dynamic shared memory,
//     see the macros at the end; the default), `part` through registers.
//     Partition `part` covers logical slots [part * part_slots, min((part+1) * part_slots, len)).
//     Writes the scaled scores q.k * scale of its slots to `scores` (the probability buffer, used
//     as scratch), and its partial softmax state: max, sum of exp(s - max), and the unnormalised
//     output sum_i exp(s_i - max) * v_i.
//   paged_decode_reduce_<dtype>: grid (num_kv_heads, batch, ceil(probs_stride / 1024)), 256
//     threads; z = 0 also writes the output.
//     Combines the partitions into the output, then (when asked) turns the scores into
//     probabilities p (zero beyond each head's length) and adds the KV-Compress decode metric
//     metric[slot] += sum over the group's query heads of p^2.
//
// Contract (the Rust twin is kvc::kvcache::ops::paged_decode):
// - logical slot i of row r = (b, kv-head g) is physical slot
//   block_tables[table_start[r] + i / block_size] * block_size + i % block_size, for
//   i < ctx_lens[r] (table_start[r] = r * max_blocks for a padded [batch, kv-heads, max_blocks]
//   table; the paged cache uploads only the blocks in use, back to back);
// - no two (b, g) rows share a block (the metric update has no atomics);
// - query head h uses kv-head h / group; a head with ctx_len 0 outputs zeros;
// - rows are 16-byte aligned, head_dim = D in {64, 128} (other head dims: the Rust side uses
//   candle ops).
#include "common.cuh"
#include <float.h>

namespace kvc {

constexpr int NT = 128;       // threads per block
constexpr int NWARPS = NT / 32;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Register pipeline: keys in flight per lane and iteration, as many as the registers allow
// without spilling (each key holds 16 bytes of K and 16 of V per lane; the group's running
// outputs take 8 f32 registers per query head).
template <int GMAX>
struct Unroll {
  static constexpr int value = GMAX <= 4 ? 8 : (GMAX == 8 ? 4 : 2);
};

// Async pipeline: keys per lane and stage, and stages (STAGES - 1 stages of loads in flight
// while one is consumed).
constexpr int ASYNC_U = 4;
constexpr int ASYNC_STAGES = 4;

// One lane's running softmax state for the GMAX query heads of its group (the lanes of one
// key group hold the same m and l; each holds its 8 output elements).
template <int GMAX>
struct SoftmaxState {
  float m[GMAX], l[GMAX], acc[GMAX][8];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int h = 0; h < GMAX; ++h) {
      m[h] = -FLT_MAX;
      l[h] = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[h][e] = 0.f;
    }
  }
};

// Consume U keys (one per u; K and V already loaded as raw words): scores in the log2 domain
// (reduced over the TPK lanes of the key), the scaled scores stored for the probabilities /
// metric, online softmax update, then p * v.
template <typename T, int TPK, int GMAX, int U>
__device__ __forceinline__ void consume_keys(
    SoftmaxState<GMAX>& st, const float (&qr)[GMAX][8], const Pack8<T> (&kraw)[U],
    const Pack8<T> (&vraw)[U], const bool (&ok)[U], const int (&idx)[U],
    float* __restrict__ scores, size_t head0, int probs_stride, int group, int store_scores,
    int sub) {
  float sc[U][GMAX];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float kf[8];
    unpack8(kraw[u], kf);
#pragma unroll
    for (int h = 0; h < GMAX; ++h) {
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) dot = fmaf(qr[h][e], kf[e], dot);
#pragma unroll
      for (int o = TPK / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      sc[u][h] = dot;
    }
  }
  if (store_scores && sub == 0) {
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (ok[u])
#pragma unroll
        for (int h = 0; h < GMAX; ++h)
          if (h < group) scores[(head0 + h) * probs_stride + idx[u]] = sc[u][h] * LN2;
  }
#pragma unroll
  for (int h = 0; h < GMAX; ++h) {
    float mn = st.m[h];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (ok[u]) mn = fmaxf(mn, sc[u][h]);
    const float alpha = fast_exp2(st.m[h] - mn);  // 0 when m was -FLT_MAX and mn is a score
    st.m[h] = mn;
    st.l[h] *= alpha;
#pragma unroll
    for (int e = 0; e < 8; ++e) st.acc[h][e] *= alpha;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float p = ok[u] ? fast_exp2(sc[u][h] - mn) : 0.f;
      sc[u][h] = p;
      st.l[h] += p;
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float vf[8];
    unpack8(vraw[u], vf);
#pragma unroll
    for (int h = 0; h < GMAX; ++h)
#pragma unroll
      for (int e = 0; e < 8; ++e) st.acc[h][e] = fmaf(sc[u][h], vf[e], st.acc[h][e]);
  }
}

// Physical slot of logical slot i (POW2: block_size == 1 << bshift, a shift instead of a
// division).
template <bool POW2>
__device__ __forceinline__ size_t slot_at(const uint32_t* __restrict__ table, int i,
                                          int block_size, int bshift) {
  const uint32_t blk = POW2 ? (uint32_t)i >> bshift : (uint32_t)i / block_size;
  const uint32_t off = (uint32_t)i - blk * (uint32_t)block_size;
  return (size_t)(__ldg(table + blk) * (uint32_t)block_size + off);
}

// One partition of one (sequence, kv-head): a single pass over its keys with an online
// softmax (FlashDecoding style). Every group of TPK = D / 8 lanes owns one key at a time (8
// elements per lane), keeps its own running max / sum / output for all query heads of the
// group, and the states are merged at the end (within the warp by shuffles, across the 4
// warps in shared memory). Warps never synchronise inside the loop. Scores are kept in the
// log2 domain (q pre-scaled by scale * log2 e, exp2 on the SFU) and stored in natural units.
//
// Decode attention is bound by device-memory bandwidth only with enough bytes in flight per
// SM; two ways to keep loads in flight:
// - ASYNC = false: each lane loads U keys' K and V into registers, then consumes them;
// - ASYNC = true: each warp streams its keys through ASYNC_STAGES shared-memory stages with
//   cp.async (loads for the next ASYNC_STAGES - 1 stages in flight while one is consumed,
//   without holding registers). Each lane reads back only the bytes it copied itself, so
//   cp.async.wait_group is the only synchronisation.
// Measured on the H200 (batch 64 x 4096 x d128 bf16, docs/results/sweep-speed-vs-transformers/decode-kernel-fused-prefill-softmax):
// the two-pass form this replaced (scores first, then p * v) streamed 23 % of the copy rate;
// the register pipeline 71 %, the async one 90 % (73 % with the probabilities and the metric).
// Past a certain point the loop is bound by instruction issue, not memory: per-key branches
// (the slot division, exp2f's denormal fix-up) cost 30 % of the loop's instructions before
// they were hoisted / replaced.
template <typename T, int D, int GMAX, bool ASYNC>
__device__ void paged_decode_part(
    float* __restrict__ scores,          // [batch, n_heads, probs_stride] f32 (out: scaled scores)
    float* __restrict__ part_max,        // [batch, n_heads, num_parts] f32 (out)
    float* __restrict__ part_sum,        // [batch, n_heads, num_parts] f32 (out)
    float* __restrict__ part_out,        // [batch, n_heads, num_parts, D] f32 (out)
    const T* __restrict__ q,             // [batch, n_heads, D]
    const T* __restrict__ k_cache,       // [num_slots, D]
    const T* __restrict__ v_cache,       // [num_slots, D]
    const uint32_t* __restrict__ block_tables,  // blocks of every row, at table_start[row]
    const uint32_t* __restrict__ ctx_lens,      // [batch, num_kv_heads]
    const uint32_t* __restrict__ table_start,   // [batch, num_kv_heads]: first block of the row
    int num_kv_heads,                    // kv-heads per layer
    int group,                           // query heads per kv-head (<= GMAX)
    int block_size,                      // tokens per block
    int probs_stride,                    // row length of scores (>= every ctx_len)
    int part_slots,                      // slots per partition (>= 1)
    int num_parts,                       // partitions per head (grid x)
    float scale,                         // softmax scale
    int store_scores) {                  // 1: write the scaled scores (probs / metric wanted)
  constexpr int TPK = D / 8;             // lanes per key: 8 elements each
  constexpr int KPW = 32 / TPK;          // keys per warp and load
  constexpr int U = ASYNC ? ASYNC_U : Unroll<GMAX>::value;  // keys per lane and iteration
  constexpr int KPI = KPW * U;           // keys per warp and iteration
  __shared__ float q_s[GMAX * D];
  __shared__ float red_acc[NWARPS][GMAX][D];
  __shared__ float red_m[NWARPS][GMAX], red_l[NWARPS][GMAX];
  // Async stages: [warp][stage][K | V][KPI keys][D] (dynamic shared memory).
  extern __shared__ __align__(16) unsigned char stage_mem[];

  const int part = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int sub = lane % TPK, kg = lane / TPK;  // element chunk, key within the load
  const int n_heads = num_kv_heads * group;
  const uint32_t* table = block_tables + table_start[b * num_kv_heads + kvh];
  const int len = (int)ctx_lens[b * num_kv_heads + kvh];
  const int start = part * part_slots;
  const int end = min(start + part_slots, len);
  const size_t head0 = (size_t)b * n_heads + (size_t)kvh * group;  // first query head
  // Power-of-two block sizes (the usual 16 / 32) map slots with shifts instead of divisions.
  const int bshift = (block_size & (block_size - 1)) == 0 ? __ffs(block_size) - 1 : -1;

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

  // Queries of the group, scaled into the log2 domain (zeros for padding heads).
  for (int i = tid; i < GMAX * D; i += NT) {
    const int h = i / D;
    q_s[i] = h < group ? to_f32(q[(head0 + h) * D + i % D]) * (scale * LOG2E) : 0.f;
  }
  __syncthreads();
  float qr[GMAX][8];
#pragma unroll
  for (int h = 0; h < GMAX; ++h)
#pragma unroll
    for (int e = 0; e < 8; ++e) qr[h][e] = q_s[h * D + sub * 8 + e];

  SoftmaxState<GMAX> st;
  st.init();
  const int first = start + warp * KPI;  // this warp's first key; it then strides by NWARPS * KPI

  // The key loop, compiled once for power-of-two block sizes and once for others (the choice
  // is uniform: branching on it per key cost convergence barriers around every load).
  auto key_loop = [&](auto pow2) {
  constexpr bool POW2 = decltype(pow2)::value;
  if constexpr (!ASYNC) {
    for (int base = first; base < end; base += NWARPS * KPI) {
      Pack8<T> kraw[U], vraw[U];
      bool ok[U];
      int idx[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = base + u * KPW + kg;
        idx[u] = i;
        ok[u] = i < end;
        if (ok[u]) {
          const size_t s = slot_at<POW2>(table, i, block_size, bshift);
          kraw[u] = ldg8(k_cache + s * D + sub * 8);
          vraw[u] = ldg8(v_cache + s * D + sub * 8);
        } else {
          kraw[u] = zero8<T>();
          vraw[u] = zero8<T>();
        }
      }
      consume_keys<T, TPK, GMAX, U>(st, qr, kraw, vraw, ok, idx, scores, head0, probs_stride,
                                    group, store_scores, sub);
    }
  } else {
    constexpr int W16 = sizeof(T) / 2;  // 16-byte words per lane and row chunk
    T* stages = reinterpret_cast<T*>(stage_mem) + (size_t)warp * ASYNC_STAGES * 2 * KPI * D;
    const int n_it = first < end ? (end - first + NWARPS * KPI - 1) / (NWARPS * KPI) : 0;
    // Copies of iteration `it` into stage it % ASYNC_STAGES (zeros past the end); always one
    // commit group per call so that wait_group counts iterations.
    auto issue = [&](int it) {
      if (it < n_it) {
        T* kst = stages + (size_t)(it % ASYNC_STAGES) * 2 * KPI * D;
        T* vst = kst + KPI * D;
        const int base = first + it * NWARPS * KPI;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int i = base + u * KPW + kg;
          const bool ok = i < end;
          const size_t s = ok ? slot_at<POW2>(table, i, block_size, bshift) : 0;
          const int row = u * KPW + kg;
#pragma unroll
          for (int w = 0; w < W16; ++w) {
            cp_async16(kst + row * D + sub * 8 + w * (8 / W16), k_cache + s * D + sub * 8 + w * (8 / W16), ok);
            cp_async16(vst + row * D + sub * 8 + w * (8 / W16), v_cache + s * D + sub * 8 + w * (8 / W16), ok);
          }
        }
      }
      cp_async_commit();
    };
#pragma unroll
    for (int it = 0; it < ASYNC_STAGES - 1; ++it) issue(it);
    for (int it = 0; it < n_it; ++it) {
      issue(it + ASYNC_STAGES - 1);
      cp_async_wait<ASYNC_STAGES - 1>();  // this lane's copies of iteration `it` have landed
      const T* kst = stages + (size_t)(it % ASYNC_STAGES) * 2 * KPI * D;
      const T* vst = kst + KPI * D;
      const int base = first + it * NWARPS * KPI;
      Pack8<T> kraw[U], vraw[U];
      bool ok[U];
      int idx[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int row = u * KPW + kg;
        idx[u] = base + row;
        ok[u] = idx[u] < end;
        kraw[u] = *reinterpret_cast<const Pack8<T>*>(kst + row * D + sub * 8);
        vraw[u] = *reinterpret_cast<const Pack8<T>*>(vst + row * D + sub * 8);
      }
      consume_keys<T, TPK, GMAX, U>(st, qr, kraw, vraw, ok, idx, scores, head0, probs_stride,
                                    group, store_scores, sub);
    }
    cp_async_wait<0>();
  }
  };
  if (bshift >= 0) {
    key_loop(BoolTag<true>{});
  } else {
    key_loop(BoolTag<false>{});
  }

  // Merge the key groups of the warp (lanes sub, sub + TPK, ... hold the same elements).
#pragma unroll
  for (int o = TPK; o < 32; o <<= 1) {
#pragma unroll
    for (int h = 0; h < GMAX; ++h) {
      const float m2 = __shfl_xor_sync(0xffffffffu, st.m[h], o);
      const float l2 = __shfl_xor_sync(0xffffffffu, st.l[h], o);
      const float mn = fmaxf(st.m[h], m2);
      const float a = exp2f(st.m[h] - mn), c = exp2f(m2 - mn);
      st.m[h] = mn;
      st.l[h] = st.l[h] * a + l2 * c;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float x2 = __shfl_xor_sync(0xffffffffu, st.acc[h][e], o);
        st.acc[h][e] = st.acc[h][e] * a + x2 * c;
      }
    }
  }
  // Merge the warps.
  if (kg == 0) {
#pragma unroll
    for (int h = 0; h < GMAX; ++h) {
#pragma unroll
      for (int e = 0; e < 8; ++e) red_acc[warp][h][sub * 8 + e] = st.acc[h][e];
      if (sub == 0) {
        red_m[warp][h] = st.m[h];
        red_l[warp][h] = st.l[h];
      }
    }
  }
  __syncthreads();
  for (int x = tid; x < group * D; x += NT) {
    const int h = x / D, d = x % D;
    float mx = -FLT_MAX;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) mx = fmaxf(mx, red_m[w][h]);
    float o = 0.f, t = 0.f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) {
      const float c = exp2f(red_m[w][h] - mx);
      o += red_acc[w][h][d] * c;
      t += red_l[w][h] * c;
    }
    const size_t hp = (head0 + h) * num_parts + part;
    part_out[hp * D + d] = o;
    if (d == 0) {
      part_sum[hp] = t;
      part_max[hp] = mx * LN2;
    }
  }
}

// Slots per CUDA block of the reduce kernel's probability pass (grid z).
constexpr int REDUCE_CHUNK = 1024;
constexpr int RT = 256;  // threads per block of the reduce kernel

template <typename T>
__device__ void paged_decode_reduce(
    T* __restrict__ out,                 // [batch, n_heads, head_dim] (out)
    float* __restrict__ probs,           // [batch, n_heads, probs_stride] f32 (in: scores, out: p)
    float* __restrict__ metric,          // [num_slots] f32 (in/out; null: no metric update)
    const float* __restrict__ part_max,  // [batch, n_heads, num_parts] f32
    const float* __restrict__ part_sum,  // [batch, n_heads, num_parts] f32
    const float* __restrict__ part_out,  // [batch, n_heads, num_parts, head_dim] f32
    const uint32_t* __restrict__ block_tables,  // blocks of every row, at table_start[row]
    const uint32_t* __restrict__ ctx_lens,      // [batch, num_kv_heads]
    const uint32_t* __restrict__ table_start,   // [batch, num_kv_heads]: first block of the row
    int num_kv_heads,                    // kv-heads per layer
    int group,                           // query heads per kv-head
    int head_dim,                        // elements per row
    int block_size,                      // tokens per block
    int probs_stride,                    // row length of probs
    int num_parts,                       // partitions per head
    int write_probs) {                   // 1: finalise probs (and zero the padding), 0: leave
  __shared__ float M_s[32], S_s[32];     // group <= 32
  const int kvh = blockIdx.x, b = blockIdx.y, chunk = blockIdx.z, tid = threadIdx.x;
  const int n_heads = num_kv_heads * group;
  const uint32_t* table = block_tables + table_start[b * num_kv_heads + kvh];
  const int len = (int)ctx_lens[b * num_kv_heads + kvh];
  const size_t head0 = (size_t)b * n_heads + (size_t)kvh * group;
  // Every chunk derives the heads' softmax totals (a few values per partition); chunk 0 also
  // writes the output rows.
  for (int h = 0; h < group; ++h) {
    const size_t hp = (head0 + h) * num_parts;
    float M = -FLT_MAX;
    for (int p = 0; p < num_parts; ++p) M = fmaxf(M, part_max[hp + p]);
    float S = 0.f;
    for (int p = 0; p < num_parts; ++p) S += part_sum[hp + p] * expf(part_max[hp + p] - M);
    const float inv = S > 0.f ? 1.f / S : 0.f;
    if (chunk == 0) {
      for (int d = tid; d < head_dim; d += RT) {
        float a = 0.f;
        for (int p = 0; p < num_parts; ++p)
          a += part_out[(hp + p) * head_dim + d] * expf(part_max[hp + p] - M);
        out[(head0 + h) * head_dim + d] = from_f32<T>(a * inv);
      }
    }
    if (tid == 0) {
      M_s[h] = M;
      S_s[h] = inv;
    }
  }
  __syncthreads();
  if (!write_probs && metric == nullptr) return;
  const int bshift = (block_size & (block_size - 1)) == 0 ? __ffs(block_size) - 1 : -1;
  const int c0 = chunk * REDUCE_CHUNK, c1 = min(c0 + REDUCE_CHUNK, probs_stride);
  for (int i = c0 + tid; i < min(c1, len); i += RT) {
    float m2 = 0.f;
    for (int h = 0; h < group; ++h) {
      float* row = probs + (head0 + h) * probs_stride;
      const float p = expf(row[i] - M_s[h]) * S_s[h];
      if (write_probs) row[i] = p;
      m2 += p * p;
    }
    if (metric != nullptr) {
      const uint32_t blk = bshift >= 0 ? (uint32_t)i >> bshift : (uint32_t)i / block_size;
      metric[table[blk] * (uint32_t)block_size + ((uint32_t)i - blk * block_size)] += m2;
    }
  }
  if (write_probs) {
    for (int h = 0; h < group; ++h) {
      float* row = probs + (head0 + h) * probs_stride;
      for (int i = max(c0, len) + tid; i < c1; i += RT) row[i] = 0.f;
    }
  }
}

}  // namespace kvc

#define KVC_DECODE_PART(NAME, T, D, G, ASYNC)                                                 \
  extern "C" __global__ void __launch_bounds__(kvc::NT) NAME(                                 \
      float* scores,           /* [batch, n_heads, probs_stride] f32 */                       \
      float* part_max,         /* [batch, n_heads, num_parts] f32 */                          \
      float* part_sum,         /* [batch, n_heads, num_parts] f32 */                          \
      float* part_out,         /* [batch, n_heads, num_parts, D] f32 */                       \
      const T* q,              /* [batch, n_heads, D] */                                      \
      const T* k_cache,        /* [num_slots, D] */                                           \
      const T* v_cache,        /* [num_slots, D] */                                           \
      const uint32_t* block_tables, /* blocks of every row, at table_start[row] */            \
      const uint32_t* ctx_lens,     /* [batch, num_kv_heads] */                               \
      const uint32_t* table_start,  /* [batch, num_kv_heads] */                               \
      int num_kv_heads, int group, int block_size, int probs_stride,                          \
      int part_slots, int num_parts, float scale, int store_scores) {                         \
    kvc::paged_decode_part<T, D, G, ASYNC>(scores, part_max, part_sum, part_out, q, k_cache,  \
                                           v_cache, block_tables, ctx_lens, table_start,      \
                                           num_kv_heads, group, block_size, probs_stride,     \
                                           part_slots, num_parts, scale, store_scores);       \
  }

// Names: paged_decode_part_<dtype>_d<D>_g<GMAX> (register pipeline) and
// paged_decode_async_<dtype>_d<D>_g<GMAX> (cp.async pipeline, dynamic shared memory:
// NWARPS * ASYNC_STAGES * 2 * (32 / (D / 8)) * ASYNC_U * D * sizeof(T) bytes).
#define KVC_DECODE_PART_G(TN, T, D)                                     \
  KVC_DECODE_PART(paged_decode_part_##TN##_d##D##_g1, T, D, 1, false)   \
  KVC_DECODE_PART(paged_decode_part_##TN##_d##D##_g2, T, D, 2, false)   \
  KVC_DECODE_PART(paged_decode_part_##TN##_d##D##_g4, T, D, 4, false)   \
  KVC_DECODE_PART(paged_decode_part_##TN##_d##D##_g8, T, D, 8, false)   \
  KVC_DECODE_PART(paged_decode_part_##TN##_d##D##_g16, T, D, 16, false) \
  KVC_DECODE_PART(paged_decode_async_##TN##_d##D##_g1, T, D, 1, true)   \
  KVC_DECODE_PART(paged_decode_async_##TN##_d##D##_g2, T, D, 2, true)   \
  KVC_DECODE_PART(paged_decode_async_##TN##_d##D##_g4, T, D, 4, true)   \
  KVC_DECODE_PART(paged_decode_async_##TN##_d##D##_g8, T, D, 8, true)   \
  KVC_DECODE_PART(paged_decode_async_##TN##_d##D##_g16, T, D, 16, true)

#define KVC_DECODE_PART_DG(TN, T) \
  KVC_DECODE_PART_G(TN, T, 64)    \
  KVC_DECODE_PART_G(TN, T, 128)

KVC_DECODE_PART_DG(f32, float)
KVC_DECODE_PART_DG(bf16, __nv_bfloat16)
KVC_DECODE_PART_DG(f16, __half)

#define KVC_DECODE_REDUCE(NAME, T)                                                            \
  extern "C" __global__ void __launch_bounds__(kvc::RT) NAME(                                 \
      T* out,                  /* [batch, n_heads, head_dim] */                               \
      float* probs,            /* [batch, n_heads, probs_stride] f32 */                       \
      float* metric,           /* [num_slots] f32 or null */                                  \
      const float* part_max,   /* [batch, n_heads, num_parts] f32 */                          \
      const float* part_sum,   /* [batch, n_heads, num_parts] f32 */                          \
      const float* part_out,   /* [batch, n_heads, num_parts, head_dim] f32 */                \
      const uint32_t* block_tables, /* blocks of every row, at table_start[row] */            \
      const uint32_t* ctx_lens,     /* [batch, num_kv_heads] */                               \
      const uint32_t* table_start,  /* [batch, num_kv_heads] */                               \
      int num_kv_heads, int group, int head_dim, int block_size,                              \
      int probs_stride, int num_parts, int write_probs) {                                     \
    kvc::paged_decode_reduce<T>(out, probs, metric, part_max, part_sum, part_out,            \
                                block_tables, ctx_lens, table_start, num_kv_heads, group,    \
                                head_dim, block_size, probs_stride, num_parts,               \
                                write_probs);                                                 \
  }

KVC_DECODE_REDUCE(paged_decode_reduce_f32, float)
KVC_DECODE_REDUCE(paged_decode_reduce_bf16, __nv_bfloat16)
KVC_DECODE_REDUCE(paged_decode_reduce_f16, __half)
