"""tpx_ext.build_info(): the pybind11 module's description of the build, checked against
what torch, the dispatcher and the CPU report independently."""

import os
import re
import subprocess
import sys

import pytest
import torch

import tpx_ext
from tpx_ext import _C

VERSION = re.compile(r"^\d+\.\d+$")


def test_build_info_is_a_typed_snapshot():
    info = tpx_ext.build_info()
    assert isinstance(info, _C.BuildInfo)
    assert repr(info).startswith("BuildInfo(torch_version=")
    with pytest.raises(AttributeError):
        info.cuda_compiled = not info.cuda_compiled  # read-only
    for name in ("torch_version", "cuda_compiled", "cuda_archs", "cuda_compiled_version",
                 "cuda_runtime_version", "cuda_driver_version", "cpu_kernel_isa", "cpu_threads",
                 "compiler"):
        assert getattr(_C.BuildInfo, name).__doc__, f"{name} has no docstring"
    assert _C.build_info.__doc__ and _C.__doc__


def test_compiled_against_the_running_torch():
    assert tpx_ext.build_info().torch_version == torch.__version__.split("+")[0]


def test_cuda_facts_match_the_dispatcher_and_torch():
    info = tpx_ext.build_info()
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "tpx_ext::gaussian_tpx_backward", "CUDA")
    assert info.cuda_compiled == has_cuda_kernel == tpx_ext.cuda_compiled()
    if not info.cuda_compiled:
        assert info.cuda_archs == [] and info.cuda_compiled_version is None
        assert info.cuda_runtime_version is None and info.cuda_driver_version is None
        return
    # The extension compiles only against a CUDA build of torch of the same CUDA major.
    assert VERSION.match(info.cuda_compiled_version)
    assert info.cuda_compiled_version.split(".")[0] == torch.version.cuda.split(".")[0]
    assert info.cuda_archs and all(re.fullmatch(r"(sm|compute)_\d+[af]?", a) for a in info.cuda_archs)
    assert VERSION.match(info.cuda_runtime_version)
    if torch.cuda.is_available():
        assert VERSION.match(info.cuda_driver_version)
        major, minor = torch.cuda.get_device_capability()
        assert any(a.endswith(f"_{major}{minor}") or a.startswith("compute_") for a in info.cuda_archs), \
            "the extension was not compiled for this GPU"


def test_cpu_kernel_isa_matches_the_cpu():
    isa = tpx_ext.build_info().cpu_kernel_isa
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if sys.platform == "linux" and os.uname().machine == "x86_64":
        assert isa == ("avx2+fma" if {"avx2", "fma"} <= flags else "baseline")
    else:
        assert isa == "baseline"


def test_cpu_threads_follow_torch():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert tpx_ext.build_info().cpu_threads == 1
        torch.set_num_threads(2)
        assert tpx_ext.build_info().cpu_threads == 2
    finally:
        torch.set_num_threads(before)


def test_python_m_tpx_ext_prints_the_build_facts():
    out = subprocess.run([sys.executable, "-m", "tpx_ext"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    info = tpx_ext.build_info()
    assert f"compiled against torch {info.torch_version}" in out.stdout
    assert f"CPU kernels: {info.cpu_kernel_isa}" in out.stdout
    if info.cuda_compiled:
        assert f"compiled with CUDA {info.cuda_compiled_version} for {', '.join(info.cuda_archs)}" in out.stdout
    else:
        assert "CUDA kernels: not compiled" in out.stdout
    assert "all checks passed" in out.stdout
