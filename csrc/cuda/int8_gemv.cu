// W8A16 GEMV / skinny GEMM for decode: out [M, N] = x [M, K] @ (qweight [N, K] int8 * scales)^T (+ bias),
// M = 1..16 tokens, x and out in bf16 or fp16, accumulation in fp32.
//
// At decode the weights are the only large operand, so the kernel is built around reading them once at
// full bandwidth: each thread streams 16 int8 weights of ROWS rows at a time with 16-byte loads that
// bypass L1 (which keeps x, re-read by every block), prefetches the next chunk before it computes on
// the current one, and dequantizes in registers with a byte-permute into the mantissa of 2^23 (exact,
// and cheaper than the I2F conversion pipe). Each block owns ROWS output rows over the whole K, split
// across its threads; partial sums are reduced with warp shuffles, then across warps in shared memory,
// and the per-output-channel scale (and bias) is applied once at the end. With group-wise scales the
// 16-element partial dot is scaled per group as it is accumulated.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <utility>

#include "../int8_checks.h"

namespace decoding {
namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 256;
constexpr int kChunk = static_cast<int>(kGemvChunk);

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packed {
  T v[VEC];
};

// 16 weights, read once: no L1 allocation, so L1 keeps serving x to the other blocks of the SM.
__device__ __forceinline__ int4 load_weights(const int4* ptr) {
  int4 v;
  asm("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr));
  return v;
}

// Four int8 (one 32-bit word) -> four exact floats: flipping the sign bit gives b = w + 128 in [1, 255],
// placed in the low mantissa byte of 2^23 (0x4B000000) that is 2^23 + b; subtracting 2^23 + 128 leaves w.
__device__ __forceinline__ void int8x4_to_float(uint32_t word, float* f) {
  const uint32_t u = word ^ 0x80808080u;
  f[0] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7650)) - 8388736.f;
  f[1] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7651)) - 8388736.f;
  f[2] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7652)) - 8388736.f;
  f[3] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7653)) - 8388736.f;
}

// grid: ceil(N / ROWS) blocks of blockDim.x <= kMaxThreads threads (a multiple of 32). MT >= M is the
// compiled token count; rows of x past M are never read.
template <typename T, int MT, int ROWS, bool GROUPED>
__global__ void __launch_bounds__(kMaxThreads)
    w8a16_gemv_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t x_stride, const int8_t* __restrict__ w,
                      const float* __restrict__ scales, const T* __restrict__ bias, int M, int N, int K,
                      int group_size) {
  using XPack = Packed<T, kChunk>;
  const int row0 = blockIdx.x * ROWS;
  const int chunks = K / kChunk;
  const int groups = K / group_size;

  const int4* wrow[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    // Rows past N re-read row N - 1 (valid memory); their sums are never written.
    const int row = min(row0 + r, N - 1);
    wrow[r] = reinterpret_cast<const int4*>(w + static_cast<int64_t>(row) * K);
  }

  float acc[MT][ROWS];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[m][r] = 0.f;
  }

  int c = threadIdx.x;
  int4 cur[ROWS];
  if (c < chunks) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) cur[r] = load_weights(wrow[r] + c);
  }
  for (; c < chunks; c += blockDim.x) {
    const int next = c + blockDim.x;
    int4 nxt[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) nxt[r] = next < chunks ? load_weights(wrow[r] + next) : cur[r];

    float wf[ROWS][kChunk];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      int8x4_to_float(static_cast<uint32_t>(cur[r].x), &wf[r][0]);
      int8x4_to_float(static_cast<uint32_t>(cur[r].y), &wf[r][4]);
      int8x4_to_float(static_cast<uint32_t>(cur[r].z), &wf[r][8]);
      int8x4_to_float(static_cast<uint32_t>(cur[r].w), &wf[r][12]);
    }
    float group_scale[ROWS];
    if constexpr (GROUPED) {
      const int g = c * kChunk / group_size;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) group_scale[r] = scales[static_cast<int64_t>(min(row0 + r, N - 1)) * groups + g];
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (MT > 1 && m >= M) break;
      const XPack xp = *reinterpret_cast<const XPack*>(x + m * x_stride + c * kChunk);
      float xf[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk; ++j) xf[j] = static_cast<float>(xp.v[j]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if constexpr (GROUPED) {
          float part = 0.f;
#pragma unroll
          for (int j = 0; j < kChunk; ++j) part = fmaf(wf[r][j], xf[j], part);
          acc[m][r] = fmaf(part, group_scale[r], acc[m][r]);
        } else {
#pragma unroll
          for (int j = 0; j < kChunk; ++j) acc[m][r] = fmaf(wf[r][j], xf[j], acc[m][r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) cur[r] = nxt[r];
  }

  // Block reduction: shuffles within each warp, then one float per (warp, m, r) in shared memory.
  __shared__ float partial[kMaxThreads / kWarpSize][MT * ROWS];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) partial[warp][m * ROWS + r] = v;
    }
  }
  __syncthreads();
  const int num_warps = blockDim.x / kWarpSize;
  for (int i = threadIdx.x; i < MT * ROWS; i += blockDim.x) {
    const int m = i / ROWS, r = i % ROWS;
    const int row = row0 + r;
    if (m >= M || row >= N) continue;
    float sum = 0.f;
    for (int k = 0; k < num_warps; ++k) sum += partial[k][i];
    if constexpr (!GROUPED) sum *= scales[row];
    if (bias != nullptr) sum += static_cast<float>(bias[row]);
    out[static_cast<int64_t>(m) * N + row] = static_cast<T>(sum);
  }
}

