// The two element-wise halves of an FP8 linear layer around cuBLASLt's e4m3 x e4m3 GEMM
// (src/cuda/fp8_linear.rs):
//
// - fp8_quantize_rows_<T>: dynamic per-token quantization of the activations, as fbgemm_fp8
//   and compressed-tensors' dynamic checkpoints run them: one scale per row,
//   s = max(amax(|x|) / 448, 1e-12), q = e4m3(x / s) (round to nearest even, saturating);
// - fp8_scale_rows_<T>: the GEMM's output times its row's activation scale and its column's
//   weight scale, y = T((T-rounded acc) * s_row * s_col), in place.
//
// Rust twins (same f32 arithmetic, host loops): kvc::cuda::fp8_linear::{quantize_rows_twin,
// fp8_linear_twin}.
#include <cuda_fp8.h>

#include "common.cuh"

namespace kvc {

constexpr int FP8_THREADS = 256;
constexpr float E4M3_MAX = 448.f;

// One block per row.
template <typename T>
__device__ void quantize_rows(
    uint8_t* __restrict__ q,        // [rows, cols] (out) e4m3 bits
    float* __restrict__ scales,     // [rows] (out) the row's scale
    const T* __restrict__ x,        // [rows, cols]
    int cols) {
  const size_t base = (size_t)blockIdx.x * cols;
  float amax = 0.f;
  for (int c = threadIdx.x; c < cols; c += FP8_THREADS)
    amax = fmaxf(amax, fabsf(static_cast<float>(x[base + c])));
  amax = warp_max(amax);
  __shared__ float part[FP8_THREADS / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) part[warp] = amax;
  __syncthreads();
  amax = warp_max(lane < FP8_THREADS / 32 ? part[lane] : 0.f);
  const float s = fmaxf(__fdiv_rn(amax, E4M3_MAX), 1e-12f);
  if (threadIdx.x == 0) scales[blockIdx.x] = s;
  for (int c = threadIdx.x; c < cols; c += FP8_THREADS) {
    const __nv_fp8_e4m3 v(__fdiv_rn(static_cast<float>(x[base + c]), s));
    q[base + c] = v.__x;
  }
}

// One thread per element of y [rows, cols].
template <typename T>
__device__ void scale_rows(
    T* __restrict__ y,                    // [rows, cols] (in/out)
    const float* __restrict__ row_scale,  // [rows]
    const float* __restrict__ col_scale,  // [cols]
    int rows, int cols) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)rows * cols) return;
  const size_t r = i / cols, c = i % cols;
  y[i] = static_cast<T>(__fmul_rn(__fmul_rn(static_cast<float>(y[i]), row_scale[r]), col_scale[c]));
}

}  // namespace kvc

#define FP8_LINEAR(T, SUF)                                                                   \
  extern "C" __global__ void __launch_bounds__(kvc::FP8_THREADS)                             \
      fp8_quantize_rows_##SUF(uint8_t* q, float* scales, const T* x, int cols) {             \
    kvc::quantize_rows<T>(q, scales, x, cols);                                                \
  }                                                                                          \
  extern "C" __global__ void fp8_scale_rows_##SUF(T* y, const float* row_scale,              \
                                                  const float* col_scale, int rows, int cols) { \
    kvc::scale_rows<T>(y, row_scale, col_scale, rows, cols);                                  \
  }

// bf16 only: the GEMM's output holds the unscaled products (up to 448^2 x the inner
// dimension), past f16's range.
FP8_LINEAR(__nv_bfloat16, bf16)
