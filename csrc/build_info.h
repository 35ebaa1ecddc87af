// Facts about the compiled kernels that the torch dispatcher cannot carry:
// which CPU instruction set the kernels chose on this machine, how many
// threads they use, and the CUDA toolkit/runtime they were built with.
// Plain C++ (no ATen), so the Python module that binds them stays a small
// translation unit.
#pragma once

#include <string>

namespace tpx {

// "avx2+fma" where the CPU supports them (the hot loops' second copy),
// else "baseline" (x86-64 SSE2, or the compiler's default on other CPUs).
std::string cpu_kernel_isa();

// Threads the CPU kernels' at::parallel_for uses (torch.set_num_threads).
int cpu_threads();

#ifdef TPX_WITH_CUDA
// CUDART_VERSION the CUDA kernels were compiled with (e.g. 13000).
int cuda_compiled_version();
// cudaRuntimeGetVersion / cudaDriverGetVersion; 0 where there is none
// (a machine without an NVIDIA driver reports driver 0).
int cuda_runtime_version();
int cuda_driver_version();
#endif

}  // namespace tpx
