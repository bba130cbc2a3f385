// Decode-time matmuls for a few rows of activations (batch 1..8): y[m, n] = sum_k x[m, k] * w[n, k].
//
// At small batch a linear layer reads its whole weight matrix to do 2 * M flops per weight, so it is
// bound by memory bandwidth, and cuBLAS leaves some of it unused on these shapes (DESIGN.md). One warp
// owns R output rows: each lane streams 16-byte chunks of those rows (U chunks in flight per lane),
// multiplies them with the matching chunks of every activation row (read through L1/L2: they are small
// and shared by all warps), accumulates in fp32, and the warp reduces with shuffles at the end.
//
// gemv_silu_mul fuses the MLP's activation: w holds gate rows then up rows ([2I, K]); the warp owning
// output j reads rows j and I + j and writes silu(gate) * up, with the roundings the unfused ops do
// (gate and up rounded to the dtype, silu rounded, product rounded), so it matches them up to the fp32
// summation order of the dot products.
//
// Small matrices (the 1B model's qkv, o and down projections: 8-34 MB) give that row-parallel grid
// only ~8-12 warps per SM, each with one long burst of loads and then a serial tail of FMAs. For them
// gemv_split_kernel spreads each block's R rows over up to 256 threads along K (thread t reads chunks
// t, t + threads, ...), so 4-8x more warps share the same bytes in flight, and reduces the partial sums
// through shared memory in a fixed order (deterministic, no atomics, one kernel). The host picks it
// when the row-parallel grid is short of warps (pick_split_threads); DECODING_GEMV_SPLIT=0 turns it
// off, DECODING_GEMV_SPLIT=force takes it wherever it can launch, =64|128|256 with that block size
// (A/B runs and tuning: benches/bench_gemv.py --graph [--sweep]; read once).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "gemv_common.cuh"
#include "pdl.h"

namespace decoding {
namespace {

using gemv_common::finish;
using gemv_common::kWarpSize;
using gemv_common::load_stream;
using gemv_common::store_warp_partials;
using gemv_common::unpack8;
using gemv_common::warp_sum;
using gemv_common::weight_rows;

constexpr int kWarps = 4;                   // warps per block
constexpr int kChunk = gemv_common::kPack;  // elements per 16-byte load
constexpr int kMaxRows = 8;                 // largest M with a kernel instance
constexpr int kSplitMaxThreads = 256;       // threads per block of the split-K kernel

// acc[j][m] += the 8 weights wv[j] (elements k..k+7 of weight row j) times the same elements of x row m.
template <typename T, int M, int NW>
__device__ __forceinline__ void fma_chunk(float (&acc)[NW][M], const uint4 (&wv)[NW], const T* __restrict__ x,
                                          int64_t ldx, int k) {
  float xf[M][kChunk];
#pragma unroll
  for (int m = 0; m < M; ++m) unpack8<T>(*reinterpret_cast<const uint4*>(x + m * ldx + k), xf[m]);
#pragma unroll
  for (int j = 0; j < NW; ++j) {
    float wf[kChunk];
    unpack8<T>(wv[j], wf);
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int e = 0; e < kChunk; ++e) acc[j][m] = fmaf(wf[e], xf[m][e], acc[j][m]);
  }
}

// M activation rows, R output rows per warp, U 16-byte chunks in flight per lane and weight row.
template <typename T, int M, int R, int U, bool GLU>
__global__ void __launch_bounds__(kWarps * kWarpSize)
    gemv_kernel(T* __restrict__ out, int64_t ldo, const T* __restrict__ x, int64_t ldx, const T* __restrict__ w,
                const T* __restrict__ bias, int n_out, int K) {
  constexpr int NW = GLU ? 2 * R : R;  // weight rows read by the warp
  trigger_dependents();
  const int lane = threadIdx.x % kWarpSize;
  const int row0 = (blockIdx.x * kWarps + threadIdx.x / kWarpSize) * R;
  if (row0 >= n_out) {
    grid_dependency_wait();  // PDL contract: nothing after the predecessor's end is skipped silently
    return;
  }
  const T* rows[NW];
  weight_rows<T, R, GLU>(rows, w, row0, n_out, K);
  float acc[NW][M] = {};

  constexpr int kStep = kWarpSize * kChunk;  // elements a warp covers with one load per lane
  bool waited = false;
  for (int base = lane * kChunk; base < K; base += U * kStep) {
    uint4 wv[U][NW];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = base + u * kStep;
#pragma unroll
      for (int j = 0; j < NW; ++j) wv[u][j] = k < K ? load_stream(rows[j] + k) : make_uint4(0, 0, 0, 0);
    }
    if (!waited) {
      // Launched with programmatic dependent launch (pdl.h): the first weight loads above overlap the
      // end of the kernel before; x, which that kernel writes, is read only after it has completed.
      grid_dependency_wait();
      waited = true;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = base + u * kStep;
      if (k >= K) break;
      fma_chunk<T, M, NW>(acc, wv[u], x, ldx, k);
    }
  }
#pragma unroll
  for (int j = 0; j < NW; ++j)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[j][m] = warp_sum(acc[j][m]);
  if (lane != 0) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int row = row0 + r;
    if (row >= n_out) break;
#pragma unroll
    for (int m = 0; m < M; ++m) out[m * ldo + row] = finish<T, GLU>(acc[r][m], acc[GLU ? R + r : r][m], bias, row);
  }
}

