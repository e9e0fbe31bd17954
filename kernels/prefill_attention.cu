// Prefill attention, flash-style (FlashAttention-2's structure): causal attention of a chunk of
// prompt queries over the sequence's keys without materialising the [heads, queries, keys]
// scores. Tensor cores (mma.sync m16n8k16, f32 accumulation) for q . k and p . v, fed from
// shared memory by ldmatrix (ldmatrix.trans for V, so V is never transposed by hand); K/V tiles
// stream through two shared-memory stages with cp.async, so the next tile's loads overlap this
// tile's products; an online softmax in f32 between the two products. The probed queries' f32
// probabilities (KV-Compress's observation window) are not produced here: the caller computes
// those few rows with kernels/prefill_softmax.cu.
//
// Why: the unfused path (candle matmul, prefill_softmax, matmul) writes and reads the scores
// four times (~1 GB per layer at 7500 tokens); the first flash kernel (synchronous loads, V
// transposed with scalar stores, 16 query rows per warp) stayed near 65-75 TFLOP/s at head dim
// 128 (docs/findings/2026-12-06-llama-8b-128k-mistral-parity-h100.md).
//
//   prefill_key_tiles: grid (tiles, kv_heads), FA_BK threads. The (min, max) key position of
//     every FA_BK-key tile of every kv-head, keys past n counting as padding (u32::MAX).
//   prefill_flash_<dtype>_d<D>_m<MT>: grid (ceil(t / BQ), kv_heads * group), 128 threads (4
//     warps of 16 * MT query rows; BQ = 64 * MT), dynamic shared memory FaSmem::bytes (the Rust
//     wrapper mirrors the formula). CTAs walk the FA_BK-key tiles whose min position is at most
//     the CTA's last query position (the others are never loaded), so causal prefill does about
//     half the work whatever the keys' order; a tile whose max position is at most a warp's first
//     query position skips the per-key mask.
//
// Contract (the Rust twin is kvc::cuda::prefill_attention::prefill_attention_twin):
// - q [kv_heads, group * t, D]: row (j * t + i) of kv-head h is query i of query head
//   h * group + j, at position q_start + i (the layout of [1, heads, t, D] with the query heads
//   of a kv-head adjacent);
// - k, v: kv-head h's key j at row (h * kv_stride + j) of a [*, D] array, kv_stride >= n (a
//   cache with spare capacity per head passes its rows without a copy); key j of kv-head h is
//   visible to a query at position p iff key_pos[h * n + j] <= p (padding keys carry u32::MAX
//   and are never visible; their K/V may hold anything, NaN included: they are never read);
// - tiles [kv_heads, ceil(n / FA_BK)] (min, max) from prefill_key_tiles on the same key_pos;
// - out [kv_heads, group * t, D] = softmax over visible keys of (q . k) * scale, times v;
//   computed as exp2 of scores pre-multiplied by scale * log2(e), probabilities rounded to T
//   for the p . v product, the row sum kept in f32; a row without a visible key is zeros.
#include "common.cuh"

