// KV-Compress eviction scheduling on the device for a batch of sequences: per-head sort of the
// slot metrics, block-candidate scoring, global selection of the cheapest candidates over all
// heads (layers x kv-heads) of each sequence, and per-head compaction (tail survivors into
// evicted holes: K, V, metric, position) with the new context lengths. The host sends the
// block tables, lengths, `n_evict` and the protected position per sequence; what comes back is
// the per-head counts and lengths. No per-slot data crosses PCIe.
//
// Head h's block table is blocks[tab[h] ..] (its first ceil(ctx_lens[h] / block_size) entries
// are read). The per-head outputs lie back to back: start[h + 1] - start[h] = ceil(ctx_lens[h] /
// block_size) (checked on the host), candidates at cand[start[h] ..], the sorted order at
// order[start[h] * block_size ..]. With tables uploaded back to back, tab[h] = start[h]; with
// a decode batch's device-resident tables (kvc::kvcache::step_tables), tab[h] is the row's
// offset there and nothing but tab, start and the lengths is uploaded.
// Sequence s owns heads head_start[s] .. head_start[s + 1]
// (its layers x kv-heads, in (layer, kv-head) order).
//
// Three launches, in this order (four with KVCrush's block form, which runs between the
// selection and the compaction; the sort is two launches, kvc_sort_candidates and
// kvc_sort_prefix, when the step needs only a prefix of some heads' order — see below):
//   kvc_sort_candidates: grid (heads), 1024 threads, dynamic smem 8 * pow2 bytes
//     (pow2 = next power of two >= the longest head it sorts, <= SMEM_MAX_LEN; longer heads
//     take the kvc_long_* launches below, which write the same order and candidates).
//     Sorts each head's logical slots ascending by metric (protected slots, position >=
//     first_protected[head], +inf; ties by logical index) with a bitonic sort as wide as the
//     head's own next power of two (a 300-token head of a batch whose longest is 8000 sorts
//     512 keys, not 8192), writes the sorted order and the head's candidate scores:
//     candidate j = sorted metric [j * block_size + h - 1], h = tokens in the head's last block.
//   kvc_select_blocks: grid (sequences), 1024 threads. Per sequence, takes its n_evict lowest
//     finite candidates over its heads (ties by head, then candidate index), writes how many
//     each head gives.
//   kvc_compact_heads: grid (heads), 1024 threads, dynamic smem 5 * max_len bytes (evicted
//     flags and the hole / survivor lists of the head; max_len <= SMEM_MAX_LEN, heads longer
//     than SMEM_MAX_LEN keep them in global scratch). Head giving k candidates evicts its
//     (k - 1) * block_size + h lowest slots (a prefix of its sorted order); survivors in the tail
//     (logical >= new length), tail-most first, move into the lowest evicted holes; ctx_lens
//     shrink. Freed blocks are the head's blocks past ceil(new_len / block_size). With KVCrush,
//     the groups `kvc_crush_pick` kept are left out of that prefix and the head evicts
//     `evict_n[head]` slots.
//   kvc_crush_pick (KVCrush's block form): grid (layers, sequences), 1024 threads. Per
//     (sequence, layer): the median of the layer's unprotected metrics, each head's evicted
//     prefix cut into groups of block_size from the top, a group's signature (its slots in
//     position order, bit = metric >= median), the anchor (given, or the per-bit majority),
//     Hamming distances, the stable order by (distance, head, group), and the groups at ranks
//     floor(i * n / K), i < K (all when K >= n) are kept.
//
// Rust twins: kvc::kvcache::ops::kvcompress_evict (built from kvc::compress::kvcompress's
// select_blocks / head_evictions, kvc::compress::kvcrush::block_picks and
// BlockPool::plan_compaction).
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

// Longest prefix kvc_sort_prefix selects (its per-warp shared list).
constexpr uint32_t PREFIX_MAX = 512;

// Longest head kvc_sort_candidates sorts and kvc_compact_heads compacts in shared memory
// (16384 keys of 8 bytes are 128 KB); longer heads take the global-memory paths.
constexpr uint32_t SMEM_MAX_LEN = 16384;

// Keys one kvc_long_chunk block sorts in shared memory.
constexpr uint32_t LONG_CHUNK = 16384;

