// Shared helpers of kvc's kernels: 8-element vector loads converted to f32, warp reductions.
// Every K/V/Q row is `head_dim` contiguous elements; rows start 16-byte aligned (the Rust
// wrappers check the base pointers, head_dim is a multiple of 8).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace kvc {

// Load 8 consecutive elements at `p` (16-byte aligned for 16-bit types, 32-byte for f32) as f32.
__device__ __forceinline__ void load8(const float* __restrict__ p, float out[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

__device__ __forceinline__ void load8(const __nv_bfloat16* __restrict__ p, float out[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load8(const __half* __restrict__ p, float out[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// 8 consecutive elements held as raw 16-byte words (1 for 16-bit types, 2 for f32), so that a
// kernel can keep many loads in flight before converting.
template <typename T>
struct Pack8 {
  uint4 w[sizeof(T) / 2];
};

// Read-only load of 8 consecutive elements at `p` (16-byte aligned).
template <typename T>
__device__ __forceinline__ Pack8<T> ldg8(const T* __restrict__ p) {
  Pack8<T> r;
#pragma unroll
  for (int i = 0; i < (int)(sizeof(T) / 2); ++i) r.w[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  return r;
}

template <typename T>
__device__ __forceinline__ Pack8<T> zero8() {
  Pack8<T> r;
#pragma unroll
  for (int i = 0; i < (int)(sizeof(T) / 2); ++i) r.w[i] = make_uint4(0, 0, 0, 0);
  return r;
}

__device__ __forceinline__ void unpack8(const Pack8<float>& r, float out[8]) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(r.w);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = __uint_as_float(u[i]);
}

// bf16 -> f32 is exact: the bf16 bits are the high half of the f32.
__device__ __forceinline__ void unpack8(const Pack8<__nv_bfloat16>& r, float out[8]) {
  const uint32_t u[4] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(u[i] << 16);
    out[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void unpack8(const Pack8<__half>& r, float out[8]) {
  const __half2* h = reinterpret_cast<const __half2*>(&r.w[0]);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);  // round to nearest even, as candle's to_dtype
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half(x);
}

// 2^x on the special function unit (ex2.approx.ftz: about 2 ulp; -inf and results below the
// normal range give 0). exp2f adds a denormal range fix-up around the same instruction (three
// more instructions), which is a measurable share of a bandwidth-bound decode loop.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 16-byte asynchronous global -> shared copy (sm_80+), zero-filled when !pred (nothing read).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n)
               : "memory");
}
// 4-byte asynchronous global -> shared copy (through L1).
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// A compile-time bool as a value, to hoist a uniform branch out of a loop with a generic lambda.
template <bool B>
struct BoolTag {
  static constexpr bool value = B;
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Physical slot of logical slot `i` of a head whose block table row is `table`.
__device__ __forceinline__ uint32_t slot_of(const uint32_t* __restrict__ table, uint32_t i,
                                            uint32_t block_size) {
  return table[i / block_size] * block_size + i % block_size;
}

}  // namespace kvc