namespace kvc {

constexpr int FA_WARPS = 4;
constexpr int FA_THREADS = FA_WARPS * 32;
constexpr int FA_BK = 64;  // keys per tile
constexpr uint32_t FA_PAD = 0xffffffffu;

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  // c += a (16x16, row) * b (16x8, col), f32 accumulation.
  __device__ __forceinline__ static void run(float c[4], const uint32_t a[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // Two f32 as a packed pair (lo in the low half), rounded to nearest even.
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float c[4], const uint32_t a[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// Four 8x8 b16 matrices from shared memory; lane L gives the address of row L % 8 of matrix
// L / 8, register i receives matrix i (thread 4g + c: row g, elements 2c and 2c + 1; with
// .trans: rows 2c and 2c + 1 of column g).
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void* p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], const void* p) {
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// Shared memory of one CTA: the Q tile, two stages of K and V tiles, two stages of key
// positions. Rows are D + 8 elements apart, so the 8 rows one ldmatrix reads fall in 8
// different 16-byte bank groups.
template <typename T, int D, int MT>
struct FaSmem {
  static constexpr int S = D + 8;
  static constexpr int BQ = FA_WARPS * 16 * MT;
  static constexpr int Q = BQ * S;   // elements
  static constexpr int KV = FA_BK * S;
  static constexpr int bytes = (Q + 4 * KV) * (int)sizeof(T) + 2 * FA_BK * (int)sizeof(uint32_t);
};

// Fragment coordinates (PTX ISA, mma.m16n8k16): lane = 4 * g + c; the A fragment's registers
// hold (row g, cols 2c..2c+1), (row g+8, same), (row g, cols 8+2c..), (row g+8, cols 8+2c..);
// B's hold (rows 2c..2c+1, col g), (rows 8+2c.., col g); C's (row g, cols 2c, 2c+1) and (row
// g+8, cols 2c, 2c+1).
template <typename T, int D, int MT>
__device__ void prefill_flash(T* __restrict__ out, const T* __restrict__ q,
                              const T* __restrict__ k, const T* __restrict__ v,
                              const uint32_t* __restrict__ key_pos,
                              const uint2* __restrict__ tile_range, int n, int kv_stride, int t,
                              int group, uint32_t q_start, float scale) {
  static_assert(D % 16 == 0 && D <= 128, "head dim: a multiple of 16, at most 128");
  using L = FaSmem<T, D, MT>;
  constexpr int S = L::S, BQ = L::BQ, CH = D / 8;  // CH: 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char fa_smem[];
  T* q_s = reinterpret_cast<T*>(fa_smem);
  T* k_s = q_s + L::Q;       // [2][KV]
  T* v_s = k_s + 2 * L::KV;  // [2][KV]
  uint32_t* kpos_s = reinterpret_cast<uint32_t*>(v_s + 2 * L::KV);  // [2][FA_BK]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, c = lane % 4;
  const int qhead = blockIdx.y, kvh = qhead / group, j_head = qhead % group;
  // Heaviest query tiles (the latest positions) first.
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
  const int wq0 = q0 + warp * 16 * MT;  // this warp's first query
  const bool warp_live = wq0 < t;
  const size_t row0 = ((size_t)kvh * group + j_head) * t;  // query 0 of this head
  const T* kh = k + (size_t)kvh * kv_stride * D;
  const T* vh = v + (size_t)kvh * kv_stride * D;
  const uint32_t* kp = key_pos + (size_t)kvh * n;
  const int tiles = (n + FA_BK - 1) / FA_BK;
  const uint2* tr = tile_range + (size_t)kvh * tiles;
  const uint32_t cta_max = q_start + (uint32_t)(min(t, q0 + BQ) - 1);
  const uint32_t warp_min = q_start + (uint32_t)wq0;
  const uint32_t warp_max = q_start + (uint32_t)(min(t, wq0 + 16 * MT) - 1);

  // The first tile at or after j that some query of the CTA sees (tiles if none); the same
  // answer in every warp.
  auto next_tile = [&](int j) {
    for (; j < tiles; j += 32) {
      const bool vis = j + lane < tiles && tr[j + lane].x <= cta_max;
      const unsigned b = __ballot_sync(0xffffffffu, vis);
      if (b) return j + __ffs(b) - 1;
    }
    return tiles;
  };
  // Issue the cp.async loads of tile j into stage st: K, V (zeros for keys past n and, in a
  // tile holding padding, for padding keys: their rows are never read) and key positions.
  auto load_tile = [&](int j, int st) {
    const int k0 = j * FA_BK;
    const bool pad = tr[j].y == FA_PAD;
    T* ks = k_s + st * L::KV;
    T* vs = v_s + st * L::KV;
    for (int i = tid; i < FA_BK * CH; i += FA_THREADS) {
      const int r = i / CH, ch = i % CH, key = k0 + r;
      const bool ok = key < n && (!pad || __ldg(kp + key) != FA_PAD);
      const size_t off = (size_t)(ok ? key : 0) * D + ch * 8;
      cp_async16(ks + r * S + ch * 8, kh + off, ok);
      cp_async16(vs + r * S + ch * 8, vh + off, ok);
    }
    if (tid < FA_BK) {
      uint32_t* dst = kpos_s + st * FA_BK + tid;
      if (k0 + tid < n) {
        cp_async4(dst, kp + k0 + tid);
      } else {
        *dst = FA_PAD;
      }
    }
  };

  // Q tile (rows past t are zeros: their output is not stored) with the first tile, the second
  // tile in its own group: two groups in flight from here on.
  for (int i = tid; i < BQ * CH; i += FA_THREADS) {
    const int r = i / CH, ch = i % CH;
    const bool ok = q0 + r < t;
    cp_async16(q_s + r * S + ch * 8, q + (row0 + (ok ? q0 + r : 0)) * D + ch * 8, ok);
  }
  int cur = next_tile(0);
  if (cur < tiles) load_tile(cur, 0);
  cp_async_commit();
  int nxt = cur < tiles ? next_tile(cur + 1) : tiles;
  if (nxt < tiles) load_tile(nxt, 1);
  cp_async_commit();

  const float sl2 = scale * 1.4426950408889634f;  // scale * log2(e)
  float o[MT][D / 8][4];
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }

  for (int st = 0; cur < tiles; st ^= 1) {
    cp_async_wait<1>();
    __syncthreads();  // tile cur (and Q) in stage st, visible to every warp
    const uint2 range = tr[cur];
    if (warp_live && range.x <= warp_max) {
      const T* ks = k_s + st * L::KV;
      const T* vs = v_s + st * L::KV;
      const uint32_t* kps = kpos_s + st * FA_BK;
      const bool full = range.y <= warp_min;  // every key visible to every row of the warp

      // S = Q K^T: MT x 16 rows x 64 keys (8 tiles of 8 keys).
      float s[MT][FA_BK / 8][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < FA_BK / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          ldsm_x4(qa[mt], q_s + (warp * 16 * MT + mt * 16 + lane % 16) * S + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < FA_BK / 16; ++np) {
          uint32_t kb[4];  // b0, b1 of key tiles 2np and 2np + 1
          ldsm_x4(kb, ks + (np * 16 + lane % 8 + (lane / 16) * 8) * S + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            Mma<T>::run(s[mt][2 * np], qa[mt], kb[0], kb[1]);
            Mma<T>::run(s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
          }
        }
      }

      // Mask, scale (log2 domain), online softmax update per row.
      float sub[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint32_t qp[2] = {q_start + (uint32_t)(wq0 + mt * 16 + g),
                                q_start + (uint32_t)(wq0 + mt * 16 + g + 8)};
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < FA_BK / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float x = s[mt][nt][e] * sl2;
            if (!full && kps[nt * 8 + 2 * c + (e & 1)] > qp[e / 2]) x = -INFINITY;
            s[mt][nt][e] = x;
            mx[e / 2] = fmaxf(mx[e / 2], x);
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
          mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
          const float mn = fmaxf(m[mt][r], mx[r]);
          sub[mt][r] = mn == -INFINITY ? 0.f : mn;           // nothing visible yet: exp2(-inf) = 0
          const float corr = fast_exp2(m[mt][r] - sub[mt][r]);  // m = -inf: 0 (l and o are 0)
          m[mt][r] = mn;
          l[mt][r] *= corr;
#pragma unroll
          for (int i = 0; i < D / 8; ++i) {
            o[mt][i][2 * r] *= corr;
            o[mt][i][2 * r + 1] *= corr;
          }
        }
      }

      // P = exp2(S - m) in T as A fragments (two 8-key tiles per 16-key slice); O += P V.
#pragma unroll
      for (int ks16 = 0; ks16 < FA_BK / 16; ++ks16) {
        uint32_t pa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float* sv = s[mt][2 * ks16 + h];
            const float p0 = fast_exp2(sv[0] - sub[mt][0]), p1 = fast_exp2(sv[1] - sub[mt][0]);
            const float p2 = fast_exp2(sv[2] - sub[mt][1]), p3 = fast_exp2(sv[3] - sub[mt][1]);
            l[mt][0] += p0 + p1;
            l[mt][1] += p2 + p3;
            pa[mt][2 * h] = Mma<T>::pack(p0, p1);
            pa[mt][2 * h + 1] = Mma<T>::pack(p2, p3);
          }
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t vb[4];  // b0, b1 of dim tiles 2dp and 2dp + 1
          ldsm_x4_trans(vb, vs + (ks16 * 16 + lane % 8 + ((lane / 8) % 2) * 8) * S + dp * 16 + (lane / 16) * 8);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            Mma<T>::run(o[mt][2 * dp], pa[mt], vb[0], vb[1]);
            Mma<T>::run(o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with stage st
    const int after = nxt < tiles ? next_tile(nxt + 1) : tiles;
    if (after < tiles) load_tile(after, st);
    cp_async_commit();
    cur = nxt;
    nxt = after;
  }
  cp_async_wait<0>();

  // Row sums over the quad, normalise, store (two elements per register pair).
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float lr = l[mt][r];
      lr += __shfl_xor_sync(0xffffffffu, lr, 1);
      lr += __shfl_xor_sync(0xffffffffu, lr, 2);
      const float inv = lr > 0.f ? 1.f / lr : 0.f;
      const int qi = wq0 + mt * 16 + g + 8 * r;
      if (qi >= t) continue;
      T* orow = out + (row0 + qi) * D;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        *reinterpret_cast<uint32_t*>(orow + dn * 8 + 2 * c) =
            Mma<T>::pack(o[mt][dn][2 * r] * inv, o[mt][dn][2 * r + 1] * inv);
      }
    }
  }
}

}  // namespace kvc