// Sort key of a head's logical slot i: (ord(metric) << 32) | i, +inf when protected.
__device__ __forceinline__ unsigned long long slot_key(const float* metric,
                                                       const uint32_t* position,
                                                       const uint32_t* table, uint32_t i,
                                                       int block_size, uint32_t protect) {
  const uint32_t s = slot_of(table, i, block_size);
  const float m = position[s] >= protect ? __int_as_float(0x7f800000) : metric[s];
  return ((unsigned long long)ord(m) << 32) | i;
}

// Whether head h needs only the `want[h]` lowest slots of its sorted order (fewer than it
// holds, at most PREFIX_MAX): kvc_sort_prefix sorts it, kvc_sort_candidates skips it.
__device__ __forceinline__ bool takes_prefix(const uint32_t* want, int h, uint32_t len) {
  return want != nullptr && want[h] < len && want[h] <= PREFIX_MAX;
}

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
    const uint32_t* blocks,          // block ids; head h's table at blocks[tab[h] ..]
    const uint32_t* tab,             // [heads] u32: where each head's table starts in `blocks`
    const uint32_t* start,           // [heads + 1] u32: first output block of each head
    const uint32_t* ctx_lens,        // [heads] u32
    int block_size,                  // tokens per block
    const uint32_t* first_protected, // [heads] u32: positions >= this are never evicted
    const uint32_t* want) {          // [heads] u32 or null: sorted slots the step needs
  extern __shared__ unsigned long long keys[];  // [next pow2 of len]: (ord(metric) << 32) | slot
  const int head = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
  const uint32_t len = ctx_lens[head], protect = first_protected[head];
  if (len == 0 || kvc::takes_prefix(want, head, len)) return;  // kvc_sort_prefix's head
  if (len > kvc::SMEM_MAX_LEN) return;                          // the kvc_long_* launches'
  const uint32_t* table = blocks + tab[head];
  int width = 1;
  while ((uint32_t)width < len) width <<= 1;
  for (int i = tid; i < width; i += nt) {
    keys[i] = (uint32_t)i < len
                  ? kvc::slot_key(metric, position, table, i, block_size, protect)
                  : ~0ull;
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

// Heads longer than SMEM_MAX_LEN that need their whole order (a prefill's compression at 128k):
// a bitonic sort in global memory, over the long heads of the step at once, writing exactly
// what kvc_sort_candidates writes. Long head l is head long_head[l]; its keys lie at
// gkeys[long_off[l] ..], padded with ~0 to its power of two width = long_off[l + 1] -
// long_off[l] (> LONG_CHUNK). Launches, in order (grid (x, long heads)):
//   kvc_long_keys: the keys (kvc::slot_key).
//   kvc_long_chunk (k = 0): every chunk of LONG_CHUNK keys through the network's stages
//     k <= LONG_CHUNK, in shared memory (dynamic smem 8 * LONG_CHUNK bytes).
//   for k = 2 LONG_CHUNK .. the widest head, doubling: kvc_long_step (k, j) for
//     j = k / 2 .. LONG_CHUNK, halving (one compare-exchange per thread in global memory),
//     then kvc_long_chunk (k) for the steps j < LONG_CHUNK. Heads narrower than k are done.
//   kvc_long_emit: the sorted order and the candidates, as kvc_sort_candidates writes them.
extern "C" __global__ void __launch_bounds__(1024) kvc_long_keys(
    unsigned long long* gkeys,       // [long_off[long heads]] u64 (out)
    const uint32_t* long_head,       // [long heads] u32: head index
    const uint32_t* long_off,        // [long heads + 1] u32: first key of each long head
    const float* metric,             // [num_slots] f32
    const uint32_t* position,        // [num_slots] u32
    const uint32_t* blocks,          // block ids; head h's table at blocks[tab[h] ..]
    const uint32_t* tab,             // [heads] u32
    const uint32_t* ctx_lens,        // [heads] u32
    int block_size,                  // tokens per block
    const uint32_t* first_protected) {  // [heads] u32
  const int l = blockIdx.y;
  const uint32_t head = long_head[l], off = long_off[l], width = long_off[l + 1] - off;
  const uint32_t len = ctx_lens[head], protect = first_protected[head];
  const uint32_t* table = blocks + tab[head];
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < width;
       i += gridDim.x * blockDim.x) {
    gkeys[off + i] =
        i < len ? kvc::slot_key(metric, position, table, i, block_size, protect) : ~0ull;
  }
}

// Bitonic steps j < LONG_CHUNK inside each chunk of LONG_CHUNK keys (grid (chunks of the
// widest head, long heads)): all stages k <= LONG_CHUNK when k == 0, else stage k's. The
// direction of a pair is the network's, from the key's index in its head ((index & k) == 0:
// ascending), so chunks alternate at stage LONG_CHUNK and follow stage k after.
extern "C" __global__ void __launch_bounds__(1024) kvc_long_chunk(
    unsigned long long* gkeys,       // [long_off[long heads]] u64 (in/out)
    const uint32_t* long_off,        // [long heads + 1] u32
    uint32_t k) {                    // stage, or 0 for all stages up to LONG_CHUNK
  extern __shared__ unsigned long long ks[];  // [LONG_CHUNK]
  const int l = blockIdx.y, tid = threadIdx.x, nt = blockDim.x;
  const uint32_t off = long_off[l], width = long_off[l + 1] - off;
  const uint32_t base = blockIdx.x * kvc::LONG_CHUNK;
  if (base >= width || k > width) return;
  unsigned long long* g = gkeys + off + base;
  for (uint32_t i = tid; i < kvc::LONG_CHUNK; i += nt) ks[i] = g[i];
  __syncthreads();
  auto steps = [&](uint32_t kk, uint32_t j0) {
    for (uint32_t j = j0; j > 0; j >>= 1) {
      for (uint32_t i = tid; i < kvc::LONG_CHUNK; i += nt) {
        const uint32_t p = i ^ j;
        if (p > i) {
          const unsigned long long a = ks[i], b = ks[p];
          if ((a > b) == (((base + i) & kk) == 0)) {
            ks[i] = b;
            ks[p] = a;
          }
        }
      }
      __syncthreads();
    }
  };
  if (k == 0) {
    for (uint32_t kk = 2; kk <= kvc::LONG_CHUNK; kk <<= 1) steps(kk, kk >> 1);
  } else {
    steps(k, kvc::LONG_CHUNK >> 1);
  }
  for (uint32_t i = tid; i < kvc::LONG_CHUNK; i += nt) g[i] = ks[i];
}

// One bitonic step (k, j >= LONG_CHUNK) over the long heads at least k wide, in global memory
// (grid (x, long heads)): thread t compares key i (bit j clear) with key i + j.
extern "C" __global__ void __launch_bounds__(1024) kvc_long_step(
    unsigned long long* gkeys,       // [long_off[long heads]] u64 (in/out)
    const uint32_t* long_off,        // [long heads + 1] u32
    uint32_t k,                      // stage (a power of two)
    uint32_t j) {                    // step (a power of two, < k)
  const int l = blockIdx.y;
  const uint32_t off = long_off[l], width = long_off[l + 1] - off;
  if (k > width) return;
  unsigned long long* g = gkeys + off;
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < width / 2;
       t += gridDim.x * blockDim.x) {
    const uint32_t i = ((t & ~(j - 1)) << 1) | (t & (j - 1)), p = i + j;
    const unsigned long long a = g[i], b = g[p];
    if ((a > b) == ((i & k) == 0)) {
      g[i] = b;
      g[p] = a;
    }
  }
}