// Split-K: a block of blockDim.x threads (a multiple of 32, <= kSplitMaxThreads) owns R output rows over
// the whole K. Thread t streams chunks t + i * blockDim.x of every row, U of them per row in flight; the
// block's partial sums meet in shared memory and are added warp by warp in a fixed order.
template <typename T, int M, int R, int U, bool GLU>
__global__ void __launch_bounds__(kSplitMaxThreads)
    gemv_split_kernel(T* __restrict__ out, int64_t ldo, const T* __restrict__ x, int64_t ldx,
                      const T* __restrict__ w, const T* __restrict__ bias, int n_out, int K) {
  constexpr int NW = GLU ? 2 * R : R;
  trigger_dependents();
  const int row0 = blockIdx.x * R;
  const T* rows[NW];
  weight_rows<T, R, GLU>(rows, w, row0, n_out, K);
  float acc[NW][M] = {};

  const int chunks = K / kChunk;
  const int stride = blockDim.x;
  bool waited = false;
  for (int c0 = threadIdx.x; c0 < chunks; c0 += U * stride) {
    uint4 wv[U][NW];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * stride;
#pragma unroll
      for (int j = 0; j < NW; ++j)
        wv[u][j] = c < chunks ? load_stream(rows[j] + c * kChunk) : make_uint4(0, 0, 0, 0);
    }
    if (!waited) {
      grid_dependency_wait();  // PDL: weights above are prefetched, x below is the predecessor's output
      waited = true;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + u * stride;
      if (c >= chunks) break;
      fma_chunk<T, M, NW>(acc, wv[u], x, ldx, c * kChunk);
    }
  }
  if (!waited) grid_dependency_wait();  // threads with no chunk (K < 8 * blockDim.x) still write below

  __shared__ float partial[kSplitMaxThreads / kWarpSize][NW * M];
  store_warp_partials(acc, partial);
  __syncthreads();
  // One thread per (row, activation row) of the block adds the warps' partials in warp order.
  if (threadIdx.x >= R * M) return;
  const int r = threadIdx.x / M, m = threadIdx.x % M;
  const int row = row0 + r;
  if (row >= n_out) return;
  const int warps = blockDim.x / kWarpSize;
  auto total = [&](int j) {
    float s = 0.f;
    for (int i = 0; i < warps; ++i) s += partial[i][j * M + m];
    return s;
  };
  out[m * ldo + row] = finish<T, GLU>(total(r), GLU ? total(R + r) : 0.f, bias, row);
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

