// Tests of the ops in libtpx_ops, called through the PyTorch dispatcher as a
// C++ user would, against the naive float64 computation of reference.h. CPU
// always; CUDA too when a device is present and the CUDA kernels are built.
// Run by ctest (test_ops).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "check.h"
#include "reference.h"

namespace {

using namespace tpx_test;

using OptTensor = std::optional<at::Tensor>;
using IvwOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using GaussOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

const c10::OperatorHandle& ivw_handle() {
  static const c10::OperatorHandle h =
      c10::Dispatcher::singleton().findSchemaOrThrow("tpx_ext::ivw_combine", "");
  return h;
}

const c10::OperatorHandle& gaussian_handle() {
  static const c10::OperatorHandle h =
      c10::Dispatcher::singleton().findSchemaOrThrow("tpx_ext::gaussian_tpx_backward", "");
  return h;
}

IvwOut ivw_combine(const at::Tensor& g_lr, const at::Tensor& g_rp, const OptTensor& run_lr,
                   const OptTensor& run_rp, double momentum, std::optional<double> fixed_weight,
                   double ucb = 0.0) {
  static const auto op =
      ivw_handle()
          .typed<IvwOut(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                        double, std::optional<double>, double)>();
  return op.call(g_lr, g_rp, run_lr, run_rp, momentum, fixed_weight, ucb);
}

GaussOut gaussian_tpx_backward(const at::Tensor& d, const at::Tensor& eps, const at::Tensor& sigma,
                               const at::Tensor& adv, const OptTensor& run_lr,
                               const OptTensor& run_rp, double momentum,
                               std::optional<double> fixed_weight, bool check_sigma,
                               double ucb = 0.0) {
  static const auto op =
      gaussian_handle()
          .typed<GaussOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const OptTensor&, const OptTensor&, double,
                          std::optional<double>, bool, double)>();
  return op.call(d, eps, sigma, adv, run_lr, run_rp, momentum, fixed_weight, check_sigma, ucb);
}

// ---- Tensor helpers -------------------------------------------------------------

at::Tensor make(const std::vector<double>& v, at::IntArrayRef shape, at::ScalarType dtype,
                const at::Device& device) {
  return at::from_blob(const_cast<double*>(v.data()), shape, at::kDouble)
      .to(dtype)
      .to(device)
      .clone();
}

std::vector<double> values(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU).to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// Relative tolerance of the combined gradient, stored in the input dtype.
double output_tol(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return 1e-12;
    case at::kFloat: return 1e-6;
    case at::kHalf: return 2e-3;
    default: return 1e-2;  // bfloat16
  }
}

// Compares one op result with the reference (reference.h, compare_values).
void compare(const char* what, const at::Tensor& g, const at::Tensor& k, const at::Tensor& var_lr,
             const at::Tensor& var_rp, const at::Tensor& nonfinite, const Reference& ref,
             const std::vector<double>& lr, const std::vector<double>& rp, int64_t C,
             at::ScalarType dtype) {
  TEST_CHECK(nonfinite.dim() == 0 && nonfinite.scalar_type() == at::kLong, "%s", what);
  compare_values(what, values(g), values(k), values(var_lr), values(var_rp),
                 nonfinite.item<int64_t>(), ref, lr, rp, C, output_tol(dtype));
}

// The running-variance buffers after a call, against the reference's.
void check_running(const std::string& what, const at::Tensor& run_lr, const at::Tensor& run_rp,
                   const std::vector<double>& ref_lr, const std::vector<double>& ref_rp,
                   double tol) {
  check_running_values(what, values(run_lr), values(run_rp), ref_lr, ref_rp, tol);
}

// ---- Cases ----------------------------------------------------------------------