// The long heads' sorted order and candidates from their sorted keys (grid (x, long heads)).
extern "C" __global__ void __launch_bounds__(1024) kvc_long_emit(
    uint32_t* order,                 // [total blocks * block_size] u32 (out)
    float* cand,                     // [total blocks] f32 (out)
    const unsigned long long* gkeys, // [long_off[long heads]] u64, each head sorted
    const uint32_t* long_head,       // [long heads] u32
    const uint32_t* long_off,        // [long heads + 1] u32
    const uint32_t* start,           // [heads + 1] u32: first output block of each head
    const uint32_t* ctx_lens,        // [heads] u32
    int block_size) {                // tokens per block
  const int l = blockIdx.y;
  const uint32_t head = long_head[l], len = ctx_lens[head];
  const unsigned long long* keys = gkeys + long_off[l];
  uint32_t* ord_row = order + (size_t)start[head] * block_size;
  const uint32_t step = gridDim.x * blockDim.x, first = blockIdx.x * blockDim.x + threadIdx.x;
  for (uint32_t i = first; i < len; i += step) ord_row[i] = (uint32_t)keys[i];
  const uint32_t h = kvc::last_block_tokens(len, block_size);
  const uint32_t nblocks = (len + block_size - 1) / block_size;
  for (uint32_t j = first; j < nblocks; j += step) {
    const float m = kvc::unord((uint32_t)(keys[(size_t)j * block_size + h - 1] >> 32));
    cand[start[head] + j] = isfinite(m) ? m : __int_as_float(0x7f800000);
  }
}

