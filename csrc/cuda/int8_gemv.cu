// W8A16 GEMV / skinny GEMM for decode: out [M, N] = x [M, K] @ (qweight [N, K] int8 * scales)^T (+ bias),
// M = 1..16 tokens, x and out in bf16 or fp16, accumulation in fp32. w8a16_gemv_silu_mul fuses the MLP's
// activation: qweight holds the gate rows then the up rows ([2I, K]) and out [M, I] = silu(gate) * up, with
// the roundings of the unfused ops (gate and up rounded to the dtype, silu rounded, product rounded).
//
// At decode the weights are the only large operand, so the kernel is built around reading them once at
// full bandwidth. A block of `threads` threads owns R output rows over the whole K (split-K within the
// block): thread t streams the 16-int8 chunks t, t + threads, ... of each of the block's weight rows with
// 16-byte loads that bypass L1 (which keeps x, re-read by every block), U chunks a row at a time, loading
// the next U while it computes on the current ones, and dequantizes in registers with a byte-permute into
// the mantissa of 2^23 (exact, and cheaper than the I2F conversion pipe). Partial sums are reduced with
// warp shuffles, then across warps in shared memory in warp order (deterministic, no atomics, one
// kernel), and the per-output-channel scale, then the bias or SiLU(gate) * up, finish each row
// (gemv_common.cuh, shared with the 16-bit GEMV of gemv.cu). With group-wise scales the 16-element partial
// dot is scaled per group as it is accumulated.
//
// The block size fixes the order of a row's sums, so it follows the weight's shape only, never M
// (pick_threads): a sequence gets the same bits whatever else is in the batch, and a decode graph padded
// to its bucket gives what the unpadded step gives. R and U (rows a block owns, chunks in flight) are
// picked by M and do not change the bits. Small matrices (the 1B qkv and o projections, 4-6 MB) take 64
// threads a block: many blocks, all resident at once, each thread with all its chunks in flight. Kernels
// launch with programmatic dependent launch (pdl.h): the first weights are loaded before griddepcontrol.wait,
// overlapping the tail of the kernel before.
//
// DECODING_INT8_GEMV_SPLIT (read once; A/B runs and tuning: benches/bench_gemv.py --int8 [--sweep]):
// 0: one warp a block (row-parallel: each warp owns its rows, no cross-warp reduction); force: the
// small-matrix block size (64 threads) on every shape; 32|64|128|256: that block size everywhere; legacy:
// the launch shapes used before the split choice (picked by M and K, so a row's bits depend on M).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>

#include "../int8_checks.h"
#include "gemv_common.cuh"
#include "pdl.h"

namespace decoding {
namespace {

using gemv_common::finish;
using gemv_common::kPack;
using gemv_common::kWarpSize;
using gemv_common::load_stream;
using gemv_common::store_warp_partials;
using gemv_common::unpack8;
using gemv_common::weight_rows;

constexpr int kMaxThreads = 256;
constexpr int kChunk = static_cast<int>(kGemvChunk);  // int8 weights per 16-byte load

// Four int8 (one 32-bit word) -> four exact floats: flipping the sign bit gives b = w + 128 in [1, 255],
// placed in the low mantissa byte of 2^23 (0x4B000000) that is 2^23 + b; subtracting 2^23 + 128 leaves w.
__device__ __forceinline__ void int8x4_to_float(uint32_t word, float* f) {
  const uint32_t u = word ^ 0x80808080u;
  f[0] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7650)) - 8388736.f;
  f[1] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7651)) - 8388736.f;
  f[2] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7652)) - 8388736.f;
  f[3] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7653)) - 8388736.f;
}

// Chunks c0, c0 + stride, ..., U of them, of every weight row; chunks past the row are not loaded.
template <int U, int NW>
__device__ __forceinline__ void load_chunks(uint4 (&dst)[U][NW], const int8_t* const (&rows)[NW], int c0, int stride,
                                            int chunks) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = c0 + u * stride;
#pragma unroll
    for (int j = 0; j < NW; ++j) dst[u][j] = c < chunks ? load_stream(rows[j] + c * kChunk) : make_uint4(0, 0, 0, 0);
  }
}

