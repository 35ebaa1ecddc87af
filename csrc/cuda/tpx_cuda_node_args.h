// The kernels' view of a node's buffers: NodeArgs (tpx_cuda_kernels.cuh)
// from the host driver's CoordinateBuffers (tpx_ops.h). Shared by the CUDA
// runner (tpx_cuda.cu) and the emulated ops test
// (tests/test_cuda_emulated_ops.cpp), so that the test runs the runner's
// own wiring of outputs, counters and options to the kernels. Include it
// after the kernels header (and, in the test, after the emulation shim).
#pragma once

#include <ATen/ATen.h>

#include "tpx_ops.h"

namespace tpx {

inline NodeArgs node_args(const CoordinateBuffers& buf, double momentum, bool check_valid) {
  const bool has_running = buf.run_lr.defined();
  return NodeArgs{buf.k.data_ptr<double>(),
                  buf.var_lr.data_ptr<double>(),
                  buf.var_rp.data_ptr<double>(),
                  reinterpret_cast<unsigned long long*>(buf.nonfinite.data_ptr<int64_t>()),
                  check_valid ? buf.invalid.data_ptr<int>() : nullptr,
                  has_running ? buf.run_lr.data_ptr<double>() : nullptr,
                  has_running ? buf.run_rp.data_ptr<double>() : nullptr,
                  momentum,
                  buf.fixed_k,
                  buf.ucb};
}

// The node's plan on a device with `sms` multiprocessors.
inline NodePlan node_plan(int64_t B, int64_t C, int G, int64_t sms, const NodeArgs& args) {
  return plan_node(B, C, G, sms, needs_fourth(args));
}

}  // namespace tpx
