"""decoding::w8a16_gemv and decoding::w8a16_gemv_silu_mul (csrc/cuda/int8_gemv.cu) against decoding.reference,
at the Llama-3-8B and Llama-3.2-1B projection shapes and odd ones, in bf16 and fp16, under every block-size
setting (DECODING_INT8_GEMV_SPLIT), and the batch invariance of a row's bits.

Tolerances. int8 * 16-bit products are exact in fp32 (8 + 11 significant bits), so kernel and reference
differ only in the order of their fp32 sums (~K * 2^-24 relative) before rounding once to the dtype. The
plain GEMV is compared with the unrounded fp32 reference: rtol = 2^-8 (bf16) / 2^-11 (fp16), the largest
relative half-ulp, plus an atol of 1e-4 of the output's scale for the summation order near zero. The
fused activation rounds gate, up, silu(gate) and the product to the dtype, as the unfused ops do, so it is
compared with the reference computed with those roundings: equal except where the summation order flips
the rounding of gate or up (one ulp), which moves the output by up to ~2 ulps, hence rtol = 4 ulps; where
silu's slope amplifies a flipped gate (gate < -2) the output is small, hence an atol of one ulp of the
output's scale. A kernel that drops a chunk, a row or a scale is off by far more (percent of the scale).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decoding import ops
from decoding.reference import w8a16_linear_ref, w8a16_linear_silu_mul_ref

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.bfloat16, torch.float16]
ULP = {torch.bfloat16: 2**-8, torch.float16: 2**-11}
# (N, K) of the plain GEMV: Llama-3-8B qkv, o, gate_up, down, Llama-3.2-1B the same, then odd sizes: K = 528
# (33 chunks of 16: not a multiple of any block size), K = 16 (one chunk: a one-warp block), an odd N.
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
          (3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192),
          (1001, 528), (37, 16), (255, 2112)]
# (I, K) of the fused gate/up: 8B, 1B, odd.
GLU_SHAPES = [(14336, 4096), (8192, 2048), (1001, 528), (13, 16), (255, 2112)]
TOKENS = [1, 2, 3, 16]  # 1-2: decode; 3: the most the GEMV serves next to Triton; 16: its largest instance


def _has_kernels() -> bool:
    return (torch.cuda.is_available() and ops.select("w8a16_linear", "cuda") == "cuda"
            and "cuda" in ops._IMPLS["w8a16_linear_silu_mul"])


needs_ext = pytest.mark.skipif(not _has_kernels(), reason="needs the CUDA extension")


def _weights(rows: int, k: int, group: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int8 weights and fp32 scales that keep outputs near unit scale for unit-scale x."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(-127, 128, (rows, k), dtype=torch.int8, device="cuda", generator=g)
    shape = (rows,) if group is None else (rows, k // group)
    s = (torch.rand(shape, device="cuda", generator=g) + 0.5) / (73 * k**0.5)
    return q, s


def _x(m: int, k: int, dtype: torch.dtype, seed: int, strided: bool = False) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(m, k + 64 * strided, device="cuda", generator=g).to(dtype)
    return x[:, :k] if strided else x  # strided: a row-strided view, as a slice of a wider buffer


def _gemv(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty(x.shape[0], q.shape[0], dtype=x.dtype, device=x.device)
    torch.ops.decoding.w8a16_gemv(out, x, q, s, b)
    return out


def _gemv_silu_mul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], q.shape[0] // 2, dtype=x.dtype, device=x.device)
    torch.ops.decoding.w8a16_gemv_silu_mul(out, x, q, s)
    return out


def _check_gemv(out: torch.Tensor, x, q, s, b=None) -> None:
    expected = w8a16_linear_ref(x.float(), q, s, None if b is None else b.float())  # fp32, unrounded
    atol = 1e-4 * expected.abs().max().item() + 1e-6
    torch.testing.assert_close(out.float(), expected, rtol=ULP[x.dtype], atol=atol)


def _check_silu_mul(out: torch.Tensor, x, q, s) -> None:
    expected = w8a16_linear_silu_mul_ref(x, q, s).float()  # with the dtype's roundings, as the unfused ops
    ulp = ULP[x.dtype]
    torch.testing.assert_close(out.float(), expected, rtol=4 * ulp, atol=ulp * expected.abs().max().item() + 1e-6)


# ----------------------------------------------------------------------------- default block sizes
@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", TOKENS)
def test_w8a16_gemv_matches_reference(shape, m, dtype):
    """Odd shapes with a bias; even M reads x through a row-strided view. Two calls give identical bits."""
    n, k = shape
    q, s = _weights(n, k, None, seed=n + k)
    x = _x(m, k, dtype, seed=n + k + m, strided=m % 2 == 0)
    b = (torch.randn(n, device="cuda") * 0.1).to(dtype) if n % 2 else None
    out = _gemv(x, q, s, b)
    _check_gemv(out, x, q, s, b)
    assert torch.equal(_gemv(x, q, s, b), out)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GLU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("m", TOKENS)
def test_w8a16_gemv_silu_mul_matches_reference(shape, m, dtype):
    inter, k = shape
    q, s = _weights(2 * inter, k, None, seed=inter + k)
    x = _x(m, k, dtype, seed=inter + k + m, strided=m % 2 == 0)
    out = _gemv_silu_mul(x, q, s)
    _check_silu_mul(out, x, q, s)
    assert torch.equal(_gemv_silu_mul(x, q, s), out)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("glu", [False, True], ids=["gemv", "silu_mul"])
@pytest.mark.parametrize("shape", [(3072, 2048), (255, 2112)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_w8a16_gemv_group_scales(shape, glu, group, dtype):
    """Group-wise scales (one per `group` input columns): each 16-weight partial is scaled by its group's."""
    n, k = shape
    rows = 2 * n if glu else n
    q, s = _weights(rows, k, group, seed=rows + k + group)
    for m in (1, 2, 3):
        x = _x(m, k, dtype, seed=m)
        if glu:
            _check_silu_mul(_gemv_silu_mul(x, q, s), x, q, s)
        else:
            b = (torch.randn(n, device="cuda") * 0.1).to(dtype)
            _check_gemv(_gemv(x, q, s, b), x, q, s, b)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("glu", [False, True], ids=["gemv", "silu_mul"])
