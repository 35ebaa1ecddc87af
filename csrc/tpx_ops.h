// Host-side pieces shared by the CPU and CUDA implementations of the ops:
// argument validation (errors name the argument), output allocation and the
// handling of the optional running-statistics buffers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <tuple>

#include "tpx_math.h"

namespace tpx {

using IvwResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using GaussianResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// gaussian_tpx_comoments: cov [K, K], bound [K] (float64), finite [K] (bool).
using ComomentsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Per-coordinate outputs and the double working copies of the running stats.
struct CoordinateBuffers {
  at::Tensor k;          // [G*C] float64, weight on LR (NaN: coordinate zeroed)
  at::Tensor var_lr;     // [G*C] float64, batch variance of the LR samples
  at::Tensor var_rp;     // [G*C] float64, batch variance of the RP samples
  at::Tensor nonfinite;  // [] int64, coordinates where both estimators were non-finite
  at::Tensor invalid;    // [] int32, set by the kernel when an input is invalid
  at::Tensor run_lr;     // [G*C] float64 working copy, undefined without running stats
  at::Tensor run_rp;
  double fixed_k = -1.0;  // < 0: inverse-variance weighting
  double ucb = 0.0;       // > 0 (and fixed_k < 0): weights from the variances' upper bounds
};

// Validation; `op` is the op's name, used in every message.
void check_pair(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                const at::Tensor& b);
void check_options(const char* op, const at::Tensor& like, int64_t coords,
                   const std::optional<at::Tensor>& running_var_lr,
                   const std::optional<at::Tensor>& running_var_rp, double momentum,
                   std::optional<double> fixed_weight, double ucb);
void check_gaussian(const at::Tensor& d, const at::Tensor& eps, const at::Tensor& sigma,
                    const at::Tensor& adv, const char* op = "gaussian_tpx_backward");
// gaussian_tpx_comoments' arguments: those of a Gaussian node, groups 1 or 2,
// ucb finite and >= 0. (Sigma's values are not checked here.)
void check_comoments(const at::Tensor& d, const at::Tensor& eps, const at::Tensor& sigma,
                     const at::Tensor& adv, int64_t groups, double ucb);

CoordinateBuffers make_buffers(const at::Tensor& like, int64_t coords,
                               const std::optional<at::Tensor>& running_var_lr,
                               const std::optional<at::Tensor>& running_var_rp,
                               std::optional<double> fixed_weight, double ucb);

// adv [B] as a contiguous float64 tensor (the kernels read the advantages in double).
at::Tensor advantages_as_double(const at::Tensor& adv);

// Writes the updated running statistics back into the caller's buffers.
void finish_running(CoordinateBuffers& buf, const std::optional<at::Tensor>& running_var_lr,
                    const std::optional<at::Tensor>& running_var_rp);

// Raises the sigma error if the kernel flagged an invalid input.
void raise_if_invalid_sigma(const CoordinateBuffers& buf);

// The host-side body of each op, shared by the backends. `run` is the
// backend's node runner: run(source, B, C, buffers, momentum, check_valid),
// and run.new_output(sizes, like) allocates a [B, C] output.
template <typename Runner>
IvwResult ivw_combine_impl(const Runner& run, const at::Tensor& g_lr, const at::Tensor& g_rp,
                           const std::optional<at::Tensor>& running_var_lr,
                           const std::optional<at::Tensor>& running_var_rp, double momentum,
                           std::optional<double> fixed_weight, double ucb) {
  const char* op = "ivw_combine";
  check_pair(op, "g_lr", g_lr, "g_rp", g_rp);
  const int64_t B = g_lr.size(0), C = g_lr.size(1);
  check_options(op, g_lr, C, running_var_lr, running_var_rp, momentum, fixed_weight, ucb);
  const at::Tensor lr = g_lr.contiguous(), rp = g_rp.contiguous();
  at::Tensor g = run.new_output({B, C}, lr);
  CoordinateBuffers buf = make_buffers(lr, C, running_var_lr, running_var_rp, fixed_weight, ucb);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lr.scalar_type(), "ivw_combine", [&] {
    const IvwSource<scalar_t> src{lr.data_ptr<scalar_t>(), rp.data_ptr<scalar_t>(),
                                  g.data_ptr<scalar_t>()};
    run(src, B, C, buf, momentum, /*check_valid=*/false);
  });
  finish_running(buf, running_var_lr, running_var_rp);
  return {g, buf.k, buf.var_lr, buf.var_rp, buf.nonfinite};
}