// One batch, no running statistics, with special columns:
//   col 3: an inf in both estimators -> k NaN, g 0, nonfinite 1
//   col 4: a NaN in LR only           -> k 0, g = g_rp exactly
//   col 5: RP constant                -> var_rp 0, k 0
//   col 6: both constant              -> k 0.5
void case_special_columns(const at::Device& dev, at::ScalarType dtype) {
  const int64_t B = 64, C = 7;
  std::mt19937_64 rng(1);
  std::vector<double> lr, rp;
  fill(lr, B, C, rng, 2.0);
  fill(rp, B, C, rng, 0.7);
  lr[5 * C + 3] = kInf;
  rp[9 * C + 3] = -kInf;
  lr[11 * C + 4] = kNaN;
  for (int64_t i = 0; i < B; ++i) rp[i * C + 5] = 1.25, lr[i * C + 6] = -0.5, rp[i * C + 6] = 3.0;

  const at::Tensor t_lr = make(lr, {B, C}, dtype, dev), t_rp = make(rp, {B, C}, dtype, dev);
  // The reference sees exactly what the kernel reads (inputs rounded to dtype).
  const std::vector<double> lr_r = values(t_lr), rp_r = values(t_rp);
  const Reference ref = reference(lr_r, rp_r, B, C, nullptr, nullptr, 0.0, -1.0);
  TEST_CHECK(std::isnan(ref.k[3]) && ref.k[4] == 0.0 && ref.k[5] == 0.0 && ref.k[6] == 0.5);
  TEST_CHECK(ref.nonfinite == 1);

  const auto [g, k, var_lr, var_rp, nonfinite] =
      ivw_combine(t_lr, t_rp, std::nullopt, std::nullopt, 0.9, std::nullopt);
  TEST_CHECK(g.scalar_type() == dtype && g.device() == dev && k.scalar_type() == at::kDouble);
  TEST_CHECK(g.sizes() == t_lr.sizes());
  const std::string what = std::string("special columns ") + c10::toString(dtype) + " " + dev.str();
  compare(what.c_str(), g, k, var_lr, var_rp, nonfinite, ref, lr_r, rp_r, C, dtype);
}

// Large enough (B * C >= 32768) for the CPU kernel to split the rows into
// chunks merged with Chan's formula; 4 threads force several chunks.
void case_chunked(const at::Device& dev) {
  const int64_t B = 5003, C = 9;  // odd B: uneven chunks
  std::mt19937_64 rng(2);
  std::vector<double> lr, rp;
  fill(lr, B, C, rng, 1.0);
  fill(rp, B, C, rng, 1.5);
  for (int64_t i = 0; i < B; ++i) lr[i * C + 8] += 1e6;  // large offset: Welford's case
  const at::Tensor t_lr = make(lr, {B, C}, at::kDouble, dev);
  const at::Tensor t_rp = make(rp, {B, C}, at::kDouble, dev);
  const Reference ref = reference(lr, rp, B, C, nullptr, nullptr, 0.0, -1.0);
  const int threads = at::get_num_threads();
  at::set_num_threads(4);
  const auto [g, k, var_lr, var_rp, nonfinite] =
      ivw_combine(t_lr, t_rp, std::nullopt, std::nullopt, 0.0, std::nullopt);
  at::set_num_threads(threads);
  compare(("chunked " + dev.str()).c_str(), g, k, var_lr, var_rp, nonfinite, ref, lr, rp, C,
          at::kDouble);
}

// Running statistics over 3 calls, momentum 0.5; in call 2, column 1 has an
// inf in LR (its running LR value must stay) and column 2 in both.
void case_running(const at::Device& dev, at::ScalarType run_dtype) {
  const int64_t B = 40, C = 4;
  const double momentum = 0.5;
  std::mt19937_64 rng(3);
  std::vector<double> ref_run_lr(C, kNaN), ref_run_rp(C, kNaN);
  const at::Tensor run_lr = at::full({C}, kNaN, at::TensorOptions(run_dtype).device(dev));
  const at::Tensor run_rp = at::full({C}, kNaN, at::TensorOptions(run_dtype).device(dev));
  for (int call = 0; call < 3; ++call) {
    std::vector<double> lr, rp;
    fill(lr, B, C, rng, 1.0 + call);
    fill(rp, B, C, rng, 2.0 - 0.5 * call);
    if (call == 1) lr[3 * C + 1] = kInf, lr[4 * C + 2] = kNaN, rp[7 * C + 2] = kInf;
    const at::Tensor t_lr = make(lr, {B, C}, at::kFloat, dev);
    const at::Tensor t_rp = make(rp, {B, C}, at::kFloat, dev);
    const std::vector<double> lr_r = values(t_lr), rp_r = values(t_rp);
    const std::vector<double> before_lr = ref_run_lr;
    const Reference ref = reference(lr_r, rp_r, B, C, &ref_run_lr, &ref_run_rp, momentum, -1.0);
    if (call == 1) TEST_CHECK(ref_run_lr[1] == before_lr[1] && ref.nonfinite == 1);
    if (run_dtype == at::kFloat) {
      // The kernel starts the next call from the buffer's float values.
      for (double& v : ref_run_lr) v = static_cast<float>(v);
      for (double& v : ref_run_rp) v = static_cast<float>(v);
    }

    const auto [g, k, var_lr, var_rp, nonfinite] =
        ivw_combine(t_lr, t_rp, run_lr, run_rp, momentum, std::nullopt);
    const std::string what = "running call " + std::to_string(call) + " " +
                             c10::toString(run_dtype) + " " + dev.str();
    compare(what.c_str(), g, k, var_lr, var_rp, nonfinite, ref, lr_r, rp_r, C, at::kFloat);
    // The caller's buffers are updated in place (rounded to their dtype).
    const double tol = run_dtype == at::kDouble ? 1e-12 : 1e-6;
    check_running(what, run_lr, run_rp, ref_run_lr, ref_run_rp, tol);
  }
}

