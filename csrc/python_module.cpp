// tpx_ext._C: the Python module of the extension.
//
// The ops themselves are torch dispatcher ops (TORCH_LIBRARY in tpx_ops.cpp):
// that is what torch.compile, torch.library.opcheck, autograd and C++ callers
// use, so they are not bound here. Importing this module loads the shared
// library and so registers them. What pybind11 binds is what the dispatcher
// cannot carry: the build and run-time facts of the extension, as a typed
// object. This file includes no torch headers, so it compiles in seconds.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <torch/version.h>

#include "build_info.h"

namespace py = pybind11;

#define TPX_STR_(...) #__VA_ARGS__
#define TPX_STR(...) TPX_STR_(__VA_ARGS__)

namespace {

std::string version_string(int v) {  // CUDA encodes 13.0 as 13000
  if (v <= 0) return "";
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

struct BuildInfo {
  std::string torch_version = TORCH_VERSION;
  bool cuda_compiled = false;
  std::vector<std::string> cuda_archs;
  std::optional<std::string> cuda_compiled_version;
  std::optional<std::string> cuda_runtime_version;
  std::optional<std::string> cuda_driver_version;
  std::string cpu_kernel_isa = tpx::cpu_kernel_isa();
  int cpu_threads = tpx::cpu_threads();
#if defined(__clang__)
  std::string compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  std::string compiler = "gcc " __VERSION__;
#else
  std::string compiler = "unknown";
#endif

  BuildInfo() {
#ifdef TPX_WITH_CUDA
    cuda_compiled = true;
#ifdef TPX_CUDA_ARCHS
    cuda_archs = split_commas(TPX_STR(TPX_CUDA_ARCHS));
#endif
    cuda_compiled_version = version_string(tpx::cuda_compiled_version());
    const std::string runtime = version_string(tpx::cuda_runtime_version());
    const std::string driver = version_string(tpx::cuda_driver_version());
    if (!runtime.empty()) cuda_runtime_version = runtime;
    if (!driver.empty()) cuda_driver_version = driver;
#endif
  }

  std::string repr() const {
    std::ostringstream s;
    auto opt = [](const std::optional<std::string>& v) { return v ? "'" + *v + "'" : "None"; };
    s << "BuildInfo(torch_version='" << torch_version
      << "', cuda_compiled=" << (cuda_compiled ? "True" : "False") << ", cuda_archs=[";
    for (size_t i = 0; i < cuda_archs.size(); ++i) s << (i ? ", " : "") << "'" << cuda_archs[i] << "'";
    s << "], cuda_compiled_version=" << opt(cuda_compiled_version)
      << ", cuda_runtime_version=" << opt(cuda_runtime_version)
      << ", cuda_driver_version=" << opt(cuda_driver_version) << ", cpu_kernel_isa='"
      << cpu_kernel_isa << "', cpu_threads=" << cpu_threads << ", compiler='" << compiler << "')";
    return s.str();
  }
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "The compiled part of tpx_ext. Importing it registers the ops torch.ops.tpx_ext.* "
      "(dispatcher ops, CPU and CUDA kernels); build_info() describes the build.";

  py::class_<BuildInfo>(m, "BuildInfo",
                        "How the extension was built and what its kernels use on this machine "
                        "(a snapshot taken when build_info() is called).")
      .def_readonly("torch_version", &BuildInfo::torch_version,
                    "The torch version the extension was compiled against (major.minor.patch).")
      .def_readonly("cuda_compiled", &BuildInfo::cuda_compiled,
                    "True when the CUDA kernels were compiled in.")
      .def_readonly("cuda_archs", &BuildInfo::cuda_archs,
                    "GPU architectures the CUDA kernels were compiled for, as nvcc names them "
                    "(sm_80, sm_90, compute_90 for PTX); empty without CUDA kernels.")
      .def_readonly("cuda_compiled_version", &BuildInfo::cuda_compiled_version,
                    "The CUDA toolkit version the kernels were compiled with, e.g. '13.0'; "
                    "None without CUDA kernels.")
      .def_readonly("cuda_runtime_version", &BuildInfo::cuda_runtime_version,
                    "The version of the CUDA runtime library loaded now; None without CUDA "
                    "kernels.")
      .def_readonly("cuda_driver_version", &BuildInfo::cuda_driver_version,
                    "The newest CUDA version the installed NVIDIA driver supports; None "
                    "without CUDA kernels or without a driver.")
      .def_readonly("cpu_kernel_isa", &BuildInfo::cpu_kernel_isa,
                    "The CPU kernels' instruction set chosen at run time for this CPU: "
                    "'avx2+fma' or 'baseline'.")
      .def_readonly("cpu_threads", &BuildInfo::cpu_threads,
                    "Threads the CPU kernels use (OpenMP through torch; torch.set_num_threads "
                    "changes it).")
      .def_readonly("compiler", &BuildInfo::compiler,
                    "The C++ compiler version that built the host code.")
      .def("__repr__", &BuildInfo::repr);

  m.def("build_info", [] { return BuildInfo(); },
        "The extension's build and run-time facts as a BuildInfo.");
}
