// RoPE on q and k, then k and v written into the paged KV cache: one launch instead of the rotary
// kernel plus the cache-write kernel, and k goes to the cache straight from registers.
//
// Same contract and numerics as decoding/reference.py's rotary_embedding_ref followed by
// reshape_and_cache_ref: rotate-half layout; cos and sin rounded to the dtype; each product and the sum
// rounded to the dtype, as the reference's elementwise ops round them; a negative slot skips the token.
// A block per token and group of heads; a thread per 4 pairs of rotated dims (1 where misaligned).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../norm_checks.h"
#include "pdl.h"

namespace decoding {
namespace {

template <typename T>
__device__ __forceinline__ void rotate_pair(T& a, T& b, T c, T s) {
  const T ac = static_cast<T>(static_cast<float>(a) * static_cast<float>(c));
  const T bs = static_cast<T>(-static_cast<float>(b) * static_cast<float>(s));
  const T bc = static_cast<T>(static_cast<float>(b) * static_cast<float>(c));
  const T as = static_cast<T>(static_cast<float>(a) * static_cast<float>(s));
  a = static_cast<T>(static_cast<float>(ac) + static_cast<float>(bs));
  b = static_cast<T>(static_cast<float>(bc) + static_cast<float>(as));
}

// Vectors of VEC elements moved with one load / store (VEC = 4: 8 bytes of a 16-bit dtype, 16 of float).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& x) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = x;
}

// Grid (token, group of heads_per_block heads) over the num_heads query heads then the key heads; each
// thread rotates VEC consecutive pairs (d, d + head_dim / 2) of one head. A key-head thread also copies
// its dims of that head of v. (One block of head_dim / 2 threads per (token, head) with 2-byte accesses
// ran at ~0.5 TB/s: 13 us a layer for a 256-token step of the 8B shape, benches/NOTES.md.)
template <typename T, int VEC>
__global__ void rope_and_cache_kernel(const int64_t* __restrict__ positions, T* __restrict__ q, int64_t q_st,
                                      int64_t q_sh, T* __restrict__ k, int64_t k_st, int64_t k_sh,
                                      const T* __restrict__ v, int64_t v_st, int64_t v_sh,
                                      const float* __restrict__ cos_sin, int64_t cs_stride, T* __restrict__ k_cache,
                                      T* __restrict__ v_cache, int64_t cache_slot_stride, int64_t cache_head_stride,
                                      const int64_t* __restrict__ slots, int num_heads, int total_heads, int head_dim,
                                      int heads_per_block) {
  trigger_dependents();
  grid_dependency_wait();  // q, k, v come from the kernel before (pdl.h)
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const int per_head = half / VEC;  // threads per head
  const int hh = static_cast<int>(threadIdx.x) / per_head;
  const int h = static_cast<int>(blockIdx.y) * heads_per_block + hh;
  if (hh >= heads_per_block || h >= total_heads) return;
  const int d = (static_cast<int>(threadIdx.x) % per_head) * VEC;
  const float* cs = cos_sin + positions[t] * cs_stride;
  const Pack<float, VEC> cf = load_pack<float, VEC>(cs + d), sf = load_pack<float, VEC>(cs + half + d);
  T c[VEC], s[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    c[i] = static_cast<T>(cf.v[i]);
    s[i] = static_cast<T>(sf.v[i]);
  }
  const bool is_q = h < num_heads;
  const int kh = h - num_heads;
  T* p = is_q ? q + t * q_st + h * q_sh : k + t * k_st + kh * k_sh;
  Pack<T, VEC> a = load_pack<T, VEC>(p + d), b = load_pack<T, VEC>(p + d + half);
#pragma unroll
  for (int i = 0; i < VEC; ++i) rotate_pair(a.v[i], b.v[i], c[i], s[i]);
  store_pack<T, VEC>(p + d, a);
  store_pack<T, VEC>(p + d + half, b);
  if (is_q) return;
  const int64_t slot = slots[t];
  if (slot < 0) return;  // padding: nothing goes to the cache
  T* kdst = k_cache + slot * cache_slot_stride + kh * cache_head_stride;
  store_pack<T, VEC>(kdst + d, a);
  store_pack<T, VEC>(kdst + d + half, b);
  const T* vsrc = v + t * v_st + kh * v_sh;
  T* vdst = v_cache + slot * cache_slot_stride + kh * cache_head_stride;
  store_pack<T, VEC>(vdst + d, load_pack<T, VEC>(vsrc + d));
  store_pack<T, VEC>(vdst + d + half, load_pack<T, VEC>(vsrc + d + half));
}

bool aligned_to(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

void check_qkv(const at::Tensor& t, const at::Tensor& q, const char* name, int64_t tokens, int64_t head_dim) {
  TORCH_CHECK(t.device() == q.device() && t.scalar_type() == q.scalar_type(), name,
              " must share q's device and dtype");
  TORCH_CHECK(t.dim() == 3 && t.size(0) == tokens && t.size(2) == head_dim && t.stride(2) == 1, name,
              " must be [num_tokens, heads, head_dim] with a contiguous last dim, got ", t.sizes());
}

void rope_and_cache(const at::Tensor& positions, at::Tensor& q, at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& cos_sin_cache, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "q must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [num_tokens, num_heads, head_dim], last dim contiguous");
  const int64_t tokens = q.size(0), head_dim = q.size(2);
  TORCH_CHECK(head_dim % 2 == 0, "head_dim must be even, got ", head_dim);
  check_qkv(k, q, "k", tokens, head_dim);
  check_qkv(v, q, "v", tokens, head_dim);
  TORCH_CHECK(v.size(1) == k.size(1), "k and v must have the same number of heads");
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK(c->device() == q.device() && c->scalar_type() == dtype && c->is_contiguous() && c->dim() == 4 &&
                    c->size(2) == k.size(1) && c->size(3) == head_dim,
                "k_cache and v_cache must be contiguous [num_blocks, block_size, ", k.size(1), ", ", head_dim,
                "] tensors of q's dtype");
  }
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache shapes differ");
  TORCH_CHECK(cos_sin_cache.device() == q.device() && cos_sin_cache.scalar_type() == at::kFloat &&
                  cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == head_dim && cos_sin_cache.stride(1) == 1,
              "cos_sin_cache must be float32 [max_positions, head_dim] on q's device");
  for (const at::Tensor* idx : {&positions, &slot_mapping}) {
    TORCH_CHECK(idx->device() == q.device() && idx->scalar_type() == at::kLong && idx->dim() == 1 &&
                    idx->size(0) == tokens && idx->is_contiguous(),
                "positions and slot_mapping must be contiguous int64 [num_tokens] on q's device");
  }
  if (tokens == 0) return;
  TORCH_CHECK(tokens <= INT32_MAX, "too many tokens");
  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int heads = static_cast<int>(q.size(1)), kv_heads = static_cast<int>(k.size(1));
  TORCH_CHECK(head_dim <= 2048, "head_dim over 2048 is not supported, got ", head_dim);
  const int half = static_cast<int>(head_dim / 2);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    // 4 pairs a thread where every row, head and pointer allows 4-element accesses; else one.
    const int64_t vec_bytes = 4 * static_cast<int64_t>(sizeof(T));
    bool vec4 = half % 4 == 0 && cos_sin_cache.stride(0) % 4 == 0 && aligned_to(cos_sin_cache.const_data_ptr(), 16);
    const void* ptrs[] = {q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(), k_cache.const_data_ptr(),
                          v_cache.const_data_ptr()};
    for (const void* ptr : ptrs) vec4 = vec4 && aligned_to(ptr, vec_bytes);
    const int64_t strides[] = {q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                               k_cache.stride(1), k_cache.stride(2)};
    for (int64_t stride : strides) vec4 = vec4 && stride % 4 == 0;
    const int vec = vec4 ? 4 : 1;
    const int per_head = half / vec;
    const int heads_per_block = std::max(1, 128 / per_head);
    const int threads = ((per_head * heads_per_block + 31) / 32) * 32;
    const dim3 grid(static_cast<unsigned>(tokens),
                    static_cast<unsigned>((heads + kv_heads + heads_per_block - 1) / heads_per_block));
    auto kernel = vec4 ? rope_and_cache_kernel<T, 4> : rope_and_cache_kernel<T, 1>;
    launch(kernel, grid, dim3(threads), 0, stream,
        positions.const_data_ptr<int64_t>(), q.data_ptr<T>(), q.stride(0), q.stride(1), k.data_ptr<T>(),
        k.stride(0), k.stride(1), v.const_data_ptr<T>(), v.stride(0), v.stride(1),
        cos_sin_cache.const_data_ptr<float>(), cos_sin_cache.stride(0), k_cache.data_ptr<T>(),
        v_cache.data_ptr<T>(), k_cache.stride(1), k_cache.stride(2), slot_mapping.const_data_ptr<int64_t>(), heads,
        heads + kv_heads, static_cast<int>(head_dim), heads_per_block);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(decoding, CUDA, m) { m.impl("rope_and_cache", &rope_and_cache); }

}  // namespace decoding
