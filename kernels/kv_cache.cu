// Paged KV storage ops: writing new K/V rows into their slots, and executing a compaction move
// plan. Slot s is row s of the K and V caches `[num_slots, head_dim]` and entry s of the per-slot
// metric (f32) and position (u32) arrays (KV-Compress layout: one block = block_size tokens of
// one kv-head of one layer; the block tables live elsewhere, these kernels only see slots).
//
// Rust twins (same contracts): kvc::kvcache::ops::write_kv, kvc::kvcache::ops::move_slots,
// kvc::kvcache::ops::set_meta and kvc::kvcache::ops::copy_blocks; gather_kv's is candle's
// index_select on the CPU.
#include "common.cuh"

namespace kvc {

// One thread per element of the n x head_dim rows; thread (row, 0) also sets the metadata.
template <typename T>
__device__ void write_kv(
    T* __restrict__ k_cache,            // [num_slots, head_dim] (out: rows `slots`)
    T* __restrict__ v_cache,            // [num_slots, head_dim] (out: rows `slots`)
    float* __restrict__ metric,         // [num_slots] f32 or null (out: 0 at `slots`)
    uint32_t* __restrict__ position,    // [num_slots] u32 or null (out: `positions` at `slots`)
    const T* __restrict__ k_new,        // [n, head_dim] (RoPE applied)
    const T* __restrict__ v_new,        // [n, head_dim]
    const uint32_t* __restrict__ slots,      // [n] distinct physical slots
    const uint32_t* __restrict__ positions,  // [n] token positions
    int n,                              // rows to write
    int head_dim) {                     // elements per row
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)n * head_dim) return;
  const int r = (int)(idx / head_dim), d = (int)(idx % head_dim);
  const size_t dst = (size_t)slots[r] * head_dim + d;
  k_cache[dst] = k_new[idx];
  v_cache[dst] = v_new[idx];
  if (d == 0) {
    if (metric != nullptr) metric[slots[r]] = 0.f;
    if (position != nullptr) position[slots[r]] = positions[r];
  }
}

// Copies slot from[i] to slot to[i] (K, V rows, metric, position). Sources and destinations
// are disjoint sets (a compaction moves tail survivors into evicted holes), so the order of the
// copies does not matter.
template <typename T>
__device__ void move_slots(
    T* __restrict__ k_cache,            // [num_slots, head_dim]
    T* __restrict__ v_cache,            // [num_slots, head_dim]
    float* __restrict__ metric,         // [num_slots] f32 or null
    uint32_t* __restrict__ position,    // [num_slots] u32 or null
    const uint32_t* __restrict__ from,  // [n] source slots
    const uint32_t* __restrict__ to,    // [n] destination slots
    int n,                              // moves
    int head_dim) {                     // elements per row
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)n * head_dim) return;
  const int r = (int)(idx / head_dim), d = (int)(idx % head_dim);
  const size_t src = (size_t)from[r] * head_dim + d, dst = (size_t)to[r] * head_dim + d;
  k_cache[dst] = k_cache[src];
  v_cache[dst] = v_cache[src];
  if (d == 0) {
    if (metric != nullptr) metric[to[r]] = metric[from[r]];
    if (position != nullptr) position[to[r]] = position[from[r]];
  }
}

}  // namespace kvc

#define KVC_KV_OPS(TN, T)                                                                     \
  extern "C" __global__ void write_kv_##TN(                                                   \
      T* k_cache,              /* [num_slots, head_dim] */                                    \
      T* v_cache,              /* [num_slots, head_dim] */                                    \
      float* metric,           /* [num_slots] f32 or null */                                  \
      uint32_t* position,      /* [num_slots] u32 or null */                                  \
      const T* k_new,          /* [n, head_dim] */                                            \
      const T* v_new,          /* [n, head_dim] */                                            \
      const uint32_t* slots,   /* [n] */                                                      \
      const uint32_t* positions, /* [n] */                                                    \
      int n, int head_dim) {                                                                  \
    kvc::write_kv<T>(k_cache, v_cache, metric, position, k_new, v_new, slots, positions, n,  \
                     head_dim);                                                               \
  }                                                                                           \
  extern "C" __global__ void move_slots_##TN(                                                 \
      T* k_cache,              /* [num_slots, head_dim] */                                    \
      T* v_cache,              /* [num_slots, head_dim] */                                    \
      float* metric,           /* [num_slots] f32 or null */                                  \
      uint32_t* position,      /* [num_slots] u32 or null */                                  \
      const uint32_t* from,    /* [n] */                                                      \
      const uint32_t* to,      /* [n] */                                                      \
      int n, int head_dim) {                                                                  \
    kvc::move_slots<T>(k_cache, v_cache, metric, position, from, to, n, head_dim);            \
  }

