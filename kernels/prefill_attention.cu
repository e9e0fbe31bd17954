// Prefill attention, flash-style: causal attention of a chunk of prompt queries over the
// sequence's keys without materialising the [heads, queries, keys] scores. Tensor cores
// (mma.sync m16n8k16, f32 accumulation) for q . k and p . v, an online softmax in f32 between
// them. The probed queries' f32 probabilities (KV-Compress's observation window) are not
// produced here: the caller computes those few rows with kernels/prefill_softmax.cu.
//
// Why: the unfused path (candle matmul, prefill_softmax, matmul) writes and reads the scores
// four times; at 7500 tokens that is ~1 GB per layer and most of a SmolLM2 prefill's time
// (docs/results/sweep-speed-vs-transformers/decode-tables-on-device/step-breakdown.txt: ~60 ms per zh prompt).
//
//   prefill_flash_<dtype>_d<D>: grid (ceil(t / 64), kv_heads * group), 128 threads (4 warps of
//   16 query rows), static smem ~19 KB (D = 64) / ~36 KB (D = 128). CTAs walk 64-key tiles;
//   a tile no query of the CTA can see (every key position > the CTA's last query position) is
//   skipped before its K/V are loaded, so causal prefill does about half the work.
//
// Contract (the Rust twin is kvc::kvcache::ops::prefill_attention):
// - q [kv_heads, group * t, D]: row (j * t + i) of kv-head h is query i of query head
//   h * group + j, at position q_start + i (the layout of [1, heads, t, D] with the query heads
//   of a kv-head adjacent);
// - k, v [kv_heads, n, D]; key j of kv-head h is visible to a query at position p iff
//   key_pos[h][j] <= p (padding keys carry u32::MAX and are never visible; their K/V may hold
//   anything, NaN included);
// - out [kv_heads, group * t, D] = softmax over visible keys of (q . k) * scale, times v;
//   computed as exp2 of scores pre-multiplied by scale * log2(e), probabilities rounded to T
//   for the p . v product, the row sum kept in f32; a row without a visible key is zeros.
#include "common.cuh"

namespace kvc {

constexpr int FA_WARPS = 4;
constexpr int FA_THREADS = FA_WARPS * 32;
constexpr int FA_BQ = FA_WARPS * 16;  // query rows per CTA
constexpr int FA_BK = 64;             // keys per tile
constexpr int FA_VS = FA_BK + 8;      // row stride of the transposed V tile (bank spread)

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

__device__ __forceinline__ uint32_t ld32(const void* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Fragment coordinates (PTX ISA, mma.m16n8k16): lane = 4 * g + c; the A fragment's registers
// hold (row g, cols 2c..2c+1), (row g+8, same), (row g, cols 8+2c..), (row g+8, cols 8+2c..);
// B's hold (rows 2c..2c+1, col g), (rows 8+2c.., col g); C's (row g, cols 2c, 2c+1) and (row
// g+8, cols 2c, 2c+1).
template <typename T, int D>
__device__ void prefill_flash(T* __restrict__ out, const T* __restrict__ q,
                              const T* __restrict__ k, const T* __restrict__ v,
                              const uint32_t* __restrict__ key_pos, int n, int t, int group,
                              uint32_t q_start, float scale) {
  static_assert(D % 16 == 0 && D <= 128, "head dim: a multiple of 16, at most 128");
  constexpr int KS = D + 8;  // row stride of the K tile (bank spread)
  __shared__ __align__(16) T k_s[FA_BK * KS];
  __shared__ __align__(16) T vt_s[D * FA_VS];
  __shared__ uint32_t kpos_s[FA_BK];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, c = lane % 4;
  const int qhead = blockIdx.y, kvh = qhead / group, j_head = qhead % group;
  // Heaviest query tiles (the latest positions) first.
  const int q0 = (gridDim.x - 1 - blockIdx.x) * FA_BQ;
  const int wq0 = q0 + warp * 16;  // this warp's first query
  const size_t row0 = (size_t)kvh * group * t + (size_t)j_head * t;  // query 0 of this head
  const T* kh = k + (size_t)kvh * n * D;
  const T* vh = v + (size_t)kvh * n * D;
  const uint32_t* kp = key_pos + (size_t)kvh * n;

  // Query positions of this thread's two rows; the CTA's and warp's last ones.
  const int last_q = min(t, q0 + FA_BQ) - 1;
  const uint32_t cta_max = q_start + (uint32_t)last_q;
  const uint32_t warp_max = q_start + (uint32_t)min(wq0 + 15, t - 1);
  uint32_t qpos[2];
  qpos[0] = q_start + (uint32_t)(wq0 + g);
  qpos[1] = q_start + (uint32_t)(wq0 + g + 8);

  // Q fragments for every 16-dim slice; rows past t are zeros (their output is not stored).
  uint32_t qa[D / 16][4];
  {
    const bool in0 = wq0 + g < t, in1 = wq0 + g + 8 < t;
    const T* r0 = q + (row0 + wq0 + g) * D;
    const T* r1 = q + (row0 + wq0 + g + 8) * D;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int col = kk * 16 + 2 * c;
      qa[kk][0] = in0 ? ld32(r0 + col) : 0u;
      qa[kk][1] = in1 ? ld32(r1 + col) : 0u;
      qa[kk][2] = in0 ? ld32(r0 + col + 8) : 0u;
      qa[kk][3] = in1 ? ld32(r1 + col + 8) : 0u;
    }
  }

  const float sl2 = scale * 1.4426950408889634f;  // scale * log2(e)
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int k0 = 0; k0 < n; k0 += FA_BK) {
    __syncthreads();  // every warp is done with the previous tile
    if (tid < FA_BK) kpos_s[tid] = k0 + tid < n ? kp[k0 + tid] : 0xffffffffu;
    __syncthreads();
    uint32_t kmin = min(kpos_s[lane], kpos_s[lane + 32]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) kmin = min(kmin, __shfl_xor_sync(0xffffffffu, kmin, off));
    if (kmin > cta_max) continue;  // uniform over the CTA: no query here sees this tile

    // K tile row-major, V tile transposed; padding and rows past n are zeros (their data may
    // be anything, and 0 * NaN would poison p . v).
    for (int i = tid; i < FA_BK * (D / 8); i += FA_THREADS) {
      const int r = i / (D / 8), ch = i % (D / 8);
      uint4 w = make_uint4(0, 0, 0, 0);
      if (kpos_s[r] != 0xffffffffu) w = __ldg(reinterpret_cast<const uint4*>(kh + (size_t)(k0 + r) * D) + ch);
      *reinterpret_cast<uint4*>(&k_s[r * KS + ch * 8]) = w;
    }
    for (int i = tid; i < FA_BK * (D / 8); i += FA_THREADS) {
      const int r = i % FA_BK, ch = i / FA_BK;  // consecutive lanes: consecutive keys
      uint4 w = make_uint4(0, 0, 0, 0);
      if (kpos_s[r] != 0xffffffffu) w = __ldg(reinterpret_cast<const uint4*>(vh + (size_t)(k0 + r) * D) + ch);
      const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
      for (int x = 0; x < 8; ++x) vt_s[(ch * 8 + x) * FA_VS + r] = e[x];
    }
    __syncthreads();
    if (kmin > warp_max) continue;  // uniform over the warp

    // S = Q K^T for 16 rows x 64 keys (8 tiles of 8 keys).
    float s[FA_BK / 8][4];
#pragma unroll
    for (int nt = 0; nt < FA_BK / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      const T* kr = &k_s[(nt * 8 + g) * KS + 2 * c];
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) Mma<T>::run(s[nt], qa[kk], ld32(kr + kk * 16), ld32(kr + kk * 16 + 8));
    }
    // Mask, scale (log2 domain), row max over the quad that shares a row.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < FA_BK / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const uint32_t kpv = kpos_s[nt * 8 + 2 * c + (e & 1)];
        const float x = kpv <= qpos[r] ? s[nt][e] * sl2 : -INFINITY;
        s[nt][e] = x;
        mx[r] = fmaxf(mx[r], x);
      }
    }
    float sub[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float mn = fmaxf(m[r], mx[r]);
      sub[r] = mn == -INFINITY ? 0.f : mn;          // nothing visible yet: exp2(-inf) = 0
      const float corr = fast_exp2(m[r] - sub[r]);  // m = -inf: 0 (l and o are 0 anyway)
      m[r] = mn;
      l[r] *= corr;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        o[i][2 * r] *= corr;
        o[i][2 * r + 1] *= corr;
      }
    }
    // P = exp2(S - m) in T as A fragments (two 8-key tiles per 16-key slice); O += P V.