// (min, max) key position per FA_BK-key tile and kv-head; keys past n count as padding.
extern "C" __global__ void __launch_bounds__(kvc::FA_BK) prefill_key_tiles(
    uint2* tiles,             /* [kv_heads, ceil(n / FA_BK)] */
    const uint32_t* key_pos,  /* [kv_heads, n] */
    int n) {
  __shared__ uint32_t lo_s[kvc::FA_BK / 32], hi_s[kvc::FA_BK / 32];
  const int h = blockIdx.y, j = blockIdx.x * kvc::FA_BK + threadIdx.x;
  const uint32_t p = j < n ? key_pos[(size_t)h * n + j] : kvc::FA_PAD;
  uint32_t lo = p, hi = p;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, off));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, off));
  }
  if (threadIdx.x % 32 == 0) {
    lo_s[threadIdx.x / 32] = lo;
    hi_s[threadIdx.x / 32] = hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kvc::FA_BK / 32; ++w) {
      lo = min(lo, lo_s[w]);
      hi = max(hi, hi_s[w]);
    }
    tiles[(size_t)h * gridDim.x + blockIdx.x] = make_uint2(lo, hi);
  }
}

#define KVC_PREFILL_FLASH(NAME, T, D, MT, MIN_CTAS)                                         \
  extern "C" __global__ void __launch_bounds__(kvc::FA_THREADS, MIN_CTAS) NAME(             \
      T* out,                  /* [kv_heads, group * t, D] */                              \
      const T* q,              /* [kv_heads, group * t, D] */                              \
      const T* k,              /* [kv_heads * kv_stride, D] */                             \
      const T* v,              /* [kv_heads * kv_stride, D] */                             \
      const uint32_t* key_pos, /* [kv_heads, n] (u32::MAX: padding) */                     \
      const uint2* tiles,      /* [kv_heads, ceil(n / FA_BK)] from prefill_key_tiles */    \
      int n, int kv_stride, int t, int group, uint32_t q_start, float scale) {             \
    kvc::prefill_flash<T, D, MT>(out, q, k, v, key_pos, tiles, n, kv_stride, t, group,      \
                                 q_start, scale);                                          \
  }

KVC_PREFILL_FLASH(prefill_flash_bf16_d64_m1, __nv_bfloat16, 64, 1, 3)
KVC_PREFILL_FLASH(prefill_flash_bf16_d64_m2, __nv_bfloat16, 64, 2, 2)
KVC_PREFILL_FLASH(prefill_flash_bf16_d128_m1, __nv_bfloat16, 128, 1, 2)
KVC_PREFILL_FLASH(prefill_flash_bf16_d128_m2, __nv_bfloat16, 128, 2, 2)
KVC_PREFILL_FLASH(prefill_flash_f16_d64_m1, __half, 64, 1, 3)
KVC_PREFILL_FLASH(prefill_flash_f16_d64_m2, __half, 64, 2, 2)
KVC_PREFILL_FLASH(prefill_flash_f16_d128_m1, __half, 128, 1, 2)
KVC_PREFILL_FLASH(prefill_flash_f16_d128_m2, __half, 128, 2, 2)
