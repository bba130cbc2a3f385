// RMSNorm and fused add + RMSNorm on CUDA, for fp32, bf16 and fp16. One block per row; each thread
// moves 16 bytes at a time when the row length and every row start allow it (else one element);
// sums of squares accumulate in fp32 and are reduced with warp shuffles, then across warps in shared
// memory. Numerics as csrc/cpu/norm.cpp and decoding/reference.py (HF): round the residual add to
// the dtype, normalise in fp32, round, multiply by the weight, round. The c10 Half/BFloat16 types
// round to nearest even exactly as torch does.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../norm_checks.h"
#include "pdl.h"

namespace decoding {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;

// VEC elements of T moved as one aligned load/store (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packed {
  T v[VEC];
};

// Sum of `value` over the block; every thread gets the result. `shared` holds one float per warp.
__device__ __forceinline__ float block_sum(float value, float* shared) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  const int num_warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  value = lane < num_warps ? shared[lane] : 0.f;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// out = T(w * T(x * inv_rms)), elementwise over one packed vector.
template <typename T, int VEC>
__device__ __forceinline__ Packed<T, VEC> scale(const Packed<T, VEC> x, const Packed<T, VEC> w, float inv_rms) {
  Packed<T, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const T normed = static_cast<T>(static_cast<float>(x.v[j]) * inv_rms);
    out.v[j] = static_cast<T>(static_cast<float>(w.v[j]) * static_cast<float>(normed));
  }
  return out;
}

// grid: one block per row. Strides and hidden are in elements; hidden % VEC == 0 and every row start
// is VEC-aligned (checked on the host).
template <typename T, int VEC>
__global__ void rms_norm_kernel(T* __restrict__ out, int64_t out_stride, const T* __restrict__ in, int64_t in_stride,
                                const T* __restrict__ weight, float eps, int hidden) {
  using P = Packed<T, VEC>;
  __shared__ float shared[kMaxThreads / kWarpSize];
  trigger_dependents();
  grid_dependency_wait();  // the input comes from the kernel before (pdl.h)
  const P* x = reinterpret_cast<const P*>(in + blockIdx.x * in_stride);
  const P* w = reinterpret_cast<const P*>(weight);
  P* y = reinterpret_cast<P*>(out + blockIdx.x * out_stride);
  const int num_packs = hidden / VEC;

  float sq = 0.f;
  for (int i = threadIdx.x; i < num_packs; i += blockDim.x) {
    const P p = x[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float v = static_cast<float>(p.v[j]);
      sq += v * v;
    }
  }
  const float inv_rms = rsqrtf(block_sum(sq, shared) / static_cast<float>(hidden) + eps);
  for (int i = threadIdx.x; i < num_packs; i += blockDim.x) {
    const P xv = x[i];  // whole-pack copies keep the loads 16 bytes wide
    const P wv = w[i];
    y[i] = scale(xv, wv, inv_rms);
  }
}

template <typename T, int VEC>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ in, int64_t in_stride, T* __restrict__ res,
                                          int64_t res_stride, const T* __restrict__ weight, float eps, int hidden) {
  using P = Packed<T, VEC>;
  __shared__ float shared[kMaxThreads / kWarpSize];
  trigger_dependents();
  grid_dependency_wait();  // the input comes from the kernel before (pdl.h)
  P* x = reinterpret_cast<P*>(in + blockIdx.x * in_stride);
  P* r = reinterpret_cast<P*>(res + blockIdx.x * res_stride);
  const P* w = reinterpret_cast<const P*>(weight);
  const int num_packs = hidden / VEC;

  float sq = 0.f;
  for (int i = threadIdx.x; i < num_packs; i += blockDim.x) {
    const P a = x[i];
    P s = r[i];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s.v[j] = static_cast<T>(static_cast<float>(a.v[j]) + static_cast<float>(s.v[j]));
      const float v = static_cast<float>(s.v[j]);
      sq += v * v;
    }
    r[i] = s;
  }
  const float inv_rms = rsqrtf(block_sum(sq, shared) / static_cast<float>(hidden) + eps);
  // Each thread rereads only the packs it wrote above, so no barrier is needed; they hit L1/L2.
  for (int i = threadIdx.x; i < num_packs; i += blockDim.x) {
    const P rv = r[i];
    const P wv = w[i];
    x[i] = scale(rv, wv, inv_rms);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

// Threads per block: enough for one pack each up to kMaxThreads, in whole warps.
int num_threads(int64_t num_packs) {
  const int64_t warps = (num_packs + kWarpSize - 1) / kWarpSize;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(warps, 1) * kWarpSize, kMaxThreads));
}

// Runs launch(std::integral_constant<int, VEC>) with VEC = 16 / sizeof(T) when hidden, the row strides
// and the base pointers all keep 16-byte alignment, else VEC = 1.
template <typename T, typename Launch>
void with_vec(int64_t hidden, std::initializer_list<std::pair<const void*, int64_t>> rows, Launch&& launch) {
  constexpr int kVec = 16 / sizeof(T);
  bool vectorised = hidden % kVec == 0;
  for (const auto& [ptr, stride] : rows) vectorised = vectorised && aligned16(ptr) && stride % kVec == 0;
  if (vectorised) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  check_norm_args(input, weight, c10::DeviceType::CUDA);
  check_same(out, input, "out");
  const int64_t hidden = input.size(-1);
  const int64_t in_stride = row_stride(input, "input", false);
  const int64_t out_stride = row_stride(out, "out", true);
  if (input.numel() == 0) return;
  TORCH_CHECK(hidden <= INT32_MAX, "hidden size too large: ", hidden);
  const int64_t num_tokens = input.numel() / hidden;
  TORCH_CHECK(num_tokens <= INT32_MAX, "too many rows: ", num_tokens);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* y = out.data_ptr<T>();
    const T* x = input.const_data_ptr<T>();
    const T* w = weight.const_data_ptr<T>();
    with_vec<T>(hidden, {{y, out_stride}, {x, in_stride}, {w, 0}}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      launch(rms_norm_kernel<T, VEC>, dim3(static_cast<unsigned>(num_tokens)), dim3(num_threads(hidden / VEC)), 0,
             stream, y, out_stride, x, in_stride, w, static_cast<float>(epsilon), static_cast<int>(hidden));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon) {
  check_norm_args(input, weight, c10::DeviceType::CUDA);
  check_same(residual, input, "residual");
  const int64_t hidden = input.size(-1);
  const int64_t in_stride = row_stride(input, "input", true);
  const int64_t res_stride = row_stride(residual, "residual", true);
  if (input.numel() == 0) return;
  TORCH_CHECK(hidden <= INT32_MAX, "hidden size too large: ", hidden);
  const int64_t num_tokens = input.numel() / hidden;
  TORCH_CHECK(num_tokens <= INT32_MAX, "too many rows: ", num_tokens);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* x = input.data_ptr<T>();
    T* r = residual.data_ptr<T>();
    const T* w = weight.const_data_ptr<T>();
    with_vec<T>(hidden, {{x, in_stride}, {r, res_stride}, {w, 0}}, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      launch(fused_add_rms_norm_kernel<T, VEC>, dim3(static_cast<unsigned>(num_tokens)),
             dim3(num_threads(hidden / VEC)), 0, stream, x, in_stride, r, res_stride, w, static_cast<float>(epsilon),
             static_cast<int>(hidden));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(decoding, CUDA, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
}

}  // namespace decoding