// The heads that need only a prefix of their sorted order: a decode step's continual
// compression takes a few blocks per sequence, and a head giving k blocks evicts its
// (k - 1) * block_size + h lowest slots, so want = n_evict * block_size slots of each head
// decide the step (candidates past them are never taken: a head gives at most n_evict blocks;
// they are written +inf, which leaves the selection unchanged). One warp per head, not a
// 1024-thread block: the full bitonic sort was latency-bound on its ~66 barriers per head
// while ~17k heads queued.
//   kvc_sort_prefix: grid (ceil(heads / 4)), 128 threads (a warp per head), static smem 18 KB.
//   Per head with takes_prefix: its keys ord(metric) (+inf when protected) go to the head's
//   rows of `order` as scratch; a radix select (four 8-bit passes) finds the want-th smallest
//   key T; the keys below T, then those equal to T in logical order, are the want lowest
//   (metric, logical index) pairs, sorted in shared memory (bitonic) and written as
//   order[0 .. want) with the candidates — exactly what kvc_sort_candidates writes there.
extern "C" __global__ void __launch_bounds__(128) kvc_sort_prefix(
    uint32_t* order,                 // [total blocks * block_size] u32 (out; scratch first)
    float* cand,                     // [total blocks] f32 (out)
    const float* metric,             // [num_slots] f32
    const uint32_t* position,        // [num_slots] u32
    const uint32_t* blocks,          // block ids; head h's table at blocks[tab[h] ..]
    const uint32_t* tab,             // [heads] u32
    const uint32_t* start,           // [heads + 1] u32: first output block of each head
    const uint32_t* ctx_lens,        // [heads] u32
    int block_size,                  // tokens per block
    const uint32_t* first_protected, // [heads] u32
    const uint32_t* want,            // [heads] u32: sorted slots needed
    int heads) {                     // number of heads
  constexpr int W = 4;
  __shared__ uint32_t hist_s[W][256];
  __shared__ unsigned long long sel_s[W][kvc::PREFIX_MAX];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int head = blockIdx.x * W + warp;
  if (head >= heads) return;
  const uint32_t len = ctx_lens[head];
  if (!kvc::takes_prefix(want, head, len)) return;
  const uint32_t p = want[head], protect = first_protected[head];
  const uint32_t* table = blocks + tab[head];
  uint32_t* keys = order + (size_t)start[head] * block_size;
  uint32_t* hist = hist_s[warp];
  unsigned long long* sel = sel_s[warp];
  for (uint32_t i = lane; i < len; i += 32) {
    const uint32_t s = kvc::slot_of(table, i, block_size);
    keys[i] = position[s] >= protect ? kvc::ORD_INF : kvc::ord(metric[s]);
  }
  __syncwarp();
  // Radix select of rank p - 1: digits from the top, among the keys matching the prefix.
  uint32_t prefix = 0, mask = 0, rank = p - 1;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = lane; b < 256; b += 32) hist[b] = 0;
    __syncwarp();
    for (uint32_t i = lane; i < len; i += 32) {
      const uint32_t k = keys[i];
      if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
    }
    __syncwarp();
    // Lane l owns bins 8l .. 8l + 7: the digit whose cumulative count passes `rank`.
    uint32_t local = 0;
    for (int b = 0; b < 8; ++b) local += hist[lane * 8 + b];
    uint32_t incl = local;
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    const uint32_t excl = incl - local;
    const bool mine = rank >= excl && rank < incl;
    uint32_t digit = 0, before = 0;
    if (mine) {
      uint32_t c = excl;
      for (int b = 0; b < 8; ++b) {
        const uint32_t hb = hist[lane * 8 + b];
        if (rank < c + hb) {
          digit = lane * 8 + b;
          break;
        }
        c += hb;
      }
      before = c;
    }
    const int owner = __ffs(__ballot_sync(0xffffffffu, mine)) - 1;
    digit = __shfl_sync(0xffffffffu, digit, owner);
    before = __shfl_sync(0xffffffffu, before, owner);
    prefix |= digit << shift;
    mask |= 255u << shift;
    rank -= before;
    __syncwarp();
  }
  // Keys below T, then the first rank + 1 keys equal to T in logical order.
  const uint32_t T = prefix, need_eq = rank + 1;
  uint32_t n_sel = 0, eq_seen = 0;
  const unsigned below_me = (1u << lane) - 1;
  for (uint32_t base = 0; base < len; base += 32) {
    const uint32_t i = base + lane;
    const uint32_t k = i < len ? keys[i] : 0xffffffffu;
    const bool lt = i < len && k < T, eq = i < len && k == T;
    const unsigned ball_eq = __ballot_sync(0xffffffffu, eq);
    const bool take = lt || (eq && eq_seen + __popc(ball_eq & below_me) < need_eq);
    const unsigned ball = __ballot_sync(0xffffffffu, take);
    if (take) sel[n_sel + __popc(ball & below_me)] = ((unsigned long long)k << 32) | i;
    n_sel += __popc(ball);
    eq_seen += __popc(ball_eq);
  }
  uint32_t width = 1;
  while (width < p) width <<= 1;
  for (uint32_t i = p + lane; i < width; i += 32) sel[i] = ~0ull;
  __syncwarp();
  for (uint32_t k = 2; k <= width; k <<= 1) {
    for (uint32_t j = k >> 1; j > 0; j >>= 1) {
      for (uint32_t i = lane; i < width; i += 32) {
        const uint32_t q = i ^ j;
        if (q > i) {
          const unsigned long long a = sel[i], b = sel[q];
          if ((a > b) == ((i & k) == 0)) {
            sel[i] = b;
            sel[q] = a;
          }
        }
      }
      __syncwarp();
    }
  }
  for (uint32_t i = lane; i < p; i += 32) keys[i] = (uint32_t)sel[i];
  const uint32_t h = kvc::last_block_tokens(len, block_size);
  const uint32_t nblocks = (len + block_size - 1) / block_size;
  for (uint32_t j = lane; j < nblocks; j += 32) {
    const uint32_t idx = j * block_size + h - 1;
    const float m = idx < p ? kvc::unord((uint32_t)(sel[idx] >> 32)) : __int_as_float(0x7f800000);
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

namespace kvc {
constexpr int CRUSH_MAX_HEADS = 64;  // kv-heads per layer
constexpr int CRUSH_BINS = 66;       // distances 0..=64, and 65 for "no group"

// Slots of a head's sorted order with a key below ORD_INF (its evictable slots: protected ones
// sort last as +inf; unprotected metrics are finite).
__device__ uint32_t evictable_prefix(const float* metric, const uint32_t* position,
                                     const uint32_t* ord_row, const uint32_t* table, uint32_t len,
                                     int bs, uint32_t protect) {
  uint32_t lo = 0, hi = len;
  while (lo < hi) {
    const uint32_t mid = (lo + hi) / 2;
    const uint32_t s = slot_of(table, ord_row[mid], bs);
    if (position[s] < protect) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Of a head's first `n` sorted slots (ascending metric), how many have ord(metric) <= k.
__device__ uint32_t sorted_le(const float* metric, const uint32_t* ord_row, const uint32_t* table,
                              uint32_t n, int bs, uint32_t k) {
  uint32_t lo = 0, hi = n;
  while (lo < hi) {
    const uint32_t mid = (lo + hi) / 2;
    if (ord(metric[slot_of(table, ord_row[mid], bs)]) <= k) lo = mid + 1; else hi = mid;
  }
  return lo;
}
}  // namespace kvc

extern "C" __global__ void __launch_bounds__(1024) kvc_crush_pick(
    uint32_t* evict_n,               // [heads] u32 (out: slots each head evicts after the picks)
    uint8_t* picked,                 // [total blocks] u8 (out: group g of head h, counted from
                                     //   the top of its evicted prefix, is kept iff
                                     //   picked[start[h] + g]; written for g < prefix / bs)
    unsigned long long* sig,         // [total blocks] u64 scratch: a layer's groups from
                                     //   start[its first head]
    uint32_t* rank,                  // [total blocks] u32 scratch, same indexing
    const float* metric,             // [num_slots] f32
    const uint32_t* position,        // [num_slots] u32
    const uint32_t* order,           // [total blocks * block_size] u32 (kvc_sort_candidates)
    const uint32_t* counts,          // [heads] u32 (kvc_select_blocks)
    const uint32_t* blocks,          // block ids; head h's table at blocks[tab[h] ..]
    const uint32_t* tab,             // [heads] u32: where each head's table starts in `blocks`
    const uint32_t* start,           // [heads + 1] u32: first output block of each head
    const uint32_t* ctx_lens,        // [heads] u32
    const uint32_t* first_protected, // [heads] u32
    const uint32_t* head_start,      // [sequences + 1] u32: first head row of each sequence
    const uint32_t* groups_of,       // [sequences] u32: groups kept per layer (0: no KVCrush)
    const unsigned long long* anchor_of,  // [sequences] u64: anchor bits (bit i: the i-th slot
                                          //   of a group in position order)
    const uint32_t* mean_of,         // [sequences] u32: 1 = anchor is the per-bit majority
    int block_size,                  // tokens per block (<= 64: one u64 signature)
    int kv_heads) {                  // heads per layer (<= CRUSH_MAX_HEADS)
  __shared__ uint32_t e_s[kvc::CRUSH_MAX_HEADS], goff[kvc::CRUSH_MAX_HEADS + 1];
  __shared__ uint32_t picks_s[kvc::CRUSH_MAX_HEADS], u_s[kvc::CRUSH_MAX_HEADS];
  __shared__ uint32_t bits_s[64], base_s[kvc::CRUSH_BINS], wcnt[32][kvc::CRUSH_BINS];
  __shared__ uint32_t le_s[kvc::CRUSH_MAX_HEADS];
  __shared__ float median_s;
  __shared__ unsigned long long anchor_s;
  const int seq = blockIdx.y, tid = threadIdx.x, nt = blockDim.x;
  const int lane = tid % 32, w = tid / 32, nw = nt / 32;
  const uint32_t r0 = head_start[seq] + blockIdx.x * kv_heads;
  if (r0 + kv_heads > head_start[seq + 1]) return;
  const int bs = block_size;
  const uint32_t K = groups_of[seq];
  // Evicted prefix and groups of each head.
  if (tid < kv_heads) {
    const uint32_t h = r0 + tid, len = ctx_lens[h], k = counts[h];
    e_s[tid] = k == 0 ? 0 : (k - 1) * bs + kvc::last_block_tokens(len, bs);
    picks_s[tid] = 0;
  }
  __syncthreads();
  if (tid == 0) {
    goff[0] = 0;
    for (int h = 0; h < kv_heads; ++h) goff[h + 1] = goff[h] + (K == 0 ? 0 : e_s[h] / bs);
  }
  __syncthreads();
  const uint32_t n = goff[kv_heads];
  auto head_of = [&](uint32_t j) {
    int h = 0;
    while (goff[h + 1] <= j) ++h;
    return h;
  };
  const uint32_t base = start[r0];
  if (n > 0 && K < n) {
    // Median of the layer's unprotected metrics: the element of rank u / 2 among the heads'
    // sorted evictable prefixes, found by bisection over ord keys (warp 0, lanes over heads).
    if (w == 0) {
      uint32_t u = 0;
      for (int h = lane; h < kv_heads; h += 32) {
        const uint32_t hh = r0 + h;
        const uint32_t* ord_row = order + (size_t)start[hh] * bs;
        u_s[h] = kvc::evictable_prefix(metric, position, ord_row, blocks + tab[hh],
                                       ctx_lens[hh], bs, first_protected[hh]);
        u += u_s[h];
      }
      for (int o = 16; o > 0; o >>= 1) u += __shfl_xor_sync(0xffffffffu, u, o);
      float med = 0.0f;
      if (u > 0) {
        const uint32_t want = u / 2;  // smallest key with more than `want` keys <= it
        uint32_t lo = 0, hi = kvc::ORD_INF - 1;
        while (lo < hi) {
          const uint32_t mid = lo + (hi - lo) / 2;
          uint32_t c = 0;
          for (int h = lane; h < kv_heads; h += 32) {
            const uint32_t hh = r0 + h;
            c += kvc::sorted_le(metric, order + (size_t)start[hh] * bs, blocks + tab[hh],
                                u_s[h], bs, mid);
          }
          for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
          if (c > want) hi = mid; else lo = mid + 1;
        }
        med = kvc::unord(lo);
      }
      if (lane == 0) median_s = med;
    }
    if (tid < 64) bits_s[tid] = 0;
    __syncthreads();
    const float median = median_s;
    // Signatures: bit i = the metric of the group's i-th slot in position order >= median.
    for (uint32_t j = tid; j < n; j += nt) {
      const int h = head_of(j);
      const uint32_t hh = r0 + h, g = j - goff[h];
      const uint32_t* ord_row = order + (size_t)start[hh] * bs;
      const uint32_t* table = blocks + tab[hh];
      const uint32_t first = e_s[h] - (g + 1) * bs;
      uint32_t pos[64];
      bool one[64];
      for (int t = 0; t < bs; ++t) {
        const uint32_t s = kvc::slot_of(table, ord_row[first + t], bs);
        pos[t] = position[s];
        one[t] = metric[s] >= median;
      }
      unsigned long long x = 0;
      for (int t = 0; t < bs; ++t) {
        int r = 0;  // positions within a head are distinct
        for (int q = 0; q < bs; ++q) r += pos[q] < pos[t];
        if (one[t]) x |= 1ull << r;
      }
      sig[base + j] = x;
      if (mean_of[seq]) {
        for (unsigned long long y = x; y; y &= y - 1) atomicAdd(&bits_s[__ffsll(y) - 1], 1u);
      }
    }
    __syncthreads();
    if (tid == 0) {
      unsigned long long a = anchor_of[seq];
      if (mean_of[seq]) {
        a = 0;
        for (int b = 0; b < bs; ++b)
          if (2 * bits_s[b] > n) a |= 1ull << b;
      }
      anchor_s = a;
    }
    // Stable ranks by (distance, group index): a histogram of the distances gives each
    // distance's first rank; chunk by chunk, a group's rank adds the groups of the same
    // distance before it (earlier warps' counts, then earlier lanes by __match_any_sync).
    for (int b = tid; b < kvc::CRUSH_BINS; b += nt) base_s[b] = 0;
    __syncthreads();
    const unsigned long long anchor = anchor_s;
    for (uint32_t j = tid; j < n; j += nt) atomicAdd(&base_s[__popcll(sig[base + j] ^ anchor)], 1u);
    __syncthreads();
    if (tid == 0) {
      uint32_t run = 0;
      for (int b = 0; b < kvc::CRUSH_BINS; ++b) {
        const uint32_t c = base_s[b];
        base_s[b] = run;
        run += c;
      }
    }
    __syncthreads();
    for (uint32_t c0 = 0; c0 < n; c0 += nt) {
      const uint32_t j = c0 + tid;
      const int d = j < n ? __popcll(sig[base + j] ^ anchor) : kvc::CRUSH_BINS - 1;
      const unsigned same = __match_any_sync(0xffffffffu, d);
      for (int b = lane; b < kvc::CRUSH_BINS; b += 32) wcnt[w][b] = 0;
      __syncwarp();
      if (lane == __ffs(same) - 1) wcnt[w][d] = __popc(same);
      __syncthreads();
      for (int b = tid; b < kvc::CRUSH_BINS; b += nt) {
        uint32_t run = base_s[b];
        for (int x = 0; x < nw; ++x) {
          const uint32_t c = wcnt[x][b];
          wcnt[x][b] = run;
          run += c;
        }
        base_s[b] = run;
      }
      __syncthreads();
      if (j < n) rank[base + j] = wcnt[w][d] + __popc(same & ((1u << lane) - 1));
      __syncthreads();
    }
  }
  // Picks: rank r is kept iff r = floor(i * n / K) for some i < K, i.e. i = ceil(r * K / n).
  for (uint32_t j = tid; j < n; j += nt) {
    const int h = head_of(j);
    bool keep = true;
    if (K < n) {
      const unsigned long long r = rank[base + j];
      const unsigned long long i = (r * K + n - 1) / n;
      keep = i < K && i * n / K == r;
    }
    picked[start[r0 + h] + (j - goff[h])] = keep;
    if (keep) atomicAdd(&picks_s[h], 1u);
  }
  __syncthreads();
  if (tid < kv_heads) evict_n[r0 + tid] = e_s[tid] - picks_s[tid] * bs;
}

namespace kvc {
// kvc_compact_heads' work on one head, its lists and evicted flags at `holes`, `tail`
// ([len] Idx each) and `gone` ([len] u8): u16 lists in shared memory, or u32 in global scratch
// for a head longer than SMEM_MAX_LEN. Arguments as kvc_compact_heads'.
template <typename Idx>
__device__ void compact_head(float* k_cache_f, float* v_cache_f, float* metric,
                             uint32_t* position, uint32_t* ctx_lens, const uint32_t* order,
                             const uint32_t* counts, const uint32_t* blocks, const uint32_t* tab,
                             const uint32_t* start, const uint32_t* evict_n,
                             const uint8_t* picked, int block_size, int row_words, Idx* holes,
                             Idx* tail, uint8_t* gone) {
  __shared__ int cnt_s[2];
  __shared__ int warp_off[32];
  const int head = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
  const uint32_t len = ctx_lens[head], k = counts[head];
  // The base's prefix of the sorted order, and what is evicted of it after KVCrush's picks.
  const uint32_t prefix = (k - 1) * block_size + last_block_tokens(len, block_size);
  const uint32_t e = evict_n ? evict_n[head] : prefix;
  if (e == 0) return;
  const uint32_t new_len = len - e;
  const uint32_t* table = blocks + tab[head];
  const uint32_t* ord_row = order + (size_t)start[head] * block_size;
  for (uint32_t i = tid; i < len; i += nt) gone[i] = 0;
  __syncthreads();
  for (uint32_t r = tid; r < prefix; r += nt) {
    if (e != prefix) {
      const uint32_t g = (prefix - 1 - r) / block_size;  // group from the top
      if (g < prefix / block_size && picked[start[head] + g]) continue;
    }
    gone[ord_row[r]] = 1;
  }
  __syncthreads();
  // Holes: evicted logical slots < new_len, ascending (stable compaction by chunks + ballots).
  if (tid == 0) cnt_s[0] = 0;
  __syncthreads();
  for (uint32_t base = 0; base < new_len; base += nt) {
    const uint32_t i = base + tid;
    const bool f = i < new_len && gone[i] == 1;
    const unsigned ball = __ballot_sync(0xffffffffu, f);
    const int w = tid / 32, l = tid % 32;
    if (l == 0) warp_off[w] = __popc(ball);
    __syncthreads();
    int off = cnt_s[0];
    for (int x = 0; x < w; ++x) off += warp_off[x];
    if (f) holes[off + __popc(ball & ((1u << l) - 1))] = (Idx)i;
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
    if (f) tail[off + __popc(ball & ((1u << l) - 1))] = (Idx)i;
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
    const uint32_t from = slot_of(table, tail[m], block_size);
    const uint32_t to = slot_of(table, holes[m], block_size);
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
}  // namespace kvc

extern "C" __global__ void __launch_bounds__(1024) kvc_compact_heads(
    float* k_cache_f,                // [num_slots, head_dim] K (any 2- or 4-byte dtype, as words)
    float* v_cache_f,                // [num_slots, head_dim] V
    float* metric,                   // [num_slots] f32
    uint32_t* position,              // [num_slots] u32
    uint32_t* ctx_lens,              // [heads] u32 (in/out)
    const uint32_t* order,           // [total blocks * block_size] u32 (sorted logical slots)
    const uint32_t* counts,          // [heads] u32 candidates taken per head
    const uint32_t* blocks,          // block ids; head h's table at blocks[tab[h] ..]
    const uint32_t* tab,             // [heads] u32: where each head's table starts in `blocks`
    const uint32_t* start,           // [heads + 1] u32: first output block of each head
    const uint32_t* evict_n,         // [heads] u32 or null: slots evicted after KVCrush's picks
    const uint8_t* picked,           // [total blocks] u8 or null: kvc_crush_pick's kept groups
    int block_size,                  // tokens per block
    int max_len,                     // longest head <= SMEM_MAX_LEN (sizes the shared lists)
    int row_words,                   // 4-byte words per K/V row (head_dim * elem_size / 4)
    uint32_t* long_lists,            // [2 * long slots] u32 or null: lists of heads > SMEM_MAX_LEN
    uint8_t* long_gone,              // [long slots] u8 or null: their evicted flags
    const uint32_t* long_at) {       // [heads] u32 or null: where a long head's scratch starts
  // Shared: holes and tail survivors (u16: these heads hold at most SMEM_MAX_LEN tokens),
  // evicted flags.
  extern __shared__ uint16_t lists[];
  const int head = blockIdx.x;
  const uint32_t len = ctx_lens[head];
  if (counts[head] == 0 || len == 0) return;
  if (len > kvc::SMEM_MAX_LEN) {
    const uint32_t a = long_at[head];
    kvc::compact_head<uint32_t>(k_cache_f, v_cache_f, metric, position, ctx_lens, order, counts,
                                blocks, tab, start, evict_n, picked, block_size, row_words,
                                long_lists + 2 * (size_t)a, long_lists + 2 * (size_t)a + len,
                                long_gone + a);
  } else {
    kvc::compact_head<uint16_t>(k_cache_f, v_cache_f, metric, position, ctx_lens, order, counts,
                                blocks, tab, start, evict_n, picked, block_size, row_words,
                                lists, lists + max_len,
                                reinterpret_cast<uint8_t*>(lists + 2 * max_len));
  }
}