// fixed_weight: k is that value everywhere; 0 and 1 reproduce rp / lr exactly.
void case_fixed(const at::Device& dev) {
  const int64_t B = 16, C = 5;
  std::mt19937_64 rng(4);
  std::vector<double> lr, rp;
  fill(lr, B, C, rng, 1.0);
  fill(rp, B, C, rng, 1.0);
  lr[2 * C + 1] = kInf;  // must not leak into the fixed_weight = 0 result
  const at::Tensor t_lr = make(lr, {B, C}, at::kFloat, dev);
  const at::Tensor t_rp = make(rp, {B, C}, at::kFloat, dev);
  const std::vector<double> lr_r = values(t_lr), rp_r = values(t_rp);
  for (double w : {0.0, 0.3, 1.0}) {
    const Reference ref = reference(lr_r, rp_r, B, C, nullptr, nullptr, 0.0, w);
    const auto [g, k, var_lr, var_rp, nonfinite] =
        ivw_combine(t_lr, t_rp, std::nullopt, std::nullopt, 0.0, w);
    const std::string what = "fixed_weight " + std::to_string(w) + " " + dev.str();
    compare(what.c_str(), g, k, var_lr, var_rp, nonfinite, ref, lr_r, rp_r, C, at::kFloat);
  }
}

