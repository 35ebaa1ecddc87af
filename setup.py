"""Builds tpx_ext._C: the fused TPX kernels (CPU always, CUDA when possible).

Install with `pip install --no-build-isolation .` (torch must already be
installed: the extension is compiled against it).

Switches (environment variables):
  TPX_FORCE_CUDA=1   build the CUDA kernels or fail (CI uses this)
  TPX_FORCE_CPU=1    skip the CUDA kernels even if nvcc is there
  TORCH_CUDA_ARCH_LIST  GPU architectures; default "8.0;9.0" when no GPU is visible
  MAX_JOBS           parallel compile jobs (ninja)
  TPX_SKIP_EXTENSION=1  install the Python package only (make setup then builds in place)
"""

import importlib.util
import os
import re
import shutil

from setuptools import find_packages, setup


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _pin_cuda_home():
    # Torch derives CUDA_HOME from `which nvcc`. Where nvcc is a wrapper script
    # in /usr/local/bin that guess is /usr/local, which is wrong; prefer the
    # real toolkit. Must run before torch.utils.cpp_extension is imported.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for root in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = root
            return


def _nvidia_wheel_includes():
    # Torch's CUDA headers include cuBLAS/cuSPARSE headers, which a bare
    # toolkit may lack; torch's own nvidia-* wheels ship them.
    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for loc in (spec.submodule_search_locations or []) if spec else []:
        for sub in sorted(os.listdir(loc)):
            inc = os.path.join(loc, sub, "include")
            if os.path.exists(os.path.join(inc, "cublas_v2.h")) or os.path.exists(
                os.path.join(inc, "cusparse.h")
            ):
                dirs.append(inc)
    return dirs


_pin_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _want_cuda():
    if _flag("TPX_FORCE_CPU"):
        return False
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if _flag("TPX_FORCE_CUDA") and not have:
        raise RuntimeError(
            "TPX_FORCE_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch {torch.__version__} is {'a CPU build' if torch.version.cuda is None else 'a CUDA build'}, "
            f"CUDA_HOME={CUDA_HOME!r}. Install a CUDA build of torch (pip install torch==2.14.1) "
            "and the CUDA toolkit (nvcc), or set CUDA_HOME."
        )
    return have


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, "csrc")
    # -fopenmp: at::parallel_for is a header template, parallel only when the
    # including code is compiled with OpenMP (it then uses torch's libgomp).
    # -fno-trapping-math: no FP exceptions are used; lets GCC if-convert the
    # selects in the hot loops so they vectorise.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    # python_module.cpp is the pybind11 module (build facts only; the ops are
    # dispatcher ops, defined in tpx_ops.cpp and registered by the backends'
    # sources when the library loads).
    sources = ["csrc/tpx_ops.cpp", "csrc/cpu/tpx_cpu.cpp", "csrc/python_module.cpp"]
    includes = _pybind11_includes() + [csrc]
    if not _want_cuda():
        return CppExtension(
            "tpx_ext._C", sources, include_dirs=includes, extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # With no GPU to detect, torch's build crashes without an arch list.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    archs = ",".join(_cuda_arch_names())
    nvcc = ["-O3", "-lineinfo"]
    return CUDAExtension(
        "tpx_ext._C",
        sources + ["csrc/cuda/tpx_cuda.cu"],
        include_dirs=includes + _nvidia_wheel_includes(),
        define_macros=[("TPX_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx + ["-DTPX_WITH_CUDA", f"-DTPX_CUDA_ARCHS={archs}"],
                            "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


def _pybind11_includes():
    # pybind11 is a build requirement; torch also ships a copy of its headers,
    # which the compiler finds when this one is not installed.
    try:
        import pybind11
    except ImportError:
        return []
    return [pybind11.get_include()]


def _cuda_arch_names():
    """The architectures nvcc will compile for ("sm_80", "compute_90" for PTX), as torch's
    build derives them from TORCH_CUDA_ARCH_LIST, for tpx_ext.build_info()."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    names = []
    for flag in _get_cuda_arch_flags():
        for name in re.findall(r"(?<![a-z])code=\[?([a-z0-9_,]+)\]?", flag):
            names += [n for n in name.split(",") if n not in names]
    return names


if shutil.which("ninja") is None:
    print("tpx_ext: ninja not found; the build will be slow (pip install ninja)")

class InPlaceSafeBuild(BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)):
    """An in-place build (make setup) replaces tpx_ext/_C*.so by renaming a new file over it:
    copying into the old file would rewrite pages that running processes (a training run)
    have mapped, and crash them."""

    def copy_file(self, infile, outfile, *args, **kwargs):
        if not outfile.endswith(".so") or os.path.isdir(outfile):
            return super().copy_file(infile, outfile, *args, **kwargs)
        tmp = f"{outfile}.tmp{os.getpid()}"
        shutil.copy2(infile, tmp)
        os.replace(tmp, outfile)
        return outfile, True


# `make setup` installs the package with TPX_SKIP_EXTENSION=1 and then builds the extension
# in place (`setup.py build_ext --inplace`: ninja in build/), so that it is compiled once and
# later builds recompile only the sources that changed; pip's own build directory is
# temporary.
setup(
    packages=find_packages(include=["tpx_ext", "tpx_ext.*"]),
    ext_modules=[] if _flag("TPX_SKIP_EXTENSION") else [_extension()],
    cmdclass={"build_ext": InPlaceSafeBuild},
)