// acc[j][m] += the 16 weights wv[j] (chunk c of weight row j) times the same elements of x row m, m < M;
// with group-wise scales, each row's 16-element partial times its group's scale (srow[j]: the row's scales).
template <typename T, int MT, int NW, bool GROUPED>
__device__ __forceinline__ void fma_chunk(float (&acc)[NW][MT], const uint4 (&wv)[NW], const T* __restrict__ x,
                                          int64_t ldx, int c, int M, const float* const (&srow)[NW],
                                          int group_size) {
  float wf[NW][kChunk];
#pragma unroll
  for (int j = 0; j < NW; ++j) {
    int8x4_to_float(wv[j].x, &wf[j][0]);
    int8x4_to_float(wv[j].y, &wf[j][4]);
    int8x4_to_float(wv[j].z, &wf[j][8]);
    int8x4_to_float(wv[j].w, &wf[j][12]);
  }
  float group_scale[NW];
  if constexpr (GROUPED) {
    const int g = c * kChunk / group_size;
#pragma unroll
    for (int j = 0; j < NW; ++j) group_scale[j] = srow[j][g];
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (MT > 1 && m >= M) break;
    const uint4* xp = reinterpret_cast<const uint4*>(x + m * ldx + c * kChunk);
    float xf[2][kPack];
    unpack8<T>(xp[0], xf[0]);
    unpack8<T>(xp[1], xf[1]);
#pragma unroll
    for (int j = 0; j < NW; ++j) {
      if constexpr (GROUPED) {
        float part = 0.f;
#pragma unroll
        for (int e = 0; e < kChunk; ++e) part = fmaf(wf[j][e], xf[e / kPack][e % kPack], part);
        acc[j][m] = fmaf(part, group_scale[j], acc[j][m]);
      } else {
#pragma unroll
        for (int e = 0; e < kChunk; ++e) acc[j][m] = fmaf(wf[j][e], xf[e / kPack][e % kPack], acc[j][m]);
      }
    }
  }
}

// grid: ceil(n_out / R) blocks of blockDim.x <= kMaxThreads threads (a multiple of 32). MT >= M is the
// compiled token count; rows of x past M are never read. NW = R weight rows a block (2R with GLU: gate and
// up), U chunks of each in flight per thread and batch.
template <typename T, int MT, int R, int U, bool GROUPED, bool GLU>
__global__ void __launch_bounds__(kMaxThreads)
    w8a16_gemv_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t ldx, const int8_t* __restrict__ w,
                      const float* __restrict__ scales, const T* __restrict__ bias, int M, int n_out, int K,
                      int group_size) {
  constexpr int NW = GLU ? 2 * R : R;
  trigger_dependents();
  const int row0 = blockIdx.x * R;
  const int chunks = K / kChunk;
  const int stride = blockDim.x;
  const int8_t* rows[NW];
  weight_rows<int8_t, R, GLU>(rows, w, row0, n_out, K);
  const float* srow[NW];  // each weight row's scales: one, or K / group_size
  const int scales_per_row = GROUPED ? K / group_size : 1;
#pragma unroll
  for (int j = 0; j < NW; ++j) {
    const int row = min(row0 + j % R, n_out - 1) + (j >= R ? n_out : 0);
    srow[j] = scales + static_cast<int64_t>(row) * scales_per_row;
  }

  float acc[NW][MT] = {};

  uint4 cur[U][NW];
  load_chunks<U, NW>(cur, rows, threadIdx.x, stride, chunks);
  // PDL: the weights above stream while the kernel before ends; x (its output) is read, and out written,
  // only after it has completed.
  grid_dependency_wait();
  for (int c0 = threadIdx.x; c0 < chunks; c0 += U * stride) {
    uint4 nxt[U][NW];
    load_chunks<U, NW>(nxt, rows, c0 + U * stride, stride, chunks);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * stride;
      if (c >= chunks) break;
      fma_chunk<T, MT, NW, GROUPED>(acc, cur[u], x, ldx, c, M, srow, group_size);
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < NW; ++j) cur[u][j] = nxt[u][j];
  }

  // Block reduction: shuffles within each warp, then one float per (warp, j, m) in shared memory, added
  // in warp order by one thread per (output row, token).
  __shared__ float partial[kMaxThreads / kWarpSize][NW * MT];
  store_warp_partials(acc, partial);
  __syncthreads();
  const int warps = stride / kWarpSize;
  for (int i = threadIdx.x; i < R * MT; i += stride) {
    const int r = i / MT, m = i % MT;
    const int row = row0 + r;
    if (m >= M || row >= n_out) continue;
    auto total = [&](int j) {
      float s = 0.f;
      for (int k = 0; k < warps; ++k) s += partial[k][j * MT + m];
      return s;
    };
    float dot = total(r), up_dot = 0.f;
    if constexpr (GLU) up_dot = total(R + r);
    if constexpr (!GROUPED) {
      dot *= scales[row];
      if constexpr (GLU) up_dot *= scales[row + n_out];
    }
    out[static_cast<int64_t>(m) * n_out + row] = finish<T, GLU>(dot, up_dot, bias, row);
  }
}