// ucb > 0: weights from the variances' upper bounds (TPX.md sec. 2). Heavy
// tails in some columns (a few samples 30x the others), so that the bounds
// move k well away from the plain rule's; magnitudes of 1e200 in one column
// (4th powers beyond double: pass 1b standardises); one row (bound = s^2 =
// 0); running statistics (the bounds are averaged, the variances reported
// plain); a chunked batch (several threads) in float32 and bfloat16; and a
// fixed weight, which ignores ucb.
void case_ucb(const at::Device& dev) {
  const int threads = at::get_num_threads();
  at::set_num_threads(3);
  const std::pair<int64_t, int64_t> shapes[] = {{1, 3}, {2, 3}, {61, 7}, {5003, 5}};
  for (const auto& [B, C] : shapes) {
    for (at::ScalarType dtype : {at::kDouble, at::kFloat, at::kBFloat16}) {
      std::mt19937_64 rng(7 + B + C);
      std::vector<double> lr, rp;
      fill(lr, B, C, rng, 1.0);
      fill(rp, B, C, rng, 1.0);
      for (int64_t i = 0; i < B; i += 13) rp[i * C + 1] *= 30.0, lr[i * C + 2] *= 30.0;
      if (dtype == at::kDouble)
        for (int64_t i = 0; i < B; ++i) rp[i * C + 4 % C] *= 1e200;
      const at::Tensor t_lr = make(lr, {B, C}, dtype, dev), t_rp = make(rp, {B, C}, dtype, dev);
      const std::vector<double> lr_r = values(t_lr), rp_r = values(t_rp);
      const std::string what = "ucb [" + std::to_string(B) + ", " + std::to_string(C) + "] " +
                               c10::toString(dtype) + " " + dev.str();
      const Reference plain = reference(lr_r, rp_r, B, C, nullptr, nullptr, 0.0, -1.0);
      const Reference ref = reference(lr_r, rp_r, B, C, nullptr, nullptr, 0.0, -1.0, 2.0);
      if (B > 60) {  // the heavy tails must move the weights, or this tests nothing
        // Column 1 (RP heavy): less weight on RP; column 2 (LR heavy): less on LR.
        TEST_CHECK(1.0 - ref.k[1] < (1.0 - plain.k[1]) / 1.05 && ref.k[2] < plain.k[2] / 1.05,
                   "%s: k %g %g vs plain %g %g", what.c_str(), ref.k[1], ref.k[2], plain.k[1],
                   plain.k[2]);
      }
      const auto [g, k, var_lr, var_rp, nonfinite] =
          ivw_combine(t_lr, t_rp, std::nullopt, std::nullopt, 0.0, std::nullopt, 2.0);
      compare(what.c_str(), g, k, var_lr, var_rp, nonfinite, ref, lr_r, rp_r, C, dtype);

      // Two calls with running statistics, momentum 0.5.
      std::vector<double> ref_lr(C, kNaN), ref_rp(C, 2.0);
      const auto opt = at::TensorOptions(at::kDouble).device(dev);
      const at::Tensor run_lr = at::full({C}, kNaN, opt), run_rp = at::full({C}, 2.0, opt);
      for (int call = 0; call < 2; ++call) {
        const Reference r = reference(lr_r, rp_r, B, C, &ref_lr, &ref_rp, 0.5, -1.0, 2.0);
        const auto [g2, k2, vl2, vr2, nf2] =
            ivw_combine(t_lr, t_rp, run_lr, run_rp, 0.5, std::nullopt, 2.0);
        const std::string w = what + " running call " + std::to_string(call);
        compare(w.c_str(), g2, k2, vl2, vr2, nf2, r, lr_r, rp_r, C, dtype);
        check_running(w, run_lr, run_rp, ref_lr, ref_rp, 1e-10);
      }
      const Reference fixed = reference(lr_r, rp_r, B, C, nullptr, nullptr, 0.0, 0.25);
      const auto [g3, k3, vl3, vr3, nf3] =
          ivw_combine(t_lr, t_rp, std::nullopt, std::nullopt, 0.0, 0.25, 2.0);
      compare((what + " fixed").c_str(), g3, k3, vl3, vr3, nf3, fixed, lr_r, rp_r, C, dtype);
    }
  }
  at::set_num_threads(threads);
}