template <typename T, int MT, int ROWS, bool GROUPED>
void launch(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
            const T* bias, int64_t group_size, int threads, cudaStream_t stream) {
  const int M = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1));
  const int N = static_cast<int>(qweight.size(0));
  const unsigned blocks = static_cast<unsigned>((N + ROWS - 1) / ROWS);
  w8a16_gemv_kernel<T, MT, ROWS, GROUPED><<<blocks, threads, 0, stream>>>(
      out.data_ptr<T>(), x.const_data_ptr<T>(), x.stride(0), qweight.const_data_ptr<int8_t>(),
      scales.const_data_ptr<float>(), bias, M, N, K, static_cast<int>(group_size));
}

// Launch shape (rows per block, threads per block) by tokens and K, from the sweep of every variant on
// H100 (benches/tune_int8.py; benches/NOTES.md, INT8): at one token four rows and 256 threads (one
// 16-weight chunk per thread per row at K = 4096) are best up to K = 4096, two rows and 128 threads
// past it; at 2..4 tokens, 64 threads (more blocks in flight); past 4 tokens, four rows and 128 threads.
std::pair<int, int> pick_launch(int64_t M, int64_t K) {
  if (M == 1) {
    if (K >= 8192) return {2, 128};
    return {4, K >= 4096 ? 256 : 128};
  }
  if (M <= 4) return {K <= 2048 ? 2 : 4, 64};
  return {4, 128};
}

template <typename T, int ROWS, bool GROUPED>
void dispatch_tokens(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const T* bias, int64_t group_size, int threads, cudaStream_t stream) {
  const int64_t M = x.size(0);
  if (M == 1) return launch<T, 1, ROWS, GROUPED>(out, x, qweight, scales, bias, group_size, threads, stream);
  if (M == 2) return launch<T, 2, ROWS, GROUPED>(out, x, qweight, scales, bias, group_size, threads, stream);
  if (M <= 4) return launch<T, 4, ROWS, GROUPED>(out, x, qweight, scales, bias, group_size, threads, stream);
  if (M <= 8) return launch<T, 8, ROWS, GROUPED>(out, x, qweight, scales, bias, group_size, threads, stream);
  return launch<T, 16, ROWS, GROUPED>(out, x, qweight, scales, bias, group_size, threads, stream);
}

template <typename T, bool GROUPED>
void dispatch_rows(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                   const T* bias, int64_t group_size, int rows, int threads, cudaStream_t stream) {
  switch (rows) {
#ifdef DECODING_GEMV_TUNE
    case 1: return dispatch_tokens<T, 1, GROUPED>(out, x, qweight, scales, bias, group_size, threads, stream);
    case 8: return dispatch_tokens<T, 8, GROUPED>(out, x, qweight, scales, bias, group_size, threads, stream);
#endif
    case 2: return dispatch_tokens<T, 2, GROUPED>(out, x, qweight, scales, bias, group_size, threads, stream);
    case 4: return dispatch_tokens<T, 4, GROUPED>(out, x, qweight, scales, bias, group_size, threads, stream);
    default: TORCH_CHECK(false, "w8a16_gemv: no kernel compiled for ", rows, " rows per block");
  }
}

void run_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
              const c10::optional<at::Tensor>& bias, int rows, int threads) {
  const int64_t group_size = check_w8a16_gemv_args(out, x, qweight, scales, bias);
  TORCH_CHECK(threads % kWarpSize == 0 && threads >= kWarpSize && threads <= kMaxThreads,
              "threads must be a multiple of 32 in [32, ", kMaxThreads, "], got ", threads);
  const bool grouped = scales.dim() == 2;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto go = [&](auto tag) {
    using T = decltype(tag);
    const T* b = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
    if (grouped) {
      dispatch_rows<T, true>(out, x, qweight, scales, b, group_size, rows, threads, stream);
    } else {
      dispatch_rows<T, false>(out, x, qweight, scales, b, group_size, rows, threads, stream);
    }
  };
#ifdef DECODING_GEMV_TUNE
  // The tuning build sweeps launch shapes only: bf16, per-channel scales.
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && !grouped, "tuning build: bfloat16, per-channel scales only");
  dispatch_rows<c10::BFloat16, false>(out, x, qweight, scales,
                                      bias.has_value() ? bias->const_data_ptr<c10::BFloat16>() : nullptr, group_size,
                                      rows, threads, stream);
  (void)go;
#else
  if (x.scalar_type() == at::kBFloat16) {
    go(c10::BFloat16{});
  } else {
    go(c10::Half{});
  }
#endif
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void w8a16_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                const c10::optional<at::Tensor>& bias) {
  const auto [rows, threads] = pick_launch(x.size(0), x.size(1));
  run_gemv(out, x, qweight, scales, bias, rows, threads);
}

#ifdef DECODING_GEMV_TUNE
void w8a16_gemv_tune(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias, int64_t rows, int64_t threads) {
  run_gemv(out, x, qweight, scales, bias, static_cast<int>(rows), static_cast<int>(threads));
}
#endif

}  // namespace

#ifdef DECODING_GEMV_TUNE
// A stand-alone build (benches/tune_int8_gemv.py) with every rows-per-block variant and the launch
// shape as arguments, under its own namespace so that it loads beside decoding._C.
TORCH_LIBRARY(decoding_gemv_tune, m) {
  m.def("w8a16_gemv(Tensor! out, Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int rows, int threads) -> ()");
}
TORCH_LIBRARY_IMPL(decoding_gemv_tune, CUDA, m) { m.impl("w8a16_gemv", &w8a16_gemv_tune); }
#else
TORCH_LIBRARY_IMPL(decoding, CUDA, m) { m.impl("w8a16_gemv", &w8a16_gemv); }
#endif

}  // namespace decoding
