// Device helpers shared by the decode GEMVs: csrc/cuda/gemv.cu (16-bit weights) and csrc/cuda/int8_gemv.cu
// (W8A16). Both stream each weight once past L1 in 16-byte loads, accumulate fp32 dot products, reduce them
// with warp shuffles, and finish an output row the same way (bias, or SiLU(gate) * up with the roundings of
// the unfused ops), so that the two families agree on everything but how a weight chunk becomes floats.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace decoding::gemv_common {

constexpr int kWarpSize = 32;
constexpr int kPack = 8;  // 16-bit elements per 16-byte load

// Eight 16-bit values (one 16-byte load) -> eight floats.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&f)[kPack]);

template <>
__device__ __forceinline__ void unpack8<c10::BFloat16>(const uint4& raw, float (&f)[kPack]) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(p[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

template <>
__device__ __forceinline__ void unpack8<c10::Half>(const uint4& raw, float (&f)[kPack]) {
  const __half2* p = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(p[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// Weights are read once per step: stream them past L1 (which keeps serving x to the other warps of the SM).
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// A block reduction's first half: each warp's sum of acc[j][m], written by its lane 0 to partial[warp][j * M + m].
// The caller syncs the block, then adds the warps' partials in warp order.
template <int NW, int M, int MaxWarps>
__device__ __forceinline__ void store_warp_partials(const float (&acc)[NW][M], float (&partial)[MaxWarps][NW * M]) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int j = 0; j < NW; ++j)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float v = warp_sum(acc[j][m]);
      if (lane == 0) partial[warp][j * M + m] = v;
    }
}

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// The weight rows that R output rows from row0 read: theirs, and with GLU their up rows n_out further on.
// Rows past n_out repeat the last one (their store is skipped). W is the weight's element type.
template <typename W, int R, bool GLU>
__device__ __forceinline__ void weight_rows(const W* (&rows)[GLU ? 2 * R : R], const W* w, int row0, int n_out,
                                            int K) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = min(row0 + r, n_out - 1);
    rows[r] = w + static_cast<int64_t>(row) * K;
    if constexpr (GLU) rows[R + r] = w + static_cast<int64_t>(row + n_out) * K;
  }
}

// One output from its fp32 dot product(s): + bias, or silu(gate) * up with the unfused ops' roundings.
template <typename T, bool GLU>
__device__ __forceinline__ T finish(float dot, float up_dot, const T* __restrict__ bias, int row) {
  float y;
  if constexpr (GLU) {
    const float gate = round_to<T>(dot);
    const float up = round_to<T>(up_dot);
    y = round_to<T>(gate / (1.f + __expf(-gate))) * up;
  } else {
    y = dot + (bias != nullptr ? static_cast<float>(bias[row]) : 0.f);
  }
  return static_cast<T>(y);
}

}  // namespace decoding::gemv_common