// gaussian_tpx_backward against the per-sample gradients of x = mu + sigma * eps
// (TPX.md sec. 1) fed to the same reference: coordinates [mu_0..mu_D, sigma_0..sigma_D].
void case_gaussian(const at::Device& dev) {
  const int64_t B = 48, D = 5;
  std::mt19937_64 rng(5);
  std::normal_distribution<double> normal;
  std::vector<double> d, eps, sigma, adv(B);
  fill_node(d, eps, sigma, B, D, rng, 0.2);
  for (auto& v : adv) v = 3.0 * normal(rng);
  std::vector<double> lr, rp;
  gaussian_grads(d, eps, sigma, adv, B, D, &lr, &rp);
  std::vector<double> run_lr(2 * D, kNaN), run_rp(2 * D, kNaN);
  const Reference ref = reference(lr, rp, B, 2 * D, &run_lr, &run_rp, 0.5, -1.0);
  const auto opt = at::TensorOptions(at::kDouble).device(dev);
  const at::Tensor t_run_lr = at::full({2 * D}, kNaN, opt), t_run_rp = at::full({2 * D}, kNaN, opt);
  const auto [gmu, gsig, k, var_lr, var_rp, nonfinite] = gaussian_tpx_backward(
      make(d, {B, D}, at::kDouble, dev), make(eps, {B, D}, at::kDouble, dev),
      make(sigma, {B, D}, at::kDouble, dev), make(adv, {B}, at::kDouble, dev), t_run_lr, t_run_rp,
      0.5, std::nullopt, true);
  // Reassemble [B, 2D] from grad_mu and grad_sigma, then compare as one op.
  const at::Tensor g = at::cat({gmu, gsig}, 1);
  compare(("gaussian " + dev.str()).c_str(), g, k, var_lr, var_rp, nonfinite, ref, lr, rp, 2 * D,
          at::kDouble);
  const std::vector<double> got_run = values(t_run_lr);
  for (int64_t q = 0; q < 2 * D; ++q) TEST_CHECK_NEAR(got_run[q], run_lr[q], 1e-12);

  // An invalid sigma (<= 0, inf or NaN) is an error naming sigma with
  // check_sigma, wherever it is (first element, inside a block, last element,
  // which for the CPU kernel is in a leftover row when B is not a multiple of
  // its block); the running statistics are then left untouched. Without
  // check_sigma the op runs.
  for (double bad_sigma : {0.0, -1.0, kInf, -kInf, kNaN}) {
    for (int64_t pos : {int64_t{0}, int64_t{7}, B * D - 1}) {
      std::vector<double> s = sigma;
      s[pos] = bad_sigma;
      const at::Tensor r_lr = at::full({2 * D}, 3.0, opt), r_rp = at::full({2 * D}, 4.0, opt);
      bool threw = false;
      try {
        gaussian_tpx_backward(make(d, {B, D}, at::kDouble, dev), make(eps, {B, D}, at::kDouble, dev),
                              make(s, {B, D}, at::kDouble, dev), make(adv, {B}, at::kDouble, dev),
                              r_lr, r_rp, 0.5, std::nullopt, true);
      } catch (const c10::Error& e) {
        threw = std::string(e.what_without_backtrace()).find("sigma") != std::string::npos;
      }
      TEST_CHECK(threw, "gaussian_tpx_backward with sigma = %g at %lld must throw a c10::Error naming sigma",
                 bad_sigma, (long long)pos);
      for (double v : values(r_lr)) TEST_CHECK(v == 3.0, "running_var_lr changed (sigma = %g)", bad_sigma);
      for (double v : values(r_rp)) TEST_CHECK(v == 4.0, "running_var_rp changed (sigma = %g)", bad_sigma);
      const auto unchecked = gaussian_tpx_backward(
          make(d, {B, D}, at::kDouble, dev), make(eps, {B, D}, at::kDouble, dev),
          make(s, {B, D}, at::kDouble, dev), make(adv, {B}, at::kDouble, dev), std::nullopt,
          std::nullopt, 0.5, std::nullopt, false);
      TEST_CHECK(std::get<0>(unchecked).sizes() == at::IntArrayRef({B, D}));
    }
  }
}