void check_gemv_args(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w, int64_t n_out, bool glu) {
  TORCH_CHECK(x.is_cuda() && w.device() == x.device() && out.device() == x.device(),
              "x, weight and out must be on one CUDA device");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "gemv takes bfloat16 or float16, got ", dtype);
  TORCH_CHECK(w.scalar_type() == dtype && out.scalar_type() == dtype, "x, weight and out must share a dtype");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2, "x [M, K], weight [N, K] and out [M, N] must be 2-D");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "gemv takes 1..", kMaxRows, " rows of x, got ", M);
  TORCH_CHECK(w.size(1) == K, "weight has ", w.size(1), " columns but x has ", K);
  TORCH_CHECK(w.size(0) == (glu ? 2 * n_out : n_out), "weight has ", w.size(0), " rows, expected ",
              glu ? 2 * n_out : n_out);
  TORCH_CHECK(out.size(0) == M && out.size(1) == n_out, "out must be [", M, ", ", n_out, "], got ", out.sizes());
  TORCH_CHECK(K % kChunk == 0 && K <= INT32_MAX && w.size(0) <= INT32_MAX, "K must be a multiple of 8, got ", K);
  TORCH_CHECK(w.is_contiguous() && aligned16(w), "weight must be contiguous and 16-byte aligned");
  TORCH_CHECK(x.stride(1) == 1 && x.stride(0) % kChunk == 0 && aligned16(x),
              "x rows must be contiguous, 16-byte aligned, with a row stride that is a multiple of 8");
  TORCH_CHECK(out.stride(1) == 1, "out rows must be contiguous");
}

enum class SplitMode { kOff, kAuto, kForce };

struct SplitSetting {
  SplitMode mode;
  int threads;  // > 0: every launch takes the split kernel with this many threads a block (tuning)
};

// DECODING_GEMV_SPLIT=0: the row-parallel kernel only; =force: the split kernel wherever it can launch;
// =64|128|256: the split kernel everywhere with that block size; otherwise pick_split_threads decides.
// Read once, as DECODING_PDL (pdl.h).
SplitSetting split_setting() {
  static const SplitSetting setting = [] {
    const char* env = std::getenv("DECODING_GEMV_SPLIT");
    const std::string value = env != nullptr ? env : "";
    if (value == "0") return SplitSetting{SplitMode::kOff, 0};
    if (value == "force") return SplitSetting{SplitMode::kForce, 0};
    if (value == "64" || value == "128" || value == "256") return SplitSetting{SplitMode::kForce, std::stoi(value)};
    return SplitSetting{SplitMode::kAuto, 0};
  }();
  return setting;
}

// Below this many row-parallel warps per SM (at one activation row) the split kernel is taken: on an
// H100 the 1B projections give 7.75 (o, down) and 11.6 (qkv); every Llama-3-8B projection gives >= 15.5
// (o, down) and keeps the row-parallel kernel, which reaches 2.3-3.0 TB/s on them.
constexpr int kSplitBelowWarpsPerSm = 12;

// Threads per block of the split kernel for this weight, or 0 for the row-parallel kernel. A row's sum
// is taken in an order fixed by the block size alone, so the choice depends on the weight's shape and
// never on M: a sequence gets the same bits whatever else is in the batch (and a graph padded to its
// bucket gives what the unpadded eager step gives). 128 threads where each has at least two chunks of a
// row (K >= 2048), else 64 (K >= 1024): on an H100 the 1B o, qkv and down projections get 128 threads,
// 23-46 warps per SM with 2-4 16-byte loads each in flight.
int pick_split_threads(int n_out, int K, bool glu) {
  const auto [mode, forced_threads] = split_setting();
  if (mode == SplitMode::kOff) return 0;
  if (forced_threads > 0) return forced_threads;
  int device = 0, sm_count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t warps = glu ? n_out : (n_out + 1) / 2;  // the row-parallel kernel's warps at M <= 2
  if (mode == SplitMode::kAuto && warps >= static_cast<int64_t>(kSplitBelowWarpsPerSm) * sm_count) return 0;
  const int chunks = K / kChunk;
  if (chunks >= 2 * 128) return 128;
  if (chunks >= 2 * 64) return 64;
  return mode == SplitMode::kForce ? 64 : 0;
}