KVC_KV_OPS(f32, float)
KVC_KV_OPS(bf16, __nv_bfloat16)
KVC_KV_OPS(f16, __half)

// Sets metric[slots[i]] = m[i] and position[slots[i]] = p[i], one thread per slot (slots
// distinct). candle's scatter_set of a 1-D tensor runs its whole index list in ONE thread:
// 220 ms for the 675k slots of one 7.5k-token SmolLM2 sequence, where this takes microseconds.
extern "C" __global__ void set_meta(
    float* metric,            // [num_slots] f32 (out at `slots`)
    uint32_t* position,       // [num_slots] u32 (out at `slots`)
    const uint32_t* slots,    // [n] distinct physical slots
    const float* m,           // [n] metric values
    const uint32_t* p,        // [n] positions
    int n) {                  // slots to set
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  metric[slots[i]] = m[i];
  position[slots[i]] = p[i];
}

// dst[idx[i]] = val[i], one thread per element (idx distinct): the patch of a decode batch's
// block table on the device (kvc::kvcache::step_tables), ~1.3k ids per SmolLM2 step at 224
// sequences, which candle's scatter_set ran in one thread (~2 ms of every step). An index
// past dst_len is never written (the host checked them all).
extern "C" __global__ void scatter_u32(
    uint32_t* dst,            // [dst_len] (out at `idx`)
    const uint32_t* idx,      // [n] distinct indices into dst
    const uint32_t* val,      // [n] values
    int n,                    // elements to set
    uint32_t dst_len) {       // elements of dst
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint32_t j = idx[i];
  if (j < dst_len) dst[j] = val[i];
}

// Copies whole blocks (a fork of a sequence into newly allocated blocks): block to[i] gets
// block from[i]'s block_size K and V rows, metrics and positions. One CUDA block per copied
// block, threads over its 4-byte words. A fork copied slot by slot uploaded and checked 16x more
// ids (1.35M for one 7.5k-token SmolLM2 sequence, 27-36 ms per fork).
extern "C" __global__ void copy_blocks(
    uint32_t* k_cache,        // [num_slots, row_words] K as 4-byte words (any 2- or 4-byte dtype)
    uint32_t* v_cache,        // [num_slots, row_words] V
    float* metric,            // [num_slots] f32 or null
    uint32_t* position,       // [num_slots] u32 or null
    const uint32_t* from,     // [n] source blocks
    const uint32_t* to,       // [n] destination blocks (distinct, none of them a source)
    int n,                    // blocks to copy
    int block_size,           // slots per block
    int row_words) {          // 4-byte words per K/V row
  const size_t words = (size_t)block_size * row_words;
  for (int i = blockIdx.x; i < n; i += gridDim.x) {
    const size_t src = (size_t)from[i] * words, dst = (size_t)to[i] * words;
    for (size_t x = threadIdx.x; x < words; x += blockDim.x) {
      k_cache[dst + x] = k_cache[src + x];
      v_cache[dst + x] = v_cache[src + x];
    }
    for (int j = threadIdx.x; j < block_size; j += blockDim.x) {
      const size_t s = (size_t)from[i] * block_size + j, d = (size_t)to[i] * block_size + j;
      if (metric) metric[d] = metric[s];
      if (position) position[d] = position[s];
    }
  }
}

// Gathers rows idx[i] of the K and V caches into k_out / v_out (a prefill's keys and values,
// in logical order). candle's index_select computes source offsets in 32-bit unsigned ints, so
// it read wrong rows of a cache past 2^32 elements (a 23 GB SmolLM2 pool at --batch-samples
// 64, 2026-12-03: garbage predictions); every offset here is 64-bit. One thread per 4-byte word.
extern "C" __global__ void gather_kv(
    uint32_t* k_out,          // [n, row_words] out
    uint32_t* v_out,          // [n, row_words] out
    const uint32_t* k_cache,  // [num_slots, row_words] K as 4-byte words (any 2- or 4-byte dtype)
    const uint32_t* v_cache,  // [num_slots, row_words] V
    const uint32_t* idx,      // [n] slots to read (each < num_slots, checked on the host)
    int n,                    // rows
    int row_words) {          // 4-byte words per row
  const size_t total = (size_t)n * row_words;
  for (size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x; x < total;
       x += (size_t)blockDim.x * gridDim.x) {
    const size_t r = x / row_words, w = x % row_words;
    const size_t src = (size_t)idx[r] * row_words + w;
    k_out[x] = k_cache[src];
    v_out[x] = v_cache[src];
  }
}