// The CPU kernel reads V rows at a time as L = V * C flat lanes (V >= 64 / C,
// L a multiple of 4 for C < 256, V = 1 from C = 256 on, leftover lanes one at
// a time), sums panels of 16 such blocks in registers, then the leftover
// rows, and splits large batches (B * C >= 4096) into one chunk per thread:
// shapes around those boundaries (B < V, B = V, B = V + 1, one row, C = 64 /
// 65 / 100 / 255 / 256 / 257, whole and partial panels, chunks), both ops,
// in float32 and float64; each op with ucb = 2 in one of them (pass 1b
// walks the same blocks).
void case_shapes(const at::Device& dev) {
  const std::pair<int64_t, int64_t> shapes[] = {
      {1, 1},   {1, 5},    {2, 1},    {63, 1},   {64, 1},   {65, 1},    {130, 1},
      {200, 3}, {7, 21},   {50, 64},  {33, 65},  {20, 100}, {3, 300},   {20000, 1},
      {3001, 3}, {170, 97}, {389, 6},  {33, 7},   {37, 255}, {19, 256},  {40, 257}};
  const int threads = at::get_num_threads();
  at::set_num_threads(4);
  int cases = 0;
  for (const auto& [B, C] : shapes) {
    std::mt19937_64 rng(100 + B * 7 + C);
    for (at::ScalarType dtype : {at::kFloat, at::kDouble}) {
      const std::string what = "shape [" + std::to_string(B) + ", " + std::to_string(C) + "] " +
                               c10::toString(dtype) + " " + dev.str();
      // ivw_combine, with running statistics.
      std::vector<double> lr, rp;
      fill(lr, B, C, rng, 1.0);
      fill(rp, B, C, rng, 0.8);
      const at::Tensor t_lr = make(lr, {B, C}, dtype, dev), t_rp = make(rp, {B, C}, dtype, dev);
      const std::vector<double> lr_r = values(t_lr), rp_r = values(t_rp);
      const double ucb = dtype == at::kFloat ? 2.0 : 0.0;
      std::vector<double> ref_run_lr(C, 1.0), ref_run_rp(C, kNaN);
      const Reference ref = reference(lr_r, rp_r, B, C, &ref_run_lr, &ref_run_rp, 0.9, -1.0, ucb);
      const auto opt = at::TensorOptions(at::kDouble).device(dev);
      const at::Tensor run_lr = at::full({C}, 1.0, opt), run_rp = at::full({C}, kNaN, opt);
      const auto [g, k, var_lr, var_rp, nonfinite] =
          ivw_combine(t_lr, t_rp, run_lr, run_rp, 0.9, std::nullopt, ucb);
      compare(("ivw " + what).c_str(), g, k, var_lr, var_rp, nonfinite, ref, lr_r, rp_r, C, dtype);
      check_running(what, run_lr, run_rp, ref_run_lr, ref_run_rp, 1e-10);

      // gaussian_tpx_backward: the advantage is per row, so a wrong row in a
      // block shows up in the LR gradients.
      std::normal_distribution<double> normal;
      std::vector<double> d, eps, sigma, adv(B);
      fill_node(d, eps, sigma, B, C, rng, 0.3);
      for (int64_t i = 0; i < B; ++i) adv[i] = 0.5 + i % 7 + normal(rng);
      const at::Tensor t_d = make(d, {B, C}, dtype, dev), t_eps = make(eps, {B, C}, dtype, dev),
                       t_sigma = make(sigma, {B, C}, dtype, dev),
                       t_adv = make(adv, {B}, at::kDouble, dev);
      std::vector<double> glr, grp;
      gaussian_grads(values(t_d), values(t_eps), values(t_sigma), adv, B, C, &glr, &grp);
      const Reference gref = reference(glr, grp, B, 2 * C, nullptr, nullptr, 0.0, -1.0, 2.0 - ucb);
      const auto [gmu, gsig, gk, gvar_lr, gvar_rp, gnonfinite] = gaussian_tpx_backward(
          t_d, t_eps, t_sigma, t_adv, std::nullopt, std::nullopt, 0.0, std::nullopt, true, 2.0 - ucb);
      TEST_CHECK(gmu.scalar_type() == dtype && gsig.scalar_type() == dtype, "%s", what.c_str());
      compare(("gaussian " + what).c_str(), at::cat({gmu, gsig}, 1), gk, gvar_lr, gvar_rp,
              gnonfinite, gref, glr, grp, 2 * C, dtype);
      ++cases;
    }
  }
  at::set_num_threads(threads);
  (void)cases;
}