#pragma unroll
    for (int ks = 0; ks < FA_BK / 16; ++ks) {
      uint32_t pa[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float* sv = s[2 * ks + h];
        const float p0 = fast_exp2(sv[0] - sub[0]), p1 = fast_exp2(sv[1] - sub[0]);
        const float p2 = fast_exp2(sv[2] - sub[1]), p3 = fast_exp2(sv[3] - sub[1]);
        l[0] += p0 + p1;
        l[1] += p2 + p3;
        pa[2 * h] = Mma<T>::pack(p0, p1);
        pa[2 * h + 1] = Mma<T>::pack(p2, p3);
      }
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        const T* vr = &vt_s[(dn * 8 + g) * FA_VS + ks * 16 + 2 * c];
        Mma<T>::run(o[dn], pa, ld32(vr), ld32(vr + 8));
      }
    }
  }

  // Row sums over the quad, normalise, store (two elements per register pair).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const float inv[2] = {l[0] > 0.f ? 1.f / l[0] : 0.f, l[1] > 0.f ? 1.f / l[1] : 0.f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int qi = wq0 + g + 8 * r;
    if (qi >= t) continue;
    T* orow = out + (row0 + qi) * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      *reinterpret_cast<uint32_t*>(orow + dn * 8 + 2 * c) =
          Mma<T>::pack(o[dn][2 * r] * inv[r], o[dn][2 * r + 1] * inv[r]);
    }
  }
}

}  // namespace kvc

#define KVC_PREFILL_FLASH(NAME, T, D)                                                      \
  extern "C" __global__ void __launch_bounds__(kvc::FA_THREADS) NAME(                      \
      T* out,                  /* [kv_heads, group * t, D] */                              \
      const T* q,              /* [kv_heads, group * t, D] */                              \
      const T* k,              /* [kv_heads, n, D] */                                      \
      const T* v,              /* [kv_heads, n, D] */                                      \
      const uint32_t* key_pos, /* [kv_heads, n] (u32::MAX: padding) */                     \
      int n, int t, int group, uint32_t q_start, float scale) {                            \
    kvc::prefill_flash<T, D>(out, q, k, v, key_pos, n, t, group, q_start, scale);          \
  }

KVC_PREFILL_FLASH(prefill_flash_bf16_d64, __nv_bfloat16, 64)
KVC_PREFILL_FLASH(prefill_flash_bf16_d128, __nv_bfloat16, 128)
KVC_PREFILL_FLASH(prefill_flash_f16_d64, __half, 64)
KVC_PREFILL_FLASH(prefill_flash_f16_d128, __half, 128)
