"""Builds decoding._C and installs kernels/ as decoding.kernels (metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .      # or: pip wheel --no-build-isolation --no-deps .

The extension compiles against the torch already installed, hence --no-build-isolation. It is a
CUDAExtension (csrc/ops.cpp + csrc/cpu/*.cpp + csrc/cuda/*.cu) when that torch has CUDA and nvcc is
found, else a CppExtension without the .cu files. DECODING_SKIP_CUDA_BUILD=1 forces the CPU build.
CUDA arches come from TORCH_CUDA_ARCH_LIST (read by torch's BuildExtension), e.g. "9.0".
"""

import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools rejects absolute source paths in wheels built from an sdist.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, pattern)))


def _with_cuda() -> bool:
    if os.environ.get("DECODING_SKIP_CUDA_BUILD") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    # No -std flag: torch's cpp_extension adds the standard torch itself was built with (C++17 up to
    # early 2026, C++20 since). Forcing C++17 against torch 2.11's headers built an extension that
    # segfaulted when it formatted an error message (seen on the H100 node); torch >= 2.13 refuses C++17.
    cxx = ["-O3"]
    link = []
    if sys.platform == "linux":
        # at::parallel_for only runs rows in parallel when compiled with OpenMP; this links the same
        # libgomp.so.1 soname that libtorch_cpu already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sources = _sources("ops.cpp") + _sources("cpu/*.cpp")
    kwargs = {
        "name": "decoding._C",
        "include_dirs": [CSRC],  # absolute: ninja compiles from the build dir
        "extra_compile_args": {"cxx": cxx},
        "extra_link_args": link,
    }
    if not _with_cuda():
        return cpp_extension.CppExtension(sources=sources, **kwargs)
    nvcc_threads = os.environ.get("NVCC_THREADS", "4")
    kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--threads", nvcc_threads, "-lineinfo"]
    return cpp_extension.CUDAExtension(sources=sources + _sources("cuda/*.cu"), **kwargs)


setup(
    packages=find_packages(include=["decoding", "decoding.*"]) + ["decoding.kernels"],
    package_dir={"decoding.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
