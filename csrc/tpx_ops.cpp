// The ops: their schemas (TORCH_LIBRARY) and the host-side pieces both
// backends share: argument validation (errors name the argument), output
// and statistics buffers, the running statistics' write-back. The host
// driver of each op (ivw_combine_impl, gaussian_tpx_backward_impl) is a
// template in tpx_ops.h over the backend's runner; the runners and their
// kernels are in cpu/ and cuda/, the math they share in tpx_math.h.
//
// Each op is two passes over the batch: (1) per-coordinate moments of the
// per-sample LR and RP gradients, then per-coordinate weights; (2) the
// combined gradient. With ucb > 0 a pass 1b between them sums the
// standardised 4th powers of the deviations (tpx_math.h, variance_bound).
// The per-sample gradients are formed in registers in every pass and never
// stored. gaussian_tpx_comoments (gaussian_tpx_comoments_impl) is one pass
// (co-moments of all K = 2 groups D columns, Chan-merged), plus pass 1b
// where ucb > 0; it returns statistics only.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "tpx_ops.h"

namespace tpx {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_running(const char* op, const char* name, const at::Tensor& run, const at::Tensor& like,
                   int64_t coords) {
  TORCH_CHECK_VALUE(run.dim() == 1 && run.numel() == coords, op, ": ", name,
                    " must be a 1-D tensor of ", coords, " elements (one per coordinate), got shape ",
                    run.sizes());
  TORCH_CHECK_TYPE(run.scalar_type() == at::kFloat || run.scalar_type() == at::kDouble, op, ": ",
                   name, " must be float32 or float64, got ", run.scalar_type());
  TORCH_CHECK_VALUE(run.device() == like.device(), op, ": ", name, " is on ", run.device(),
                    " but the gradients are on ", like.device());
}

}  // namespace

void check_pair(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.dim() == 2, op, ": ", name_a, " must be a 2-D tensor [B, C], got shape ",
                    a.sizes());
  TORCH_CHECK_VALUE(a.size(0) >= 1 && a.size(1) >= 1, op, ": ", name_a,
                    " must have B >= 1 rows and C >= 1 columns, got shape ", a.sizes());
  TORCH_CHECK_VALUE(b.sizes() == a.sizes(), op, ": ", name_b, " must have the shape of ", name_a,
                    " ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK_VALUE(b.device() == a.device(), op, ": ", name_b, " is on ", b.device(), " but ",
                    name_a, " is on ", a.device());
  TORCH_CHECK_TYPE(supported_dtype(a.scalar_type()), op, ": ", name_a,
                   " must be float32, float64, float16 or bfloat16, got ", a.scalar_type());
  TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type(), op, ": ", name_b, " has dtype ",
                   b.scalar_type(), " but ", name_a, " has dtype ", a.scalar_type());
}

void check_options(const char* op, const at::Tensor& like, int64_t coords,
                   const std::optional<at::Tensor>& running_var_lr,
                   const std::optional<at::Tensor>& running_var_rp, double momentum,
                   std::optional<double> fixed_weight, double ucb) {
  TORCH_CHECK_VALUE(running_var_lr.has_value() == running_var_rp.has_value(), op,
                    ": give both running_var_lr and running_var_rp, or neither");
  if (running_var_lr.has_value()) {
    check_running(op, "running_var_lr", *running_var_lr, like, coords);
    check_running(op, "running_var_rp", *running_var_rp, like, coords);
  }
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum < 1.0, op, ": momentum must be in [0, 1), got ",
                    momentum);
  if (fixed_weight.has_value()) {
    const double w = *fixed_weight;
    TORCH_CHECK_VALUE(w >= 0.0 && w <= 1.0, op, ": fixed_weight must be in [0, 1], got ", w);
  }
  TORCH_CHECK_VALUE(ucb >= 0.0 && ucb < kInf, op, ": ucb must be finite and >= 0, got ", ucb);
}

void check_gaussian(const at::Tensor& d, const at::Tensor& eps, const at::Tensor& sigma,
                    const at::Tensor& adv, const char* op) {
  check_pair(op, "d", d, "eps", eps);
  check_pair(op, "d", d, "sigma", sigma);
  TORCH_CHECK_VALUE(adv.dim() == 1 && adv.size(0) == d.size(0), op,
                    ": adv must be a 1-D tensor of B = ", d.size(0), " elements, got shape ",
                    adv.sizes());
  TORCH_CHECK_VALUE(adv.device() == d.device(), op, ": adv is on ", adv.device(), " but d is on ",
                    d.device());
  TORCH_CHECK_TYPE(supported_dtype(adv.scalar_type()), op,
                   ": adv must be a floating tensor, got ", adv.scalar_type());
}