@pytest.mark.parametrize("shape", [(3072, 2048), (2048, 2048), (8192, 2048), (2048, 8192), (6144, 4096),
                                   (1001, 528)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_w8a16_rows_do_not_depend_on_the_batch(shape, glu, dtype):
    """Each row of x gets the same bits alone (M = 1) as inside a batch of 2..16: the block size, hence the
    summation order, follows the weight's shape only. (With glu, shape is (I, K).)"""
    n, k = shape
    q, s = _weights(2 * n if glu else n, k, None, seed=n + k)
    op = _gemv_silu_mul if glu else _gemv
    x = _x(16, k, dtype, seed=k)
    alone = torch.cat([op(x[i:i + 1], q, s) for i in range(16)])
    for m in (2, 3, 4, 8, 16):
        assert torch.equal(op(x[:m], q, s), alone[:m]), f"M={m}"


@pytest.mark.gpu
@needs_ext
def test_w8a16_ops_route_to_the_fused_gemv_and_fall_back():
    """ops.w8a16_linear_silu_mul: the fused GEMV at decode sizes, silu_and_mul of the tensor-core path past
    them; Int8Linear.forward_silu_mul (the MLP's hook) goes through it for 3-D activations too."""
    from decoding.quant import Int8Linear

    q, s = _weights(2 * 1024, 2048, None, seed=5)
    for m in (1, 2, 17, 40):
        x = _x(m, 2048, torch.bfloat16, seed=m)
        _check_silu_mul(ops.w8a16_linear_silu_mul(x, q, s), x, q, s)
    layer = Int8Linear(2048, 2048, bias=False, device="cuda")
    layer.qweight.copy_(q)
    layer.scales.copy_(s)
    x = _x(2, 2048, torch.bfloat16, seed=9)
    _check_silu_mul(layer.forward_silu_mul(x.view(2, 1, 2048)).view(2, 1024), x, q, s)


@pytest.mark.gpu
@needs_ext
def test_w8a16_gemv_silu_mul_rejects_bad_inputs():
    x = torch.randn(2, 64, dtype=torch.bfloat16, device="cuda")
    q = torch.zeros(8, 64, dtype=torch.int8, device="cuda")
    s = torch.ones(8, device="cuda")
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.decoding.w8a16_gemv_silu_mul(torch.empty(2, 8, dtype=torch.bfloat16, device="cuda"), x, q, s)
    with pytest.raises(RuntimeError, match="even count"):
        torch.ops.decoding.w8a16_gemv_silu_mul(torch.empty(2, 3, dtype=torch.bfloat16, device="cuda"), x, q[:7],
                                               s[:7])
    with pytest.raises(RuntimeError, match="1..16 rows"):
        torch.ops.decoding.w8a16_gemv_silu_mul(torch.empty(17, 4, dtype=torch.bfloat16, device="cuda"),
                                               torch.randn(17, 64, dtype=torch.bfloat16, device="cuda"), q, s)


@pytest.mark.gpu
@needs_ext
def test_opcheck_w8a16_gemv_silu_mul():
    q, s = _weights(128, 256, None, seed=1)
    x = _x(3, 256, torch.bfloat16, seed=1)
    out = torch.empty(3, 64, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.decoding.w8a16_gemv_silu_mul.default, (out, x, q, s))


# ----------------------------------------------------------------------------- DECODING_INT8_GEMV_SPLIT
# Cases each setting runs (in a subprocess: the variable is read once per process): every 8B and 1B
# projection and two odd shapes, at M = 1 and 2, bf16 and fp16; (name, weight rows, K, glu).
SWITCH_CASES = [("8b.qkv", 6144, 4096, False), ("8b.o", 4096, 4096, False), ("8b.gate_up", 28672, 4096, True),
                ("8b.down", 4096, 14336, False), ("1b.qkv", 3072, 2048, False), ("1b.o", 2048, 2048, False),
                ("1b.gate_up", 16384, 2048, True), ("1b.down", 2048, 8192, False), ("odd", 1001, 528, False),
                ("odd_glu", 26, 16, True)]
SWITCH_MODES = ["default", "0", "force", "64", "128", "256", "legacy"]


def expected_threads(rows: int, k: int, mode: str) -> int:
    """The block size int8_gemv.cu's pick_threads should choose (a Python mirror of its rule)."""
    if mode == "0":
        return 32
    if mode in ("64", "128", "256"):
        return int(mode)
    chunks = k // 16
    threads = 128
    if mode == "force" or rows * k <= 8 << 20:
        threads = 64
    elif 256 <= chunks < 512:
        threads = 256
    while threads > 32 and threads // 2 >= chunks:
        threads //= 2
    return threads


def run_switch_cases(path: str) -> None:
    """Child process: every SWITCH_CASES case under this process's setting, checked against the reference;
    the outputs are saved to `path` for the parent to compare bits across settings."""
    results = {}
    for name, rows, k, glu in SWITCH_CASES:
        q, s = _weights(rows, k, None, seed=rows + k)
        for dtype in DTYPES:
            for m in (1, 2):
                x = _x(m, k, dtype, seed=k + m)
                if glu:
                    out = _gemv_silu_mul(x, q, s)
                    _check_silu_mul(out, x, q, s)
                else:
                    out = _gemv(x, q, s)
                    _check_gemv(out, x, q, s)
                results[f"{name}/{str(dtype)[6:]}/{m}"] = out.cpu()
    torch.save(results, path)


@pytest.mark.gpu
@needs_ext
def test_w8a16_gemv_split_settings(tmp_path):
    """Every setting matches the reference on every case. Bits identify the block size (it alone fixes the
    summation order): the default gives the bits of the fixed size expected_threads names for each shape,
    force those of 64 threads; and different block sizes do give different bits, so the comparison means
    something."""
    procs = {}
    for mode in SWITCH_MODES:
        env = {key: value for key, value in os.environ.items() if key != "DECODING_INT8_GEMV_SPLIT"}
        if mode != "default":
            env["DECODING_INT8_GEMV_SPLIT"] = mode
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        procs[mode] = subprocess.Popen([sys.executable, __file__, str(tmp_path / f"{mode}.pt")], cwd=ROOT, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failed = {}
    for mode, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failed[mode] = output[-3000:]
    assert not failed, failed
    runs = {mode: torch.load(tmp_path / f"{mode}.pt") for mode in SWITCH_MODES}
    for name, rows, k, _ in SWITCH_CASES:
        for mode in ("default", "force"):
            fixed = expected_threads(rows, k, mode)
            same = str(fixed) if fixed != 32 else "0"
            for key in (key for key in runs[mode] if key.startswith(name + "/")):
                assert torch.equal(runs[mode][key], runs[same][key]), f"{mode} {key}: not the bits of {fixed} threads"
    for a, b in (("64", "128"), ("128", "256"), ("0", "64")):
        assert any(not torch.equal(runs[a][key], runs[b][key]) for key in runs[a]), f"{a} and {b} threads agree"


if __name__ == "__main__":
    run_switch_cases(sys.argv[1])
