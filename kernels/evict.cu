// KV-Compress eviction scheduling on the device for a batch of sequences: per-head sort of the
// slot metrics, block-candidate scoring, global selection of the cheapest candidates over all
// heads (layers x kv-heads) of each sequence, and per-head compaction (tail survivors into
// evicted holes: K, V, metric, position) with the new context lengths. The host sends the
// block tables, lengths, `n_evict` and the protected position per sequence; what comes back is
// the per-head counts and lengths. No per-slot data crosses PCIe.
//
// The heads of all sequences lie back to back: head h's blocks are blocks[start[h] ..
// start[h + 1]] (exactly ceil(ctx_lens[h] / block_size) of them, checked on the host), and the
// per-head outputs use the same offsets: candidates at cand[start[h] ..], the sorted order at
// order[start[h] * block_size ..]. Sequence s owns heads head_start[s] .. head_start[s + 1]
// (its layers x kv-heads, in (layer, kv-head) order).
//
// Three launches, in this order:
//   kvc_sort_candidates: grid (heads), 1024 threads, dynamic smem 8 * pow2 bytes
//     (pow2 = next power of two >= the longest head, <= 16384 on an H100 with the opt-in).
//     Sorts each head's logical slots ascending by metric (protected slots, position >=
//     first_protected[head], +inf; ties by logical index) with a bitonic sort as wide as the
//     head's own next power of two (a 300-token head of a batch whose longest is 8000 sorts
//     512 keys, not 8192), writes the sorted order and the head's candidate scores:
//     candidate j = sorted metric [j * block_size + h - 1], h = tokens in the head's last block.
//   kvc_select_blocks: grid (sequences), 1024 threads. Per sequence, takes its n_evict lowest
//     finite candidates over its heads (ties by head, then candidate index), writes how many
//     each head gives.
//   kvc_compact_heads: grid (heads), 1024 threads, dynamic smem 5 * max_len bytes (evicted
//     flags and the hole / survivor lists of the head). Head giving k candidates evicts its
//     (k - 1) * block_size + h lowest slots (a prefix of its sorted order); survivors in the tail
//     (logical >= new length), tail-most first, move into the lowest evicted holes; ctx_lens
//     shrink. Freed blocks are the head's blocks past ceil(new_len / block_size).
//
// Rust twin: kvc::kvcache::ops::kvcompress_evict (built from kvc::compress::kvcompress's
// select_blocks / head_evictions and BlockPool::plan_compaction).
#include "common.cuh"

