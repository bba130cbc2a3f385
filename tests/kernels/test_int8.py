"""INT8 kernels against decoding.reference: W8A16 (CUDA GEMV, Triton GEMM), per-token quantization,
column abs-max, the W8A8 int8 GEMM (int32 accumulators exact) and the whole W8A8 / LLM.int8() linear.

On CPU the Triton kernels run under the interpreter at small shapes; on a GPU (marked gpu) every
backend runs at the Llama-3-8B and Llama-3.2-1B projection shapes in bf16 and fp16.

Tolerances. W8A16 and the scaled W8A8 output: kernel and reference sum the same fp32 products in a
different order (error ~ K * 2^-24 * sum|x w|, far below one output ulp), then round once to the
output dtype, so the kernel is within one ulp of the fp32 reference: rtol = 2^-8 (bf16) / 2^-11 (fp16)
plus an atol of 1e-4 of the output's scale for the summation order. The Triton interpreter truncates
fp32 -> bf16 instead of rounding (one more ulp). Integer results (quantized activations, int32
accumulators) must match exactly.
"""

import os

import pytest
import torch

from decoding import ops, reference
from decoding.quant import quantize_weight

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ULP = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-20}
# (N, K) of the projections: Llama-3-8B then Llama-3.2-1B (qkv, o, gate_up, down).
GPU_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
              (3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]


def _backends(op: str, device: str) -> list[str]:
    dev = torch.device(device).type
    return [b for b in ops._IMPLS[op] if b != "reference" and dev in ops._DEVICES.get(b, {dev})]


def _interp_triton() -> list[str]:
    if "triton" not in _backends("w8a16_linear", "cpu"):
        pytest.skip("Triton is not interpreted here")
    return ["triton"]


def _check_close(out: torch.Tensor, expected_fp32: torch.Tensor, dtype: torch.dtype, backend: str) -> None:
    rtol = ULP[dtype] * (2 if backend == "triton" and INTERPRETED and dtype == torch.bfloat16 else 1)
    atol = 1e-4 * expected_fp32.abs().max().item() + 1e-6
    torch.testing.assert_close(out.float(), expected_fp32, rtol=rtol, atol=atol)


def _w8a16_case(m, n, k, dtype, device, group_size=None, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype=dtype, device=device)
    w = torch.randn(n, k, generator=g) * 0.05
    q, s = quantize_weight(w, group_size)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype=dtype, device=device) if bias else None
    q, s = q.to(device), s.to(device)
    expected = reference.w8a16_linear_ref(x.float(), q, s, None if b is None else b.float())
    return x, q, s, b, expected


def _run(monkeypatch, op: str, backend: str, device, *args):
    monkeypatch.setenv("DECODING_BACKEND", backend)
    assert ops.select(op, device) == backend
    return getattr(ops, op)(*args)


# ----------------------------------------------------------------------------- references themselves
def test_w8a16_reference_matches_dequantized_matmul():
    x, q, s, b, _ = _w8a16_case(5, 24, 64, torch.float32, "cpu", group_size=32, bias=True)
    from decoding.quant import dequantize_weight

    expected = x.double() @ dequantize_weight(q, s).double().t() + b.double()
    torch.testing.assert_close(reference.w8a16_linear_ref(x, q, s, b).double(), expected, rtol=1e-5, atol=1e-5)


def test_int8_reference_is_exact_integer_product():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (7, 300), generator=g, dtype=torch.int8)
    b = torch.full((5, 300), 127, dtype=torch.int8)
    acc = reference.int8_scaled_mm_ref(a, None, b, None, None, torch.int32)
    assert torch.equal(acc, (a.long() @ b.long().t()).int())


# ----------------------------------------------------------------------------- CPU: interpreted Triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,group,bias", [(1, 40, 64, None, False), (33, 72, 96, None, True),
                                              (7, 48, 128, 32, True), (17, 16, 80, 16, False)])