void check_comoments(const at::Tensor& d, const at::Tensor& eps, const at::Tensor& sigma,
                     const at::Tensor& adv, int64_t groups, double ucb) {
  const char* op = "gaussian_tpx_comoments";
  check_gaussian(d, eps, sigma, adv, op);
  TORCH_CHECK_VALUE(groups == 1 || groups == 2, op,
                    ": groups must be 1 (the mu coordinates) or 2 (mu and sigma), got ", groups);
  TORCH_CHECK_VALUE(ucb >= 0.0 && ucb < kInf, op, ": ucb must be finite and >= 0, got ", ucb);
}

CoordinateBuffers make_buffers(const at::Tensor& like, int64_t coords,
                               const std::optional<at::Tensor>& running_var_lr,
                               const std::optional<at::Tensor>& running_var_rp,
                               std::optional<double> fixed_weight, double ucb) {
  CoordinateBuffers buf;
  const auto f64 = like.options().dtype(at::kDouble);
  buf.k = at::empty({coords}, f64);
  buf.var_lr = at::empty({coords}, f64);
  buf.var_rp = at::empty({coords}, f64);
  if (like.is_cpu()) {  // at::zeros would dispatch a fill for one element
    buf.nonfinite = at::empty({}, like.options().dtype(at::kLong));
    buf.invalid = at::empty({}, like.options().dtype(at::kInt));
    *buf.nonfinite.data_ptr<int64_t>() = 0;
    *buf.invalid.data_ptr<int>() = 0;
  } else {
    buf.nonfinite = at::zeros({}, like.options().dtype(at::kLong));
    buf.invalid = at::zeros({}, like.options().dtype(at::kInt));
  }
  if (running_var_lr.has_value()) {
    // A float64 contiguous buffer is updated in place; others via a copy.
    buf.run_lr = running_var_lr->to(at::kDouble).contiguous();
    buf.run_rp = running_var_rp->to(at::kDouble).contiguous();
  }
  if (fixed_weight.has_value()) buf.fixed_k = *fixed_weight;
  buf.ucb = fixed_weight.has_value() ? 0.0 : ucb;  // a fixed weight needs no statistics
  return buf;
}

at::Tensor advantages_as_double(const at::Tensor& adv) {
  if (adv.scalar_type() == at::kDouble || !adv.is_cpu()) return adv.to(at::kDouble).contiguous();
  // On the CPU a plain loop: a conversion op costs more than the op's small cases.
  at::Tensor out = at::empty({adv.size(0)}, adv.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  const int64_t n = adv.size(0), stride = adv.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, adv.scalar_type(), "advantages", [&] {
    const scalar_t* a = adv.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<double>(a[i * stride]);
  });
  return out;
}

void finish_running(CoordinateBuffers& buf, const std::optional<at::Tensor>& running_var_lr,
                    const std::optional<at::Tensor>& running_var_rp) {
  if (!running_var_lr.has_value()) return;
  if (!buf.run_lr.is_same(*running_var_lr)) running_var_lr->copy_(buf.run_lr);
  if (!buf.run_rp.is_same(*running_var_rp)) running_var_rp->copy_(buf.run_rp);
}

void raise_if_invalid_sigma(const CoordinateBuffers& buf) {
  // On CUDA, item() waits for the kernels: the one synchronisation of the op.
  const int invalid = buf.invalid.is_cpu() ? *buf.invalid.data_ptr<int>() : buf.invalid.item<int>();
  TORCH_CHECK_VALUE(invalid == 0,
                    "gaussian_tpx_backward: sigma must be finite and > 0 everywhere (found an "
                    "entry <= 0, inf or NaN); pass check_sigma=False to skip this check");
}

// ucb's default, 2, is tpx_ext.ops.DEFAULT_UCB: the one of the Python wrappers, the float64
// reference and Estimator("tpx") (python_tests/test_matrix_weights.py checks they agree).
TORCH_LIBRARY(tpx_ext, m) {
  m.def(
      "ivw_combine(Tensor g_lr, Tensor g_rp, Tensor(a!)? running_var_lr, "
      "Tensor(b!)? running_var_rp, float momentum, float? fixed_weight, float ucb=2.0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gaussian_tpx_backward(Tensor d, Tensor eps, Tensor sigma, Tensor adv, "
      "Tensor(a!)? running_var_lr, Tensor(b!)? running_var_rp, float momentum, "
      "float? fixed_weight, bool check_sigma, float ucb=2.0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gaussian_tpx_comoments(Tensor d, Tensor eps, Tensor sigma, Tensor adv, int groups, "
      "float ucb) -> (Tensor cov, Tensor bound, Tensor finite)");
}

}  // namespace tpx