template <typename Runner>
GaussianResult gaussian_tpx_backward_impl(const Runner& run, const at::Tensor& d,
                                          const at::Tensor& eps, const at::Tensor& sigma,
                                          const at::Tensor& adv,
                                          const std::optional<at::Tensor>& running_var_lr,
                                          const std::optional<at::Tensor>& running_var_rp,
                                          double momentum, std::optional<double> fixed_weight,
                                          bool check_sigma, double ucb) {
  const char* op = "gaussian_tpx_backward";
  check_gaussian(d, eps, sigma, adv);
  const int64_t B = d.size(0), D = d.size(1);
  check_options(op, d, 2 * D, running_var_lr, running_var_rp, momentum, fixed_weight, ucb);
  const at::Tensor dc = d.contiguous(), ec = eps.contiguous(), sc = sigma.contiguous();
  const at::Tensor ac = advantages_as_double(adv);
  at::Tensor grad_mu = run.new_output({B, D}, dc);
  at::Tensor grad_sigma = run.new_output({B, D}, dc);
  CoordinateBuffers buf = make_buffers(dc, 2 * D, running_var_lr, running_var_rp, fixed_weight, ucb);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dc.scalar_type(), "gaussian_tpx_backward", [&] {
    const GaussianSource<scalar_t> src{dc.data_ptr<scalar_t>(),      ec.data_ptr<scalar_t>(),
                                       sc.data_ptr<scalar_t>(),      ac.data_ptr<double>(),
                                       grad_mu.data_ptr<scalar_t>(), grad_sigma.data_ptr<scalar_t>()};
    run(src, B, D, buf, momentum, check_sigma);
  });
  if (check_sigma) raise_if_invalid_sigma(buf);
  finish_running(buf, running_var_lr, running_var_rp);
  return {grad_mu, grad_sigma, buf.k, buf.var_lr, buf.var_rp, buf.nonfinite};
}

// The joint batch covariance of a Gaussian node's per-sample LR and RP
// gradients over its first `groups` coordinate groups (tpx_ext.reference.
// gaussian_comoments): K = 2 groups D columns. run.comoments(src, B, cov,
// bound, finite, ucb) is the backend's kernel; it writes every element of
// the three outputs.
template <typename Runner>
ComomentsResult gaussian_tpx_comoments_impl(const Runner& run, const at::Tensor& d,
                                            const at::Tensor& eps, const at::Tensor& sigma,
                                            const at::Tensor& adv, int64_t groups, double ucb) {
  check_comoments(d, eps, sigma, adv, groups, ucb);
  const int64_t B = d.size(0), D = d.size(1), K = 2 * groups * D;
  const at::Tensor dc = d.contiguous(), ec = eps.contiguous(), sc = sigma.contiguous();
  const at::Tensor ac = advantages_as_double(adv);
  const auto f64 = dc.options().dtype(at::kDouble);
  at::Tensor cov = at::empty({K, K}, f64);
  at::Tensor bound = at::empty({K}, f64);
  at::Tensor finite = at::empty({K}, dc.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dc.scalar_type(), "gaussian_tpx_comoments", [&] {
    const ComomentSource<scalar_t> src{dc.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>(),
                                       sc.data_ptr<scalar_t>(), ac.data_ptr<double>(), D, groups};
    run.comoments(src, B, cov, bound, finite, ucb);
  });
  return {cov, bound, finite};
}

}  // namespace tpx