def test_w8a16_triton_interpreted(monkeypatch, dtype, m, n, k, group, bias):
    for backend in _interp_triton():
        x, q, s, b, expected = _w8a16_case(m, n, k, dtype, "cpu", group, bias)
        out = _run(monkeypatch, "w8a16_linear", backend, x.device, x, q, s, b)
        assert out.shape == (m, n) and out.dtype == dtype
        _check_close(out, expected, dtype, backend)


@pytest.mark.parametrize("m", [1, 20])
def test_w8a16_swapped_and_dequantize_interpreted(m):
    """The prefill variant (weights as the left operand) at any M, and the one-pass dequantizer."""
    _interp_triton()
    from decoding.kernels import int8 as kernels
    from decoding.quant import dequantize_weight

    x, q, s, b, expected = _w8a16_case(m, 40, 96, torch.bfloat16, "cpu", bias=True)
    out = torch.empty(m, 40, dtype=torch.bfloat16)
    kernels._launch_w8a16_swapped(x, q, s, b, out, kernels._swapped_config(m))
    _check_close(out, expected, torch.bfloat16, "triton")
    torch.testing.assert_close(kernels.dequantize(q, s, torch.float32), dequantize_weight(q, s), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 64), (9, 200), (3, 2100)])
def test_quantize_per_token_interpreted_exact(monkeypatch, dtype, m, k):
    for backend in _interp_triton():
        g = torch.Generator().manual_seed(m)
        x = (torch.randn(m, k, generator=g) * 3).to(dtype)
        x[0, : k // 2] = 0.0
        mask = (torch.rand(k, generator=g) > 0.1).float()
        for col_mask in (None, mask):
            q, scale = _run(monkeypatch, "quantize_per_token", backend, x.device, x, col_mask)
            q_ref, scale_ref = reference.quantize_per_token_ref(x, col_mask)
            assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
        zero_q, zero_s = _run(monkeypatch, "quantize_per_token", backend, x.device, torch.zeros(2, k, dtype=dtype))
        assert not zero_q.any() and torch.equal(zero_s, torch.ones(2))


def test_column_absmax_interpreted_exact(monkeypatch):
    for backend in _interp_triton():
        x = torch.randn(37, 150, dtype=torch.bfloat16)
        out = _run(monkeypatch, "column_absmax", backend, x.device, x)
        assert torch.equal(out, reference.column_absmax_ref(x))


@pytest.mark.parametrize("m,n,k", [(1, 40, 64), (33, 72, 96), (20, 16, 300)])
def test_int8_gemm_int32_interpreted_exact(m, n, k):
    _interp_triton()
    from decoding.kernels.int8 import int8_scaled_mm

    g = torch.Generator().manual_seed(k)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    ones_m, ones_n = torch.ones(m), torch.ones(n)
    assert torch.equal(int8_scaled_mm(a, ones_m, b, ones_n, None, torch.int32),
                       reference.int8_scaled_mm_ref(a, ones_m, b, ones_n, None, torch.int32))


def _w8a8_case(m, n, k, dtype, device, outlier_cols=(3, 17), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    for c in outlier_cols:  # LLM.int8()-style feature outliers: whole columns far over the threshold
        x[:, c] *= 12.0
    w = torch.randn(n, k, generator=g) * 0.05
    q, s = quantize_weight(w)
    b = (torch.randn(n, generator=g) * 0.1).to(dtype)
    return x.to(dtype=dtype, device=device), q.to(device), s.to(device), b.to(device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,max_outliers", [(17, 48, 64, 16), (40, 80, 160, 8), (18, 32, 96, 0)])
def test_w8a8_linear_interpreted(monkeypatch, dtype, m, n, k, max_outliers):
    for backend in _interp_triton():
        x, q, s, b = _w8a8_case(m, n, k, dtype, "cpu")
        threshold = 6.0 if max_outliers else 0.0
        out = _run(monkeypatch, "w8a8_linear", backend, x.device, x, q, s, b, threshold, max_outliers)
        expected = reference.w8a8_linear_ref(x.float(), q, s, b.float(), threshold, max_outliers)
        _check_close(out, expected, dtype, backend)


# ----------------------------------------------------------------------------- LLM.int8() decomposition
def test_outlier_columns_are_the_ones_over_threshold():
    x = torch.randn(9, 64)
    x[4, 10] = 7.0  # one element is enough to make its column an outlier
    x[:, 33] = -9.0
    idx, keep = reference.outlier_columns_ref(x, 6.0, 16)
    assert idx[keep].tolist() == [10, 33] and idx.numel() == 16 and not idx[~keep].any()
    idx, keep = reference.outlier_columns_ref(x, 6.0, 1)  # capped: the largest goes to 16 bits
    assert idx[keep].tolist() == [33]
    assert reference.outlier_columns_ref(x, 0.0, 16)[0].numel() == 0  # threshold 0: decomposition off


@pytest.mark.parametrize("k,ko,case", [(64, 16, "over"), (2100, 8, "over"), (3000, 64, "over"), (200, 12, "tie"),
                                       (2100, 64, "none"), (1100, 16, "adjacent")])
def test_outlier_plan_and_gathers_interpreted(k, ko, case):
    """The fused abs-max + plan (last program) and the quantize kernel's gathers, against the reference;
    then the linear's path: the workspace left zero for the next call, the row maxima per column block,
    and the quantization that takes each row's maximum from them (bit for bit the same)."""
    _interp_triton()
    from decoding.kernels import w8a8, w8a8_prep

    g = torch.Generator().manual_seed(k)
    x = torch.randn(19, k, generator=g)
    cols = torch.randperm(k, generator=g)[:14]
    if case == "tie":  # a tie at the cut: two columns share the 13th largest maximum and both stay in int8
        x[0, cols] = torch.tensor([20.0, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 8])
    elif case == "over":  # 14 outlier columns: more than ko = 8, fewer than 16
        x[:, cols] *= 10.0
    elif case == "adjacent":  # 14 neighbours, one or two column blocks, in some rows only
        x[3:11, 500:514] *= 10.0
    idx_ref, keep_ref = reference.outlier_columns_ref(x, 6.0, ko)
    assert (case == "none") == (not keep_ref.any())
    idx, keep, col_mask = w8a8.outlier_plan(x, 6.0, ko)
    assert torch.equal(idx, idx_ref) and torch.equal(keep, keep_ref)
    if case == "tie":
        assert sorted(idx[keep].tolist()) == sorted(cols[:12].tolist())
    expected_mask = torch.ones(k).scatter_(0, idx_ref[keep_ref], 0.0)
    assert torch.equal(col_mask, expected_mask)
    amax, idx, cnt, keep8, _ = w8a8.absmax_plan(x, 6.0, ko)
    assert torch.equal(amax, reference.column_absmax_ref(x)) and cnt.item() == int(keep_ref.sum())
    w = torch.randint(-127, 128, (37, k), generator=g, dtype=torch.int8)
    q, s, x_out, w_out = w8a8.quantize(x, keep8, cnt, idx, w)
    q_ref, s_ref = reference.quantize_per_token_ref(x, expected_mask)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    live = int(cnt)
    assert torch.equal(x_out[:, :live], x[:, idx_ref[:live]]) and torch.equal(w_out[:, :live], w[:, idx_ref[:live]])
    bk = w8a8_prep.ABSMAX_BLOCK_K
    row_max_ref = torch.nn.functional.pad(x.abs(), (0, -k % bk)).view(19, -1, bk).amax(-1)
    # The second call finds the workspace the first left; the third splits the rows over 3 programs a column.
    for cfg in (None, None, dict(BLOCK_M=8, num_warps=4, PER_SM=200)):
        assert w8a8_prep.absmax_grid(19, k, x.device, cfg)[1] == (1 if cfg is None else 3)
        none, idx2, cnt2, keep2, rmax = w8a8.absmax_plan(x, 6.0, ko, reuse=True, cfg=cfg)
        assert none is None and torch.equal(idx2, idx) and torch.equal(cnt2, cnt) and torch.equal(keep2, keep8)
        assert not w8a8_prep._WORKSPACES[("cpu", None, None)].any() and torch.equal(rmax, row_max_ref)
    q2, s2, x_out2, w_out2 = w8a8.quantize(x, keep2, cnt2, idx2, w, rmax)
    assert torch.equal(q2, q_ref) and torch.equal(s2, s_ref)
    assert torch.equal(x_out2[:, :live], x_out[:, :live]) and torch.equal(w_out2[:, :live], w_out[:, :live])


def _gemm_case(m, n, k, ko, live, seed=0, dtype=torch.bfloat16, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    sa, sb = torch.rand(m, generator=g) * 1e-2, torch.rand(n, generator=g) * 1e-2
    bias = torch.randn(n, generator=g).to(dtype)
    x_out = (torch.randn(m, ko, generator=g) * 10).to(dtype)
    idx = torch.randperm(k, generator=g)[:ko]
    cnt = torch.tensor([live], dtype=torch.int32)
    x_live = x_out.clone()
    x_live[:, live:] = 0  # slots past the live count are never read: the reference sees zeros there
    expected = reference.int8_scaled_mm_ref(a, sa, b, sb, bias.float(), torch.float32, x_live.float(), idx)
    args = [t.to(device) for t in (a, sa, b, sb, bias)]
    return args, x_out.to(device), b[:, idx].contiguous().to(device), cnt.to(device), expected.to(device)


@pytest.mark.parametrize("m,n,k", [(37, 72, 80), (16, 32, 32), (50, 104, 48)])
@pytest.mark.parametrize("tma", [True, False])
def test_int8_gemm_kernels_interpreted(m, n, k, tma):
    """Both GEMM kernels (the persistent TMA one forced): int32 exact with M, N, K tails, and the scaled
    output with bias and a live outlier count below the KO slots (the rest hold garbage, never read)."""
    _interp_triton()
    from decoding.kernels import w8a8

    (a, sa, b, sb, bias), x_out, w_out, cnt, expected = _gemm_case(m, n, k, ko=24, live=19, seed=m)
    acc = torch.empty(m, n, dtype=torch.int32)
    w8a8.launch_int8_gemm(a, sa, b, sb, None, acc, tma=tma)
    assert torch.equal(acc, torch._int_mm(a, b.t()) if m > 16 else (a.long() @ b.long().t()).int())
    x_out[:, 19:] = float("nan")
    w_out[:, 19:] = 127
    for subtile in (True, False, 4):
        cfg = dict(w8a8.tma_config(m, n, k), SUBTILE=subtile) if tma else None
        out = torch.empty(m, n, dtype=torch.bfloat16)
        w8a8.launch_int8_gemm(a, sa, b, sb, bias, out, x_out, w_out, cnt, cfg=cfg, tma=tma)
        _check_close(out, expected, torch.bfloat16, "triton")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp16_part_is_exact(monkeypatch, backend):
    """With x nonzero only in outlier columns, the int8 part is exactly zero and the output is the 16-bit
    product of those columns with the dequantized weights; with x anywhere else, those columns' weights
    never enter the int8 product."""
    if backend == "triton":
        _interp_triton()
    x, q, s, _ = _w8a8_case(20, 32, 64, torch.float32, "cpu", outlier_cols=(5, 40))
    only = torch.zeros_like(x)
    only[:, [5, 40]] = x[:, [5, 40]]
    out = _run(monkeypatch, "w8a8_linear", backend, x.device, only, q, s, None, 6.0, 8)
    from decoding.quant import dequantize_weight

    fp16_part = only[:, [5, 40]].double() @ dequantize_weight(q, s)[:, [5, 40]].double().t()
    torch.testing.assert_close(out.double(), fp16_part, rtol=1e-6, atol=1e-6)
    # Changing the outlier columns' weights changes nothing of the int8 part's input: the whole
    # difference is the 16-bit part's.
    q2 = q.clone()
    q2[:, [5, 40]] = 0
    diff = (_run(monkeypatch, "w8a8_linear", backend, x.device, x, q, s, None, 6.0, 8)
            - _run(monkeypatch, "w8a8_linear", backend, x.device, x, q2, s, None, 6.0, 8))
    full_part = x[:, [5, 40]].double() @ dequantize_weight(q, s)[:, [5, 40]].double().t()
    torch.testing.assert_close(diff.double(), full_part, rtol=1e-5, atol=1e-5)


def test_decomposition_beats_plain_int8_on_outliers():
    x, q, s, _ = _w8a8_case(32, 64, 256, torch.float32, "cpu", outlier_cols=(1, 2, 3))
    exact = reference.w8a16_linear_ref(x, q, s)  # 16-bit activations, same int8 weights
    with_dec = reference.w8a8_linear_ref(x, q, s, None, 6.0, 16)
    without = reference.w8a8_linear_ref(x, q, s, None, 0.0, 16)
    err_with = (with_dec - exact).norm() / exact.norm()
    err_without = (without - exact).norm() / exact.norm()
    # Per-token int8 of a row whose scale is set by a 12-sigma outlier has a step 12x coarser.
    assert err_with < err_without / 4


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", GPU_SHAPES + [(1001, 528)])
def test_w8a16_gpu(monkeypatch, dtype, n, k):
    for m in (1, 2, 3, 5, 8, 11, 16, 17, 64):
        x, q, s, b, expected = _w8a16_case(m, n, k, dtype, "cuda", bias=m % 2 == 1, seed=m)
        for backend in _backends("w8a16_linear", "cuda"):
            out = _run(monkeypatch, "w8a16_linear", backend, x.device, x, q, s, b)
            _check_close(out, expected, dtype, backend)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w8a16_prefill_dequantized_gpu(monkeypatch, dtype):
    """Past DEQUANT_MIN_TOKENS the Triton backend dequantizes (exact int8 * fp32 scale, rounded once to
    the dtype) and calls cuBLAS: the same result as F.linear on those rounded weights."""
    from decoding.kernels import int8 as kernels
    from decoding.quant import dequantize_weight

    m = kernels.DEQUANT_MIN_TOKENS + 44
    for n, k in ((6144, 4096), (2048, 8192)):
        x, q, s, b, _ = _w8a16_case(m, n, k, dtype, "cuda", bias=True)
        w = dequantize_weight(q, s).to(dtype)
        assert torch.equal(kernels.dequantize(q, s, dtype), w)
        expected = torch.nn.functional.linear(x.float(), w.float(), b.float())
        for backend in _backends("w8a16_linear", "cuda"):
            _check_close(_run(monkeypatch, "w8a16_linear", backend, x.device, x, q, s, b), expected, dtype, backend)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 128])
def test_w8a16_grouped_and_strided_gpu(monkeypatch, dtype, group):
    for m in (1, 4, 16, 40):
        x, q, s, b, expected = _w8a16_case(m, 3072, 2048, dtype, "cuda", group, bias=True, seed=m)
        wide = torch.zeros(m, 2048 + 64, dtype=dtype, device="cuda")
        wide[:, :2048] = x
        for backend in _backends("w8a16_linear", "cuda"):
            _check_close(_run(monkeypatch, "w8a16_linear", backend, x.device, x, q, s, b), expected, dtype, backend)
            out = _run(monkeypatch, "w8a16_linear", backend, x.device, wide[:, :2048], q, s, b)
            _check_close(out, expected, dtype, backend)


@gpu
def test_gemv_every_output_written_gpu():
    if "cuda" not in _backends("w8a16_linear", "cuda"):
        pytest.skip("no CUDA GEMV in this build")
    x, q, s, _, expected = _w8a16_case(3, 1001, 528, torch.bfloat16, "cuda")
    out = torch.full((3, 1001), float("nan"), dtype=torch.bfloat16, device="cuda")
    torch.ops.decoding.w8a16_gemv(out, x, q, s, None)
    assert not out.isnan().any()
    _check_close(out, expected, torch.bfloat16, "cuda")


@gpu
def test_gemv_rejects_bad_inputs_gpu():
    if "cuda" not in _backends("w8a16_linear", "cuda"):
        pytest.skip("no CUDA GEMV in this build")
    x = torch.randn(2, 64, dtype=torch.bfloat16, device="cuda")
    q = torch.zeros(8, 64, dtype=torch.int8, device="cuda")
    s = torch.ones(8, device="cuda")
    out = torch.empty(2, 8, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="1..16 rows"):
        torch.ops.decoding.w8a16_gemv(torch.empty(17, 8, dtype=torch.bfloat16, device="cuda"),
                                      torch.randn(17, 64, dtype=torch.bfloat16, device="cuda"), q, s, None)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.decoding.w8a16_gemv(out, x[:, :40], q[:, :40], s, None)
    with pytest.raises(RuntimeError, match="int8"):
        torch.ops.decoding.w8a16_gemv(out, x, q.float(), s, None)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_and_absmax_gpu_exact(monkeypatch, dtype):
    for m, k in ((1, 4096), (2048, 4096), (37, 14336), (5, 2048)):
        x = (torch.randn(m, k, device="cuda") * 2).to(dtype)
        mask = (torch.rand(k, device="cuda") > 0.01).float()
        for backend in _backends("quantize_per_token", "cuda"):
            q, scale = _run(monkeypatch, "quantize_per_token", backend, x.device, x, mask)
            q_ref, scale_ref = reference.quantize_per_token_ref(x, mask)
            assert torch.equal(scale, scale_ref)
            assert torch.equal(q, q_ref)
            assert torch.equal(_run(monkeypatch, "column_absmax", backend, x.device, x),
                               reference.column_absmax_ref(x))


@gpu
@pytest.mark.parametrize("n,k", GPU_SHAPES)
def test_int8_gemm_int32_gpu_exact(n, k):
    if "triton" not in _backends("int8_scaled_mm", "cuda"):
        pytest.skip("no Triton")
    from decoding.kernels.int8 import int8_scaled_mm

    for m in (1, 16, 300):
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        ones_m, ones_n = torch.ones(m, device="cuda"), torch.ones(n, device="cuda")
        assert torch.equal(int8_scaled_mm(a, ones_m, b, ones_n, None, torch.int32),
                           reference.int8_scaled_mm_ref(a, ones_m, b, ones_n, None, torch.int32))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", GPU_SHAPES)
def test_w8a8_linear_gpu(monkeypatch, dtype, n, k):
    for m, max_outliers in ((2048, 64), (33, 64), (200, 0)):
        x, q, s, b = _w8a8_case(m, n, k, dtype, "cuda", outlier_cols=(7, 100, 2000), seed=m)
        threshold = 6.0 if max_outliers else 0.0
        expected = reference.w8a8_linear_ref(x.float(), q, s, b.float(), threshold, max_outliers)
        for backend in _backends("w8a8_linear", "cuda"):
            out = _run(monkeypatch, "w8a8_linear", backend, x.device, x, q, s, b, threshold, max_outliers)
            _check_close(out, expected, dtype, backend)


@gpu
@pytest.mark.parametrize("m,n,k", [(2048, 6144, 4096), (2085, 4104, 4048), (300, 28672, 4096), (1024, 4096, 14336)])
def test_int8_gemm_tma_gpu(m, n, k):
    """The persistent TMA GEMM with its table config (and every config of benches/tune_w8a8.py at one
    shape): int32 exact with tails, scaled output with bias and live outliers close to the reference."""
    from decoding.kernels import w8a8

    if not w8a8.tma_ok(torch.empty(16, 16, dtype=torch.int8, device="cuda"),
                       torch.empty(16, 16, dtype=torch.int8, device="cuda"),
                       torch.empty(16, 16, dtype=torch.bfloat16, device="cuda")):
        pytest.skip("no TMA on this GPU")
    args, x_out, w_out, cnt, expected = _gemm_case(m, n, k, ko=64, live=37, seed=m, device="cuda")
    a, sa, b, sb, bias = args
    configs = [None]
    if (m, n, k) == (2048, 6144, 4096):
        configs += [c for c in _tune_module().CONFIGS if not c["WS"]]
    exact = torch._int_mm(a, b.t())
    for cfg in configs:
        acc = torch.empty(m, n, dtype=torch.int32, device="cuda")
        w8a8.launch_int8_gemm(a, sa, b, sb, None, acc, cfg=cfg, tma=True)
        assert torch.equal(acc, exact), cfg
        out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        w8a8.launch_int8_gemm(a, sa, b, sb, bias, out, x_out, w_out, cnt, cfg=cfg, tma=True)
        _check_close(out, expected, torch.bfloat16, "triton")
    # The outlier epilogue's settings change where the output is staged and what is prefetched, not a bit of it.
    flags = (w8a8.OUTLIER_QUARTER_STORES, w8a8.PREFETCH_OUTLIERS)
    outs = []
    try:
        for setting in ((False, False), (True, False), (False, True), (True, True)):
            w8a8.OUTLIER_QUARTER_STORES, w8a8.PREFETCH_OUTLIERS = setting
            outs.append(torch.empty(m, n, dtype=torch.bfloat16, device="cuda"))
            w8a8.launch_int8_gemm(a, sa, b, sb, bias, outs[-1], x_out, w_out, cnt, tma=True)
    finally:
        w8a8.OUTLIER_QUARTER_STORES, w8a8.PREFETCH_OUTLIERS = flags
    _check_close(outs[0], expected, torch.bfloat16, "triton")
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def _tune_module():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benches"))
    import tune_w8a8

    return tune_w8a8


@gpu
@pytest.mark.parametrize("k", [4096, 14336, 2048, 8192])
def test_w8a8_prep_gpu_exact(k):
    """The abs-max + plan kernel and both quantize paths (row maxima, plain) at the model widths, bit for
    bit against the reference: no outlier column, 6, and 100 (> KO: the bisection); the kept workspace
    zero after each call; at 2048 tokens with 6 columns, every config that tune_w8a8.py --part prep sweeps."""
    from decoding.kernels import w8a8, w8a8_prep

    tune = _tune_module()
    for m in (2048, 37):
        for n_cols in (0, 6, 100):
            g = torch.Generator(device="cuda").manual_seed(m + k + n_cols)
            x = torch.randn(m, k, device="cuda", generator=g)
            cols = torch.randperm(k, device="cuda", generator=g)[:n_cols]
            x[:, cols] *= 10 + 10 * torch.rand(n_cols, device="cuda", generator=g)
            x = x.to(torch.bfloat16)
            idx_ref, keep_ref = reference.outlier_columns_ref(x, 6.0, 64)
            mask = torch.ones(k, device="cuda").scatter_(0, idx_ref[keep_ref], 0.0)
            q_ref, s_ref = reference.quantize_per_token_ref(x, mask)
            q_plain, s_plain = reference.quantize_per_token_ref(x)
            w = torch.randint(-127, 128, (300, k), dtype=torch.int8, device="cuda")
            live = int(keep_ref.sum())
            sweep = m == 2048 and n_cols == 6
            for acfg in tune.ABSMAX_CONFIGS if sweep else [None]:
                _, idx, cnt, keep, rmax = w8a8_prep.absmax_plan(x, 6.0, 64, reuse=True, cfg=acfg)
                assert torch.equal(idx, idx_ref) and cnt.item() == live, acfg
                ws = w8a8_prep._WORKSPACES[("cuda", x.device.index, torch.cuda.current_stream().cuda_stream)]
                assert not ws.any()
                for qcfg in [None] + (tune.QUANT_CONFIGS.get(k, []) if sweep else []):
                    q, s, x_out, w_out = w8a8.quantize(x, keep, cnt, idx, w, rmax, cfg=qcfg)
                    assert torch.equal(q, q_ref) and torch.equal(s, s_ref), (acfg, qcfg)
                    assert torch.equal(x_out[:, :live], x[:, idx_ref[:live]])
                    assert torch.equal(w_out[:, :live], w[:, idx_ref[:live]])
                    q, s, _, _ = w8a8.quantize(x, cfg=qcfg)
                    assert torch.equal(q, q_plain) and torch.equal(s, s_plain), qcfg


@gpu
def test_w8a8_linear_in_cuda_graph_gpu():
    """Captured in a CUDA graph (the abs-max workspace made during the capture, its memset captured),
    every replay gives the eager output bit for bit, and eager calls afterwards still do."""
    x, q, s, b = _w8a8_case(2048, 4096, 4096, torch.bfloat16, "cuda", outlier_cols=(7, 100, 2000), seed=5)
    from decoding.kernels import w8a8

    expected = w8a8.w8a8_linear(x, q, s, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w8a8.w8a8_linear(x, q, s, b)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
    assert torch.equal(w8a8.w8a8_linear(x, q, s, b), expected)


@gpu
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_w8a8_linear_keeps_nothing_gpu(threshold):
    """Eager W8A8 calls leave no tensor behind: nothing lands in torch's Triton side table (where
    wrap_triton's higher-order op kept each launch's tensor descriptors, and so the activations and
    output of every call), and the allocated memory is back where it was after the call."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    from decoding.kernels import w8a8

    x, q, s, b = _w8a8_case(2048, 4096, 4096, torch.bfloat16, "cuda", outlier_cols=(7, 100), seed=2)
    w8a8.w8a8_linear(x, q, s, b, threshold)  # the abs-max workspace is made once, on the first call
    torch.cuda.synchronize()
    entries, before = len(kernel_side_table.constant_args), torch.cuda.memory_allocated()
    for _ in range(3):
        w8a8.w8a8_linear(x, q, s, b, threshold)
    torch.cuda.synchronize()
    assert len(kernel_side_table.constant_args) == entries
    assert torch.cuda.memory_allocated() == before


@gpu
@pytest.mark.parametrize("case", ["none_over", "many_over", "unaligned_k"])
def test_w8a8_linear_prefill_cases_gpu(monkeypatch, case):
    """At 2048 tokens (TMA GEMM): no column over the threshold (count 0: the gathers and the epilogue's
    16-bit part are skipped), more outlier columns than KO (the bisection), and K % 16 != 0 (the pointer GEMM)."""
    n, k = 4096, 4096 if case != "unaligned_k" else 4100
    cols = {"none_over": (), "many_over": tuple(range(5, 4000, 50)), "unaligned_k": (7, 100, 2000)}[case]
    x, q, s, b = _w8a8_case(2048, n, k, torch.bfloat16, "cuda", outlier_cols=cols, seed=3)
    if case == "none_over":
        x = x.clamp(-5.9, 5.9)
    expected = reference.w8a8_linear_ref(x.float(), q, s, b.float(), 6.0, 64)
    for backend in _backends("w8a8_linear", "cuda"):
        out = _run(monkeypatch, "w8a8_linear", backend, x.device, x, q, s, b, 6.0, 64)
        _check_close(out, expected, torch.bfloat16, backend)


# ----------------------------------------------------------------------------- opcheck
def test_opcheck_triton_int8():
    """Schema, fake kernels, no mutation or aliasing lies, for every Triton int8 op (AOT dispatch on the
    GPU only: under the interpreter wrap_triton would run the kernel on fake tensors)."""
    if "triton" not in ops._IMPLS["w8a16_linear"]:
        pytest.skip(f"triton unavailable: {ops.describe()['triton']['error']}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if INTERPRETED:
        tests = tests[:-1]
    x, q, s, b, _ = _w8a16_case(5, 32, 64, torch.float32, device, bias=True)
    xq, xs = reference.quantize_per_token_ref(x)
    col_mask = torch.ones(64, device=device)
    idx = torch.tensor([3, 9], device=device)
    cases = [
        (torch.ops.decoding.w8a16_linear_triton.default, (x, q, s, b)),
        (torch.ops.decoding.quantize_per_token_triton.default, (x, col_mask)),
        (torch.ops.decoding.column_absmax_triton.default, (x,)),
        (torch.ops.decoding.int8_scaled_mm_triton.default, (xq, xs, q, s, b, torch.float32, x[:, :2].contiguous(), idx)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=tests)


@gpu
def test_opcheck_gemv_gpu():
    if "cuda" not in _backends("w8a16_linear", "cuda"):
        pytest.skip("no CUDA GEMV in this build")
    x, q, s, b, _ = _w8a16_case(3, 64, 128, torch.bfloat16, "cuda", bias=True)
    out = torch.empty(3, 64, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.decoding.w8a16_gemv.default, (out, x, q, s, b))