template <typename T>
struct GemvArgs {
  T* out;
  const T* x;
  int64_t ldx;
  const int8_t* w;
  const float* scales;
  const T* bias;
  int M, n_out, K, group_size;
};

template <typename T, int MT, int R, int U, bool GROUPED, bool GLU>
void launch_kernel(const GemvArgs<T>& a, int threads, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.n_out + R - 1) / R));
  launch(w8a16_gemv_kernel<T, MT, R, U, GROUPED, GLU>, grid, dim3(threads), 0, stream, a.out, a.x, a.ldx, a.w,
         a.scales, a.bias, a.M, a.n_out, a.K, a.group_size);
}

// Output rows a block owns (R) and chunks of each weight row in flight per thread and batch (U).
struct Shape {
  int rows;
  int unroll;
  int threads;
};

template <typename T, int MT, bool GROUPED, bool GLU>
void dispatch_shape(const GemvArgs<T>& a, Shape s, cudaStream_t stream) {
#ifdef DECODING_GEMV_TUNE
  // The tuning build sweeps rows per block and threads, one chunk in flight per row (U = 1).
  switch (s.rows) {
    case 1: return launch_kernel<T, MT, 1, 1, GROUPED, GLU>(a, s.threads, stream);
    case 2: return launch_kernel<T, MT, 2, 1, GROUPED, GLU>(a, s.threads, stream);
    case 4: return launch_kernel<T, MT, 4, 1, GROUPED, GLU>(a, s.threads, stream);
    case 8: return launch_kernel<T, MT, 8, 1, GROUPED, GLU>(a, s.threads, stream);
    default: TORCH_CHECK(false, "w8a16_gemv: no kernel compiled for ", s.rows, " rows per block");
  }
#else
  // The instances pick_shape asks for: at M <= 2, (R, U) = (2, 2) or (4, 1) (GLU: (1, 2) or (2, 1)); past
  // that (4, 1) (GLU: (2, 1)); and (2, 1) for the legacy launch shapes at M <= 4.
  if constexpr (GLU) {
    if constexpr (MT <= 2) {
      if (s.rows == 1) return launch_kernel<T, MT, 1, 2, GROUPED, true>(a, s.threads, stream);
    }
    return launch_kernel<T, MT, 2, 1, GROUPED, true>(a, s.threads, stream);
  } else {
    if constexpr (MT <= 2) {
      if (s.rows == 2 && s.unroll == 2) return launch_kernel<T, MT, 2, 2, GROUPED, false>(a, s.threads, stream);
    }
    if constexpr (MT <= 4) {
      if (s.rows == 2) return launch_kernel<T, MT, 2, 1, GROUPED, false>(a, s.threads, stream);
    }
    return launch_kernel<T, MT, 4, 1, GROUPED, false>(a, s.threads, stream);
  }
#endif
}