namespace kvc {

// Order-preserving map of f32 to u32 (same order as Rust's f32::total_cmp).
__device__ __forceinline__ uint32_t ord(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float unord(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
constexpr uint32_t ORD_INF = 0xff800000u;  // ord(+inf)

// Tokens in the last block of a head of `len` tokens (block_size when full, 0 when empty).
__device__ __forceinline__ uint32_t last_block_tokens(uint32_t len, uint32_t bs) {
  return len == 0 ? 0 : (len - 1) % bs + 1;
}

}  // namespace kvc

extern "C" __global__ void __launch_bounds__(1024) kvc_sort_candidates(
    uint32_t* order,                 // [total blocks * block_size] u32 (out: sorted logical slots)
    float* cand,                     // [total blocks] f32 (out: candidate scores)
    const float* metric,             // [num_slots] f32
    const uint32_t* position,        // [num_slots] u32
    const uint32_t* blocks,          // [total blocks] u32: every head's blocks, back to back
    const uint32_t* start,           // [heads + 1] u32: first block of each head in `blocks`
    const uint32_t* ctx_lens,        // [heads] u32
    int block_size,                  // tokens per block
    const uint32_t* first_protected) {  // [heads] u32: positions >= this are never evicted
  extern __shared__ unsigned long long keys[];  // [next pow2 of len]: (ord(metric) << 32) | slot
  const int head = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
  const uint32_t len = ctx_lens[head], protect = first_protected[head];
  if (len == 0) return;
  const uint32_t* table = blocks + start[head];
  int width = 1;
  while ((uint32_t)width < len) width <<= 1;
  for (int i = tid; i < width; i += nt) {
    unsigned long long key = ~0ull;
    if ((uint32_t)i < len) {
      const uint32_t s = kvc::slot_of(table, i, block_size);
      const float m = position[s] >= protect ? __int_as_float(0x7f800000) : metric[s];
      key = ((unsigned long long)kvc::ord(m) << 32) | (uint32_t)i;
    }
    keys[i] = key;
  }
  __syncthreads();
  // Bitonic sort, ascending.
  for (int k = 2; k <= width; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = tid; i < width; i += nt) {
        const int p = i ^ j;
        if (p > i) {
          const unsigned long long a = keys[i], b = keys[p];
          const bool up = (i & k) == 0;
          if ((a > b) == up) {
            keys[i] = b;
            keys[p] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  uint32_t* ord_row = order + (size_t)start[head] * block_size;
  for (uint32_t i = tid; i < len; i += nt) ord_row[i] = (uint32_t)keys[i];
  const uint32_t h = kvc::last_block_tokens(len, block_size);
  const uint32_t nblocks = (len + block_size - 1) / block_size;
  for (uint32_t j = tid; j < nblocks; j += nt) {
    const float m = kvc::unord((uint32_t)(keys[(size_t)j * block_size + h - 1] >> 32));
    cand[start[head] + j] = isfinite(m) ? m : __int_as_float(0x7f800000);
  }
}

namespace kvc {
// Number of candidates of a head with ord key <= k (candidates are non-decreasing).
__device__ __forceinline__ uint32_t count_le(const float* c, uint32_t n, uint32_t k) {
  uint32_t lo = 0, hi = n;
  while (lo < hi) {
    const uint32_t mid = (lo + hi) / 2;
    if (ord(c[mid]) <= k) lo = mid + 1; else hi = mid;
  }
  return lo;
}

__device__ unsigned long long block_sum(unsigned long long v, unsigned long long* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int w = threadIdx.x / 32, nw = (blockDim.x + 31) / 32;
  __syncthreads();
  if (threadIdx.x % 32 == 0) red[w] = v;
  __syncthreads();
  unsigned long long t = 0;
  for (int i = 0; i < nw; ++i) t += red[i];
  return t;
}
}  // namespace kvc

extern "C" __global__ void __launch_bounds__(1024) kvc_select_blocks(
    uint32_t* counts_all,            // [heads] u32 (out: candidates taken per head)
    uint32_t* lt_all,                // [heads] u32 (scratch)
    const float* cand_all,           // [total blocks] f32, non-decreasing per head
    const uint32_t* start_all,       // [heads + 1] u32: first candidate (block) of each head
    const uint32_t* head_start,      // [sequences + 1] u32: first head row of each sequence
    const unsigned long long* n_evict_of) {  // [sequences] candidates (blocks) to take
  __shared__ unsigned long long red[32];
  const int tid = threadIdx.x, nt = blockDim.x;
  // This block's sequence: its heads only.
  const uint32_t first = head_start[blockIdx.x];
  const int heads = (int)(head_start[blockIdx.x + 1] - first);
  const unsigned long long n_evict = n_evict_of[blockIdx.x];
  uint32_t* counts = counts_all + first;
  uint32_t* lt_scratch = lt_all + first;
  const uint32_t* start = start_all + first;
  // Head h's candidates (one per block) and their number.
  auto cand = [&](int h) { return cand_all + start[h]; };
  auto nb = [&](int h) { return start[h + 1] - start[h]; };
  auto total_le = [&](uint32_t k) {
    unsigned long long c = 0;
    for (int h = tid; h < heads; h += nt) c += kvc::count_le(cand(h), nb(h), k);
    return kvc::block_sum(c, red);
  };
  const unsigned long long finite = total_le(kvc::ORD_INF - 1);
  const unsigned long long n = n_evict < finite ? n_evict : finite;
  for (int h = tid; h < heads; h += nt) counts[h] = 0;
  if (n == 0) return;
  // Smallest key K with total_le(K) >= n.
  uint32_t lo = 0, hi = kvc::ORD_INF - 1;
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (total_le(mid) >= n) hi = mid; else lo = mid + 1;
  }
  const uint32_t K = lo;
  // Strictly below K: taken; equal to K: taken in head order until n.
  unsigned long long below = 0;
  for (int h = tid; h < heads; h += nt) {
    const uint32_t lt = K == 0 ? 0 : kvc::count_le(cand(h), nb(h), K - 1);
    lt_scratch[h] = lt;
    below += lt;
  }
  below = kvc::block_sum(below, red);
  __syncthreads();
  if (tid == 0) {
    unsigned long long rem = n - below;
    for (int h = 0; h < heads; ++h) {
      const uint32_t le = kvc::count_le(cand(h), nb(h), K);
      const unsigned long long eq = le - lt_scratch[h];
      const unsigned long long t = rem < eq ? rem : eq;
      counts[h] = lt_scratch[h] + (uint32_t)t;
      rem -= t;
    }
  }
}

extern "C" __global__ void __launch_bounds__(1024) kvc_compact_heads(
    float* k_cache_f,                // [num_slots, head_dim] K (any 2- or 4-byte dtype, as words)
    float* v_cache_f,                // [num_slots, head_dim] V
    float* metric,                   // [num_slots] f32
    uint32_t* position,              // [num_slots] u32
    uint32_t* ctx_lens,              // [heads] u32 (in/out)
    const uint32_t* order,           // [total blocks * block_size] u32 (sorted logical slots)
    const uint32_t* counts,          // [heads] u32 candidates taken per head
    const uint32_t* blocks,          // [total blocks] u32: every head's blocks, back to back
    const uint32_t* start,           // [heads + 1] u32: first block of each head in `blocks`
    int block_size,                  // tokens per block
    int max_len,                     // longest head (sizes the shared lists)
    int row_words) {                 // 4-byte words per K/V row (head_dim * elem_size / 4)
  // Shared: holes and tail survivors (u16: heads hold at most 16384 tokens), evicted flags.
  extern __shared__ uint16_t lists[];
  __shared__ int cnt_s[2];
  const int head = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
  const uint32_t len = ctx_lens[head], k = counts[head];
  if (k == 0 || len == 0) return;
  const uint32_t e = (k - 1) * block_size + kvc::last_block_tokens(len, block_size);
  const uint32_t new_len = len - e;
  const uint32_t* table = blocks + start[head];
  const uint32_t* ord_row = order + (size_t)start[head] * block_size;
  uint16_t* holes = lists;
  uint16_t* tail = lists + max_len;
  uint8_t* gone = reinterpret_cast<uint8_t*>(lists + 2 * max_len);  // 1 = evicted, per slot
  for (uint32_t i = tid; i < len; i += nt) gone[i] = 0;
  __syncthreads();
  for (uint32_t r = tid; r < e; r += nt) gone[ord_row[r]] = 1;
  __syncthreads();
  // Holes: evicted logical slots < new_len, ascending (stable compaction by chunks + ballots).
  if (tid == 0) cnt_s[0] = 0;
  __syncthreads();
  __shared__ int warp_off[32];
  for (uint32_t base = 0; base < new_len; base += nt) {
    const uint32_t i = base + tid;
    const bool f = i < new_len && gone[i] == 1;
    const unsigned ball = __ballot_sync(0xffffffffu, f);
    const int w = tid / 32, l = tid % 32;
    if (l == 0) warp_off[w] = __popc(ball);
    __syncthreads();
    int off = cnt_s[0];
    for (int x = 0; x < w; ++x) off += warp_off[x];
    if (f) holes[off + __popc(ball & ((1u << l) - 1))] = (uint16_t)i;
    __syncthreads();
    if (tid == 0) {
      int t = 0;
      for (int x = 0; x < nt / 32; ++x) t += warp_off[x];
      cnt_s[0] += t;
    }
    __syncthreads();
  }
  const int n_holes = cnt_s[0];
  __syncthreads();
  // Tail survivors: not evicted, logical >= new_len, tail-most first.
  if (tid == 0) cnt_s[1] = 0;
  __syncthreads();
  for (uint32_t base = 0; base < e; base += nt) {
    const uint32_t r = base + tid;  // r-th slot from the end
    const uint32_t i = len - 1 - r;
    const bool f = r < e && gone[i] == 0;
    const unsigned ball = __ballot_sync(0xffffffffu, f);
    const int w = tid / 32, l = tid % 32;
    if (l == 0) warp_off[w] = __popc(ball);
    __syncthreads();
    int off = cnt_s[1];
    for (int x = 0; x < w; ++x) off += warp_off[x];
    if (f) tail[off + __popc(ball & ((1u << l) - 1))] = (uint16_t)i;
    __syncthreads();
    if (tid == 0) {
      int t = 0;
      for (int x = 0; x < nt / 32; ++x) t += warp_off[x];
      cnt_s[1] += t;
    }
    __syncthreads();
  }
  // Moves: one warp per move, lanes over the row's words.
  const int w = tid / 32, l = tid % 32, nw = nt / 32;
  for (int m = w; m < n_holes; m += nw) {
    const uint32_t from = kvc::slot_of(table, tail[m], block_size);
    const uint32_t to = kvc::slot_of(table, holes[m], block_size);
    for (int x = l; x < row_words; x += 32) {
      k_cache_f[(size_t)to * row_words + x] = k_cache_f[(size_t)from * row_words + x];
      v_cache_f[(size_t)to * row_words + x] = v_cache_f[(size_t)from * row_words + x];
    }
    if (l == 0) {
      metric[to] = metric[from];
      position[to] = position[from];
    }
  }
  if (tid == 0) ctx_lens[head] = new_len;
}