template <typename T, bool GLU>
void launch_gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const T* bias, int n_out) {
  const int M = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  T* y = out.data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  auto go = [&](auto m_tag, auto r_tag) {
    constexpr int kM = decltype(m_tag)::value, kR = decltype(r_tag)::value;
    // 16-byte loads in flight per lane and weight row: enough to cover memory latency, few enough
    // registers for the accumulators of larger M.
    constexpr int kW = (GLU ? 2 : 1) * kR * kM;
    constexpr int kU = kW <= 2 ? 8 : (kW < 8 ? 4 : 2);
    // The split kernel reads the same R rows per block as the row-parallel one per warp, with four
    // 16-byte loads per thread in flight (its warps are many, so each needs fewer).
    constexpr int kNW = (GLU ? 2 : 1) * kR;
    static_assert(kNW == 1 || kNW == 2, "split kernel: 1 or 2 weight rows per block");
    constexpr int kSplitU = 4 / kNW;
    const int threads = pick_split_threads(n_out, K, GLU);
    if (threads > 0) {
      const dim3 grid(static_cast<unsigned>((n_out + kR - 1) / kR));
      launch(gemv_split_kernel<T, kM, kR, kSplitU, GLU>, grid, dim3(threads), 0, stream, y, out.stride(0), xp,
             x.stride(0), wp, bias, n_out, K);
      return;
    }
    const int rows_per_block = kWarps * kR;
    const dim3 grid(static_cast<unsigned>((n_out + rows_per_block - 1) / rows_per_block));
    launch(gemv_kernel<T, kM, kR, kU, GLU>, grid, dim3(kWarps * kWarpSize), 0, stream, y, out.stride(0), xp,
           x.stride(0), wp, bias, n_out, K);
  };
  using I = std::integral_constant<int, 1>;
  // R = 2 rows per warp at M <= 2 doubles the weight bytes each lane has in flight (the fused gate/up
  // kernel reads two rows per warp anyway): measured 2.44 -> see benches/NOTES.md on the 8B shape.
  using RowsSmallM = std::integral_constant<int, GLU ? 1 : 2>;
  switch (M) {
    case 1: return go(I{}, RowsSmallM{});
    case 2: return go(std::integral_constant<int, 2>{}, RowsSmallM{});
    case 3: return go(std::integral_constant<int, 3>{}, I{});
    case 4: return go(std::integral_constant<int, 4>{}, I{});
    case 5: return go(std::integral_constant<int, 5>{}, I{});
    case 6: return go(std::integral_constant<int, 6>{}, I{});
    case 7: return go(std::integral_constant<int, 7>{}, I{});
    default: return go(std::integral_constant<int, 8>{}, I{});
  }
}

template <bool GLU>
void run(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
         int64_t n_out) {
  check_gemv_args(out, x, w, n_out, GLU);
  if (bias.has_value()) {
    TORCH_CHECK(!GLU, "gemv_silu_mul takes no bias");
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == n_out && bias->is_contiguous(),
                "bias must be a contiguous [", n_out, "] tensor of x's dtype and device");
  }
  const c10::cuda::CUDAGuard device_guard(x.device());
  if (x.scalar_type() == at::kBFloat16) {
    using T = c10::BFloat16;
    launch_gemv<T, GLU>(out, x, w, bias.has_value() ? bias->const_data_ptr<T>() : nullptr, static_cast<int>(n_out));
  } else {
    using T = c10::Half;
    launch_gemv<T, GLU>(out, x, w, bias.has_value() ? bias->const_data_ptr<T>() : nullptr, static_cast<int>(n_out));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gemv(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  run<false>(out, x, weight, bias, weight.size(0));
}

void gemv_silu_mul(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  run<true>(out, x, weight, std::nullopt, weight.size(0) / 2);
}

}  // namespace

TORCH_LIBRARY_IMPL(decoding, CUDA, m) {
  m.impl("gemv", &gemv);
  m.impl("gemv_silu_mul", &gemv_silu_mul);
}

}  // namespace decoding
