// Boundary checks of the W8A16 GEMV (csrc/cuda/int8_gemv.cu): what the kernel assumes about its
// tensors, checked once on the host so that the kernel itself never validates.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace decoding {

// Largest number of tokens (rows of x) the GEMV takes; larger batches go to a tensor-core GEMM.
constexpr int64_t kGemvMaxTokens = 16;
// Weights are read 16 int8 at a time, so K must be a multiple of 16 (and groups of it).
constexpr int64_t kGemvChunk = 16;

inline bool is_aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

// out [M, N] <- x [M, K] @ dequant(qweight [N, K], scales)^T (+ bias [N]); with glu, qweight holds gate
// rows then up rows, out is [M, N / 2] and there is no bias. Returns the group size in elements of K (K
// itself for per-output-channel scales).
inline int64_t check_w8a16_gemv_args(const at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
                                     const at::Tensor& scales, const c10::optional<at::Tensor>& bias, bool glu) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  for (const auto* t : {&out, &qweight, &scales}) {
    TORCH_CHECK(t->device() == x.device(), "all tensors must be on ", x.device(), ", got ", t->device());
  }
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "x must be bfloat16 or float16, got ", dtype);
  TORCH_CHECK(out.scalar_type() == dtype, "out dtype ", out.scalar_type(), " must match x dtype ", dtype);
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "qweight must be int8, got ", qweight.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "scales must be float32, got ", scales.scalar_type());
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2 && out.dim() == 2, "x, qweight and out must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(M >= 1 && M <= kGemvMaxTokens, "x must have 1..", kGemvMaxTokens, " rows, got ", M);
  TORCH_CHECK(qweight.size(1) == K, "qweight is ", qweight.sizes(), " but x has K = ", K);
  TORCH_CHECK(K % kGemvChunk == 0, "K must be a multiple of ", kGemvChunk, ", got ", K);
  TORCH_CHECK(K <= INT32_MAX && N <= INT32_MAX, "K and N must fit in int32");
  TORCH_CHECK(!glu || N % 2 == 0, "qweight must hold gate and up rows (an even count), got ", N);
  const int64_t n_out = glu ? N / 2 : N;
  TORCH_CHECK(out.size(0) == M && out.size(1) == n_out, "out must be [", M, ", ", n_out, "], got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  TORCH_CHECK(qweight.is_contiguous() && is_aligned16(qweight.const_data_ptr()),
              "qweight must be contiguous and 16-byte aligned");
  TORCH_CHECK(x.stride(1) == 1 && (x.stride(0) * x.element_size()) % 16 == 0 && is_aligned16(x.const_data_ptr()),
              "x rows must be contiguous and 16-byte aligned, got strides ", x.strides());
  TORCH_CHECK(scales.is_contiguous() && scales.size(0) == N && (scales.dim() == 1 || scales.dim() == 2),
              "scales must be a contiguous [N] or [N, K / group_size] tensor, got ", scales.sizes());
  int64_t group_size = K;
  if (scales.dim() == 2) {
    const int64_t groups = scales.size(1);
    TORCH_CHECK(groups >= 1 && K % groups == 0, "scales has ", groups, " groups, which does not divide K = ", K);
    group_size = K / groups;
    TORCH_CHECK(group_size % kGemvChunk == 0, "group size must be a multiple of ", kGemvChunk, ", got ", group_size);
  }
  if (bias.has_value()) {
    TORCH_CHECK(!glu, "the fused SiLU GEMV takes no bias");
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == dtype, "bias must be ", dtype, " on ",
                x.device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(), "bias must be contiguous [N]");
  }
  return group_size;
}

}  // namespace decoding