template <typename T, bool GROUPED, bool GLU>
void dispatch_tokens(const GemvArgs<T>& a, Shape s, cudaStream_t stream) {
  if (a.M == 1) return dispatch_shape<T, 1, GROUPED, GLU>(a, s, stream);
  if (a.M == 2) return dispatch_shape<T, 2, GROUPED, GLU>(a, s, stream);
  if (a.M <= 4) return dispatch_shape<T, 4, GROUPED, GLU>(a, s, stream);
  if (a.M <= 8) return dispatch_shape<T, 8, GROUPED, GLU>(a, s, stream);
  return dispatch_shape<T, 16, GROUPED, GLU>(a, s, stream);
}

#ifndef DECODING_GEMV_TUNE
enum class SplitMode { kAuto, kRows, kForce, kFixed, kLegacy };

struct SplitSetting {
  SplitMode mode;
  int threads;  // kFixed: every launch takes this many threads a block
};

// DECODING_INT8_GEMV_SPLIT (see the top of the file), read once, as DECODING_PDL (pdl.h).
SplitSetting split_setting() {
  static const SplitSetting setting = [] {
    const char* env = std::getenv("DECODING_INT8_GEMV_SPLIT");
    const std::string value = env != nullptr ? env : "";
    if (value == "0") return SplitSetting{SplitMode::kRows, kWarpSize};
    if (value == "force") return SplitSetting{SplitMode::kForce, 0};
    if (value == "legacy") return SplitSetting{SplitMode::kLegacy, 0};
    if (value == "32" || value == "64" || value == "128" || value == "256") {
      return SplitSetting{SplitMode::kFixed, std::stoi(value)};
    }
    return SplitSetting{SplitMode::kAuto, 0};
  }();
  return setting;
}

// Weights up to this many bytes count as small: 64 threads a block, two 16-byte chunks of each row per
// thread at K = 2048, so every block of the grid is resident and every weight in flight at once. On the
// H100 sweep (benches/NOTES.md, INT8) 64 threads won on the 1B qkv (6 MB) and o (4 MB) projections.
constexpr int64_t kSmallWeightBytes = int64_t{8} << 20;

// Threads per block for a weight of `rows` rows (gate and up rows both, with GLU) and K columns: from the
// shape only, so a row's bits do not depend on M. Past the small matrices, from the same sweep's winners
// at one token: 256 where each thread has one chunk of a row (K = 4096: 8B qkv, o, gate_up), else 128
// (1B gate_up at K = 2048, the down projections at K = 8192 and 14336). Never many more threads than a
// row has chunks.
int pick_threads(int64_t rows, int64_t K) {
  const auto [mode, fixed] = split_setting();
  if (mode == SplitMode::kRows || mode == SplitMode::kFixed) return fixed;
  const int64_t chunks = K / kChunk;
  int threads = 128;
  if (mode == SplitMode::kForce || rows * K <= kSmallWeightBytes) {
    threads = 64;
  } else if (chunks >= 256 && chunks < 512) {
    threads = 256;
  }
  while (threads > kWarpSize && threads / 2 >= chunks) threads /= 2;
  return threads;
}

// The launch shapes used before pick_threads, from the same sweep but by M (DECODING_INT8_GEMV_SPLIT=
// legacy, A/B runs only): at one token four rows and 256 threads up to K = 4096, two rows and 128 threads
// past it; at 2..4 tokens, 64 threads; past 4 tokens, four rows and 128 threads.
std::pair<int, int> legacy_launch(int64_t M, int64_t K) {
  if (M == 1) {
    if (K >= 8192) return {2, 128};
    return {4, K >= 4096 ? 256 : 128};
  }
  if (M <= 4) return {K <= 2048 ? 2 : 4, 64};
  return {4, 128};
}

