// The CUDA backend of the ops: the runner that launches the kernels of
// tpx_cuda_kernels.cuh on the current stream with ATen's buffers, and the
// dispatcher registration for CUDA tensors. The kernels and their tiling
// are in the header, which has no ATen or CUDA-runtime dependency, so that
// the emulation test runs the same code on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "build_info.h"
#include "tpx_cuda_kernels.cuh"
#include "tpx_cuda_comoments.cuh"
#include "tpx_cuda_node_args.h"
#include "tpx_math.h"
#include "tpx_ops.h"

namespace tpx {
namespace {

// launch_node's launch helper: one kernel on the stream, checked.
struct StreamLaunch {
  cudaStream_t stream;

  template <typename... Params>
  void operator()(void (*kernel)(Params...), Grid grid, std::type_identity_t<Params>... args) const {
    kernel<<<dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y)), kThreads, 0,
             stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

struct CudaRunner {
  at::Tensor new_output(at::IntArrayRef sizes, const at::Tensor& like) const {
    return at::empty(sizes, like.options());  // the caching allocator's
  }

  template <typename Source>
  void operator()(const Source& src, int64_t B, int64_t C, CoordinateBuffers& buf,
                  double momentum, bool check_valid) const {
    const c10::cuda::CUDAGuard guard(buf.k.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

    const NodeArgs args = node_args(buf, momentum, check_valid);
    const NodePlan plan = node_plan(B, C, Source::G, sms, args);
    const at::Tensor ws = at::empty({plan.workspace_size()}, buf.k.options());
    launch_node(StreamLaunch{stream}, src, B, C, plan, ws.data_ptr<double>(), args);
  }

  template <typename T>
  void comoments(const ComomentSource<T>& src, int64_t B, at::Tensor& cov, at::Tensor& bound,
                 at::Tensor& finite, double ucb) const {
    const c10::cuda::CUDAGuard guard(cov.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const ComomentPlan plan = plan_comoments(B, src.columns(), sms, ucb > 0.0);
    const at::Tensor ws = at::empty({plan.workspace_size()}, cov.options());
    const ComomentArgs out{cov.data_ptr<double>(), bound.data_ptr<double>(), finite.data_ptr<bool>(), ucb};
    launch_comoments(StreamLaunch{stream}, src, B, plan, ws.data_ptr<double>(), out);
  }
};

IvwResult ivw_combine_cuda(const at::Tensor& g_lr, const at::Tensor& g_rp,
                           const std::optional<at::Tensor>& running_var_lr,
                           const std::optional<at::Tensor>& running_var_rp, double momentum,
                           std::optional<double> fixed_weight, double ucb) {
  return ivw_combine_impl(CudaRunner{}, g_lr, g_rp, running_var_lr, running_var_rp, momentum,
                          fixed_weight, ucb);
}

GaussianResult gaussian_tpx_backward_cuda(const at::Tensor& d, const at::Tensor& eps,
                                          const at::Tensor& sigma, const at::Tensor& adv,
                                          const std::optional<at::Tensor>& running_var_lr,
                                          const std::optional<at::Tensor>& running_var_rp,
                                          double momentum, std::optional<double> fixed_weight,
                                          bool check_sigma, double ucb) {
  return gaussian_tpx_backward_impl(CudaRunner{}, d, eps, sigma, adv, running_var_lr,
                                    running_var_rp, momentum, fixed_weight, check_sigma, ucb);
}

ComomentsResult gaussian_tpx_comoments_cuda(const at::Tensor& d, const at::Tensor& eps,
                                            const at::Tensor& sigma, const at::Tensor& adv,
                                            int64_t groups, double ucb) {
  return gaussian_tpx_comoments_impl(CudaRunner{}, d, eps, sigma, adv, groups, ucb);
}

}  // namespace

int cuda_compiled_version() { return CUDART_VERSION; }

int cuda_runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int cuda_driver_version() {
  int v = 0;  // 0 when no driver is installed
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

TORCH_LIBRARY_IMPL(tpx_ext, CUDA, m) {
  m.impl("ivw_combine", &ivw_combine_cuda);
  m.impl("gaussian_tpx_backward", &gaussian_tpx_backward_cuda);
  m.impl("gaussian_tpx_comoments", &gaussian_tpx_comoments_cuda);
}

}  // namespace tpx