// Finite float64 inputs whose moments overflow double (+-1e308 alternating,
// same-sign values near DBL_MAX) are treated like non-finite ones: variance
// +inf, all weight on the other estimator, the running value kept; both
// overflowing zeroes the coordinate and counts in nonfinite.
void case_overflow(const at::Device& dev) {
  const int64_t B = 37, C = 6;  // odd B: leftover rows in the CPU kernel's blocks
  std::mt19937_64 rng(6);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> near_max(1.0e308, 1.7e308);
  std::vector<double> lr, rp;
  fill(lr, B, C, rng, 1.0);
  fill(rp, B, C, rng, 2.0);
  for (int64_t i = 0; i < B; ++i) {
    const double alt = i % 2 == 0 ? 1e308 : -1e308;
    lr[i * C + 0] = alt;                 // col 0: LR overflows -> k = 0, g = g_rp
    rp[i * C + 1] = -alt;                // col 1: RP overflows -> k = 1, g = g_lr
    lr[i * C + 2] = rp[i * C + 2] = alt;  // col 2: both -> k NaN, g = 0, nonfinite
    lr[i * C + 3] = near_max(rng);       // col 3: same-sign spread overflows -> k = 0
    lr[i * C + 4] = 1e150 * normal(rng);  // col 4: variance ~1e300, representable
  }
  const at::Tensor t_lr = make(lr, {B, C}, at::kDouble, dev);
  const at::Tensor t_rp = make(rp, {B, C}, at::kDouble, dev);
  std::vector<double> ref_run_lr(C, 2.0), ref_run_rp(C, 2.0);
  const Reference ref = reference(lr, rp, B, C, &ref_run_lr, &ref_run_rp, 0.5, -1.0);
  TEST_CHECK(std::isinf(ref.var_lr[0]) && ref.k[0] == 0.0 && ref.k[1] == 1.0 && std::isnan(ref.k[2]));
  TEST_CHECK(std::isinf(ref.var_lr[3]) && std::isfinite(ref.var_lr[4]) && ref.nonfinite == 1);
  TEST_CHECK(ref_run_lr[0] == 2.0 && ref_run_rp[1] == 2.0);  // overflowed: running value kept
  const auto opt = at::TensorOptions(at::kDouble).device(dev);
  const at::Tensor run_lr = at::full({C}, 2.0, opt), run_rp = at::full({C}, 2.0, opt);
  const auto [g, k, var_lr, var_rp, nonfinite] =
      ivw_combine(t_lr, t_rp, run_lr, run_rp, 0.5, std::nullopt);
  const std::string what = "overflow float64 " + dev.str();
  compare(what.c_str(), g, k, var_lr, var_rp, nonfinite, ref, lr, rp, C, at::kDouble);
  check_running(what, run_lr, run_rp, ref_run_lr, ref_run_rp, 1e-12);

  // The same magnitudes in float32 (+-3e38) square to ~1e77: no overflow in
  // the double statistics, a finite variance.
  std::vector<double> flr, frp;
  fill(flr, B, 2, rng, 1.0);
  fill(frp, B, 2, rng, 1.0);
  for (int64_t i = 0; i < B; ++i) flr[i * 2] = i % 2 == 0 ? 3e38 : -3e38;
  const at::Tensor f_lr = make(flr, {B, 2}, at::kFloat, dev), f_rp = make(frp, {B, 2}, at::kFloat, dev);
  const std::vector<double> flr_r = values(f_lr), frp_r = values(f_rp);
  const Reference fref = reference(flr_r, frp_r, B, 2, nullptr, nullptr, 0.0, -1.0);
  TEST_CHECK(std::isfinite(fref.var_lr[0]) && fref.var_lr[0] > 1e76);
  const auto [fg, fk, fvar_lr, fvar_rp, fnonfinite] =
      ivw_combine(f_lr, f_rp, std::nullopt, std::nullopt, 0.0, std::nullopt);
  compare(("overflow float32 " + dev.str()).c_str(), fg, fk, fvar_lr, fvar_rp, fnonfinite, fref,
          flr_r, frp_r, 2, at::kFloat);
}

// float64 columns whose mean is beyond sqrt(DBL_MAX) ~ 1.34e154 but whose
// variance is representable (a constant 1e200 column: 0; 1e160 +- 1e150:
// ~1e300). The reference (and tpx_ext.reference) gives the finite variance.
// The CPU kernel Chan-merges every column into an empty accumulator, which
// once computed inf * 0 = NaN there (see test_tpx_math's
// test_merge_into_empty) and reported +inf.
void case_large_mean(const at::Device& dev) {
  const int64_t B = 40, C = 3;
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal;
  std::vector<double> lr, rp;
  fill(lr, B, C, rng, 1.0);
  fill(rp, B, C, rng, 1.0);
  for (int64_t i = 0; i < B; ++i) {
    lr[i * C + 0] = 1e200;
    lr[i * C + 1] = 1e160 + 1e150 * normal(rng);
  }
  const Reference ref = reference(lr, rp, B, C, nullptr, nullptr, 0.0, -1.0);
  TEST_CHECK(ref.var_lr[0] == 0.0 && std::isfinite(ref.var_lr[1]) && ref.k[0] == 1.0);
  const auto [g, k, var_lr, var_rp, nonfinite] =
      ivw_combine(make(lr, {B, C}, at::kDouble, dev), make(rp, {B, C}, at::kDouble, dev),
                  std::nullopt, std::nullopt, 0.0, std::nullopt);
  const std::vector<double> vl = values(var_lr), kv = values(k), vr = values(var_rp);
  const std::string what = "large mean " + dev.str();
  TEST_CHECK(vl[0] == 0.0 && kv[0] == 1.0, "%s: constant 1e200 column: var_lr %g (expected 0), k %g",
                   what.c_str(), vl[0], kv[0]);
  // Welford's relative error grows with |mean| / sd = 1e10 here: ~n * 1e10 * eps.
  TEST_CHECK(tpx_test::near(vl[1], ref.var_lr[1], 1e-3),
                   "%s: 1e160 +- 1e150 column: var_lr %.17g (expected %.17g)", what.c_str(), vl[1],
                   ref.var_lr[1]);
  // The ordinary column is not affected.
  TEST_CHECK_NEAR(vl[2], ref.var_lr[2], 1e-10, "%s", what.c_str());
  TEST_CHECK_NEAR(vr[0], ref.var_rp[0], 1e-10, "%s", what.c_str());
  TEST_CHECK_NEAR(kv[2], ref.k[2], 1e-10, "%s", what.c_str());
}

