"""Compile-check csrc/cuda/*.cu with nvcc against the installed torch's headers, without a GPU.

A CPU wheel of torch ships the c10/cuda headers but not the CMake-generated cuda_cmake_macros.h, so a
stub goes first on the include path. Catches C++/CUDA errors before the GPU machine builds for real
(~30 s a file on 2 cores, all files in parallel). Deselect with `-m "not nvcc"`.
"""

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

pytestmark = [
    pytest.mark.nvcc,
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH"),
]

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CU_FILES = sorted(CSRC.glob("cuda/*.cu"))


def _cxx_std() -> str:
    # As setup.py: torch >= 2.13 builds extensions as C++20.
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 13) else "-std=c++17"


def _arch_flags() -> list[str]:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").replace(";", " ").split()
    flags = []
    for arch in archs:
        num = arch.split("+")[0].replace(".", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return flags


def _nvcc(cu: Path, stub_dir: Path, out_dir: Path, defines: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    includes = [stub_dir, CSRC, *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    cmd = [
        "nvcc",
        "-c",
        str(cu),
        "-o",
        str(out_dir / (cu.stem + "".join(d.lower() for d in defines) + ".o")),
        *(f"-D{d}" for d in defines),
        "-O3",
        _cxx_std(),
        "--threads",
        "2",
        "-Xcompiler",
        "-fPIC",
        *cpp_extension.COMMON_NVCC_FLAGS,
        *_arch_flags(),
        *(f"-I{p}" for p in includes),
    ]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)


# Extra builds of one file: the stand-alone GEMV tuning build (benches/tune_int8.py) of int8_gemv.cu.
VARIANTS = [(CSRC / "cuda/int8_gemv.cu", ("DECODING_GEMV_TUNE",))]


@pytest.mark.skipif(not CU_FILES, reason="no .cu files")
def test_cuda_sources_compile(tmp_path):
    stub = tmp_path / "stub"
    macros = Path(cpp_extension.include_paths()[0]) / "c10/cuda/impl/cuda_cmake_macros.h"
    if not macros.exists():
        (stub / "c10/cuda/impl").mkdir(parents=True)
        (stub / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    jobs = [(cu, ()) for cu in CU_FILES] + [v for v in VARIANTS if v[0].exists()]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: _nvcc(job[0], stub, tmp_path, job[1]), jobs))
    failures = [f"{cu.name} {defines}:\n{r.stderr[-4000:]}" for (cu, defines), r in zip(jobs, results)
                if r.returncode != 0]
    assert not failures, "\n\n".join(failures)
