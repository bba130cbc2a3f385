// Boundary checks shared by the CPU and CUDA norm kernels: both accept [..., hidden] tensors whose
// last dim is contiguous and whose leading dims collapse to one row stride (e.g. x[:, :hidden]).
#pragma once

#include <ATen/ATen.h>

namespace decoding {

// Stride between consecutive rows when `t` is viewed as [numel / hidden, hidden]. Written tensors
// (`written`) must not have overlapping rows, since rows are processed in parallel.
inline int64_t row_stride(const at::Tensor& t, const char* name, bool written) {
  const int64_t dim = t.dim();
  TORCH_CHECK(dim >= 1, name, " must have at least one dim");
  const int64_t hidden = t.size(-1);
  TORCH_CHECK(t.stride(-1) == 1 || hidden <= 1, name, " must be contiguous in its last dim, got strides ",
              t.strides());
  int64_t stride = -1;
  int64_t inner_rows = 1;
  for (int64_t d = dim - 2; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (stride < 0) {
      stride = t.stride(d);
    } else {
      TORCH_CHECK(t.stride(d) == stride * inner_rows, name, " leading dims must collapse to one row stride, got sizes ",
                  t.sizes(), " strides ", t.strides());
    }
    inner_rows *= t.size(d);
  }
  if (stride < 0) return hidden;  // a single row
  TORCH_CHECK(!written || stride >= hidden, name, " rows overlap (row stride ", stride, " < hidden ", hidden, ")");
  return stride;
}

inline void check_norm_args(const at::Tensor& input, const at::Tensor& weight, c10::DeviceType device) {
  TORCH_CHECK(input.device().type() == device, "input must be on ", device, ", got ", input.device());
  TORCH_CHECK(weight.device() == input.device(), "weight must be on ", input.device(), ", got ", weight.device());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "input must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype, "weight dtype ", weight.scalar_type(), " must match input dtype ",
              dtype);
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous(), "weight must be a contiguous 1-D tensor");
  TORCH_CHECK(input.dim() >= 1 && weight.size(0) == input.size(-1), "weight has ", weight.size(0),
              " elements but input's last dim is ", input.size(-1));
}

inline void check_same(const at::Tensor& a, const at::Tensor& input, const char* name) {
  TORCH_CHECK(a.device() == input.device(), name, " must be on ", input.device(), ", got ", a.device());
  TORCH_CHECK(a.scalar_type() == input.scalar_type(), name, " dtype ", a.scalar_type(), " must match input dtype ",
              input.scalar_type());
  TORCH_CHECK(a.sizes() == input.sizes(), name, " shape ", a.sizes(), " must match input shape ", input.sizes());
}

// Calls fn(T{}) with T the C++ type of `dtype` (fp32, bf16 or fp16; the checks reject the rest).
template <typename Fn>
void dispatch_float(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, "unsupported dtype ", dtype);
  }
}

}  // namespace decoding