// A bad argument throws c10::Error whose message names it.
void expect_error(const char* name, const std::function<void()>& call) {
  try {
    call();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    TEST_CHECK(msg.find(name) != std::string::npos, "message does not name %s: %s", name, msg.c_str());
    return;
  }
  TEST_CHECK(false, "no c10::Error for a bad %s", name);
}

void case_errors(const at::Device& dev) {
  const auto f = at::TensorOptions(at::kFloat).device(dev);
  const at::Tensor a = at::randn({8, 3}, f), b = at::randn({8, 4}, f);
  expect_error("g_rp", [&] { ivw_combine(a, b, std::nullopt, std::nullopt, 0.9, std::nullopt); });
  expect_error("g_rp", [&] {
    ivw_combine(a, at::randn({8, 3}, f.dtype(at::kDouble)), std::nullopt, std::nullopt, 0.9,
                std::nullopt);
  });
  expect_error("g_lr", [&] {
    ivw_combine(at::randn({8}, f), at::randn({8}, f), std::nullopt, std::nullopt, 0.9,
                std::nullopt);
  });
  expect_error("running_var_lr", [&] {
    ivw_combine(a, a, at::zeros({4}, f), at::zeros({3}, f), 0.9, std::nullopt);
  });
  expect_error("momentum", [&] { ivw_combine(a, a, std::nullopt, std::nullopt, 1.0, std::nullopt); });
  expect_error("fixed_weight", [&] { ivw_combine(a, a, std::nullopt, std::nullopt, 0.9, 1.5); });
  for (double ucb : {-1.0, kInf, kNaN})
    expect_error("ucb", [&] { ivw_combine(a, a, std::nullopt, std::nullopt, 0.9, std::nullopt, ucb); });
  expect_error("adv", [&] {
    gaussian_tpx_backward(a, a, a.abs() + 1, at::zeros({7}, f), std::nullopt, std::nullopt, 0.9,
                          std::nullopt, false);
  });
}

void run_all(const at::Device& dev) {
  for (at::ScalarType dt : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16})
    case_special_columns(dev, dt);
  case_chunked(dev);
  case_running(dev, at::kDouble);  // updated in place
  case_running(dev, at::kFloat);   // updated through a float64 copy
  case_fixed(dev);
  case_ucb(dev);
  case_gaussian(dev);
  case_shapes(dev);
  case_overflow(dev);
  case_large_mean(dev);
  case_errors(dev);
  std::printf("  %s: all cases passed\n", dev.str().c_str());
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  std::printf("test_ops\n");
  // The library registered the ops when it was loaded.
  TEST_CHECK(c10::Dispatcher::singleton().findSchema({"tpx_ext::ivw_combine", ""}).has_value(),
        "tpx_ext::ivw_combine is not registered: is libtpx_ops loaded?");
  run_all(at::Device(at::kCPU));

  const bool cuda_kernels = ivw_handle().hasKernelForDispatchKey(c10::DispatchKey::CUDA);
  if (!torch::cuda::is_available()) {
    std::printf("  CUDA skipped: no CUDA device (kernels %s)\n",
                cuda_kernels ? "registered" : "not built");
  } else if (!cuda_kernels) {
#ifdef TPX_TEST_EXPECT_CUDA
    TEST_CHECK(false, "built with TPX_WITH_CUDA but no CUDA kernel is registered");
#endif
    std::printf("  CUDA skipped: library built without the CUDA kernels\n");
  } else {
    run_all(at::Device(at::kCUDA, 0));
  }
  std::printf("test_ops: all checks passed\n");
  return 0;
}
