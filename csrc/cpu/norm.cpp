// RMSNorm and fused add + RMSNorm on CPU, for fp32, bf16 and fp16, one row at a time (rows in parallel).
// Numerics follow decoding/reference.py (HF): the residual add is rounded to the dtype, the sum of squares
// is taken in fp32 from the rounded values, x * rsqrt(mean + eps) is rounded to the dtype, and that
// times the weight is rounded again (the product of two 16-bit floats is exact in fp32, so this is the
// single rounding torch does for a bf16/fp16 multiply).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../norm_checks.h"

namespace decoding {
namespace {

// Rows are short (hidden <= ~16k) but many may come at once in prefill: split them in chunks this big.
constexpr int64_t kRowsPerTask = 16;
// Independent fp32 partial sums let the compiler vectorise the reduction without -ffast-math.
constexpr int kLanes = 8;

template <typename T>
float sum_of_squares(const T* x, int64_t hidden) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= hidden; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = static_cast<float>(x[i + l]);
      acc[l] += v * v;
    }
  }
  for (; i < hidden; ++i) {
    const float v = static_cast<float>(x[i]);
    acc[0] += v * v;
  }
  float total = 0.f;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// out[i] = T(w[i] * T(x[i] * inv_rms)); for T = float both casts are no-ops.
template <typename T>
void scale_row(T* out, const T* x, const T* weight, float inv_rms, int64_t hidden) {
  for (int64_t i = 0; i < hidden; ++i) {
    const T normed = static_cast<T>(static_cast<float>(x[i]) * inv_rms);
    out[i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(normed));
  }
}

template <typename T>
void rms_norm_rows(T* out, int64_t out_stride, const T* in, int64_t in_stride, const T* weight, float eps,
                   int64_t num_tokens, int64_t hidden) {
  at::parallel_for(0, num_tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = in + r * in_stride;
      const float inv_rms = 1.f / std::sqrt(sum_of_squares(x, hidden) / static_cast<float>(hidden) + eps);
      scale_row(out + r * out_stride, x, weight, inv_rms, hidden);
    }
  });
}

template <typename T>
void fused_add_rms_norm_rows(T* in, int64_t in_stride, T* res, int64_t res_stride, const T* weight, float eps,
                             int64_t num_tokens, int64_t hidden) {
  at::parallel_for(0, num_tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* x = in + r * in_stride;
      T* residual = res + r * res_stride;
      for (int64_t i = 0; i < hidden; ++i) {
        residual[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(residual[i]));
      }
      const float inv_rms = 1.f / std::sqrt(sum_of_squares(residual, hidden) / static_cast<float>(hidden) + eps);
      scale_row(x, residual, weight, inv_rms, hidden);
    }
  });
}

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  check_norm_args(input, weight, c10::DeviceType::CPU);
  check_same(out, input, "out");
  const int64_t hidden = input.size(-1);
  const int64_t in_stride = row_stride(input, "input", false);
  const int64_t out_stride = row_stride(out, "out", true);
  if (input.numel() == 0) return;
  const int64_t num_tokens = input.numel() / hidden;
  dispatch_float(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(out.data_ptr<T>(), out_stride, input.const_data_ptr<T>(), in_stride, weight.const_data_ptr<T>(),
                     static_cast<float>(epsilon), num_tokens, hidden);
  });
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon) {
  check_norm_args(input, weight, c10::DeviceType::CPU);
  check_same(residual, input, "residual");
  const int64_t hidden = input.size(-1);
  const int64_t in_stride = row_stride(input, "input", true);
  const int64_t res_stride = row_stride(residual, "residual", true);
  if (input.numel() == 0) return;
  const int64_t num_tokens = input.numel() / hidden;
  dispatch_float(input.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    fused_add_rms_norm_rows<T>(input.data_ptr<T>(), in_stride, residual.data_ptr<T>(), res_stride,
                               weight.const_data_ptr<T>(), static_cast<float>(epsilon), num_tokens, hidden);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(decoding, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
}

}  // namespace decoding
