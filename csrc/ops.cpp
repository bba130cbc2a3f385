// The one TORCH_LIBRARY block of the project: every decoding:: schema is declared here, and the
// backends bind to them with TORCH_LIBRARY_IMPL(decoding, CPU|CUDA, m) in csrc/cpu and csrc/cuda.
// Built as the module decoding._C with an empty PyInit__C: importing it runs these static
// registrations, and callers use torch.ops.decoding.* (no pybind11, see DESIGN.md "Build").

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(decoding, m) {
  // out <- rms_norm(input) * weight over the last dim (HF numerics: normalise in fp32, round to dtype, then * weight).
  m.def("rms_norm(Tensor! out, Tensor input, Tensor weight, float epsilon) -> ()");
  // In place: residual <- input + residual (rounded to dtype); input <- rms_norm(residual) * weight.
  m.def("fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float epsilon) -> ()");
  // out [M, N] <- x [M, K] @ weight[N, K]^T (+ bias), M <= 8: the decode-time GEMV (CUDA only).
  m.def("gemv(Tensor! out, Tensor x, Tensor weight, Tensor? bias) -> ()");
  // out [M, I] <- silu(x @ gate^T) * (x @ up^T) with weight = gate | up, [2I, K], M <= 8 (CUDA only).
  m.def("gemv_silu_mul(Tensor! out, Tensor x, Tensor weight) -> ()");
  // In place RoPE on q and k, then k and v written to the paged caches at slot_mapping (CUDA only).
  m.def("rope_and_cache(Tensor positions, Tensor! q, Tensor! k, Tensor v, Tensor cos_sin_cache, "
        "Tensor! k_cache, Tensor! v_cache, Tensor slot_mapping) -> ()");
  // W8A16 decode GEMV (1..16 tokens): out <- x @ (qweight * scales)^T + bias, int8 weights with fp32
  // scales per output channel [N] or per group [N, K / group_size], fp32 accumulation.
  m.def("w8a16_gemv(Tensor! out, Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> ()");
  // out [M, I] <- silu(x @ gate^T) * (x @ up^T), the W8A16 GEMV over qweight = gate | up [2I, K] and its scales.
  m.def("w8a16_gemv_silu_mul(Tensor! out, Tensor x, Tensor qweight, Tensor scales) -> ()");
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