// At M <= 2: four 16-byte loads of weights in flight per thread, as two chunks of two rows where each
// thread has at least two chunks of a row, else one chunk of four rows (GLU: of two gate and two up rows).
// Past two tokens the accumulators (NW x MT) take the registers: one chunk of four rows.
Shape pick_shape(int64_t M, int64_t n_rows, int64_t K, bool glu) {
  if (split_setting().mode == SplitMode::kLegacy) {
    const auto [rows, threads] = legacy_launch(M, K);
    return {glu ? rows / 2 : rows, 1, threads};
  }
  const int threads = pick_threads(n_rows, K);
  const int64_t per_thread = (K / kChunk + threads - 1) / threads;
  const int nw = glu ? 2 : 1;
  if (M <= 2 && per_thread >= 2) return {2 / nw, 2, threads};
  return {4 / nw, 1, threads};
}
#endif

template <typename T>
GemvArgs<T> gemv_args(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& bias) {
  const int64_t K = x.size(1);
  return {out.data_ptr<T>(),
          x.const_data_ptr<T>(),
          x.stride(0),
          qweight.const_data_ptr<int8_t>(),
          scales.const_data_ptr<float>(),
          bias.has_value() ? bias->const_data_ptr<T>() : nullptr,
          static_cast<int>(x.size(0)),
          static_cast<int>(out.size(1)),
          static_cast<int>(K),
          static_cast<int>(scales.dim() == 2 ? K / scales.size(1) : K)};
}

template <bool GLU>
void run(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
         const c10::optional<at::Tensor>& bias, Shape shape) {
  const bool grouped = scales.dim() == 2;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
#ifdef DECODING_GEMV_TUNE
  // The tuning build sweeps launch shapes only: bf16, per-channel scales.
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && !grouped, "tuning build: bfloat16, per-channel scales only");
  dispatch_tokens<c10::BFloat16, false, GLU>(gemv_args<c10::BFloat16>(out, x, qweight, scales, bias), shape, stream);
#else
  auto go = [&](auto tag) {
    using T = decltype(tag);
    const GemvArgs<T> a = gemv_args<T>(out, x, qweight, scales, bias);
    if (grouped) {
      dispatch_tokens<T, true, GLU>(a, shape, stream);
    } else {
      dispatch_tokens<T, false, GLU>(a, shape, stream);
    }
  };
  if (x.scalar_type() == at::kBFloat16) {
    go(c10::BFloat16{});
  } else {
    go(c10::Half{});
  }
#endif
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#ifdef DECODING_GEMV_TUNE
void w8a16_gemv_tune(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias, int64_t rows, int64_t threads) {
  check_w8a16_gemv_args(out, x, qweight, scales, bias, false);
  TORCH_CHECK(threads % kWarpSize == 0 && threads >= kWarpSize && threads <= kMaxThreads,
              "threads must be a multiple of 32 in [32, ", kMaxThreads, "], got ", threads);
  run<false>(out, x, qweight, scales, bias, Shape{static_cast<int>(rows), 1, static_cast<int>(threads)});
}
#else
void w8a16_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                const c10::optional<at::Tensor>& bias) {
  check_w8a16_gemv_args(out, x, qweight, scales, bias, false);
  run<false>(out, x, qweight, scales, bias, pick_shape(x.size(0), qweight.size(0), x.size(1), false));
}

void w8a16_gemv_silu_mul(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_w8a16_gemv_args(out, x, qweight, scales, c10::nullopt, true);
  run<true>(out, x, qweight, scales, c10::nullopt, pick_shape(x.size(0), qweight.size(0), x.size(1), true));
}
#endif

}  // namespace

#ifdef DECODING_GEMV_TUNE
// A stand-alone build (benches/tune_int8.py) with every rows-per-block variant and the launch shape as
// arguments, under its own namespace so that it loads beside decoding._C.
TORCH_LIBRARY(decoding_gemv_tune, m) {
  m.def("w8a16_gemv(Tensor! out, Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int rows, int threads) -> ()");
}
TORCH_LIBRARY_IMPL(decoding_gemv_tune, CUDA, m) { m.impl("w8a16_gemv", &w8a16_gemv_tune); }
#else
TORCH_LIBRARY_IMPL(decoding, CUDA, m) {
  m.impl("w8a16_gemv", &w8a16_gemv);
  m.impl("w8a16_gemv_silu_mul", &w8a16_gemv_silu_mul);
}
#endif

}  // namespace decoding
