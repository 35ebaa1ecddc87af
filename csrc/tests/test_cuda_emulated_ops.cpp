// The ops' host drivers (tpx_ops.h: validation, buffers, running statistics,
// the sigma error) with the CUDA kernels emulated on the CPU behind them,
// against the CPU op called through the dispatcher: the two backends must
// agree. Links libtpx_ops (the host pieces and the CPU kernels). Run by ctest
// (test_cuda_emulated_ops); test_cuda_emulated checks the kernels against
// the float64 reference over a larger grid without torch.
//
// EmuRunner is CudaRunner (csrc/cuda/tpx_cuda.cu) on CPU tensors: the same
// node_args, node_plan and launch_node (and plan_comoments, launch_comoments
// for gaussian_tpx_comoments_impl), with the launches run by the emulation shim.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "check.h"
#include "tpx_ops.h"
// The shim after the ATen headers (it defines __global__, __shared__, ...),
// and before the kernels header, which uses it.
#include "cuda_emulation.h"
#include "cuda/tpx_cuda_kernels.cuh"
#include "cuda/tpx_cuda_comoments.cuh"
#include "cuda/tpx_cuda_node_args.h"

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

using OptTensor = std::optional<at::Tensor>;

// Signalling-NaN bits in every element, as garbage at::empty may leave.
void poison(const at::Tensor& t) {
  const int64_t n = t.numel();
  switch (t.scalar_type()) {
    case at::kDouble: {
      uint64_t* p = static_cast<uint64_t*>(t.data_ptr());
      for (int64_t i = 0; i < n; ++i) p[i] = 0x7FF4000000000000ull;
      break;
    }
    case at::kFloat: {
      uint32_t* p = static_cast<uint32_t*>(t.data_ptr());
      for (int64_t i = 0; i < n; ++i) p[i] = 0x7FA00000u;
      break;
    }
    case at::kHalf:
    case at::kBFloat16: {
      const uint16_t bits = t.scalar_type() == at::kHalf ? 0x7C01 : 0x7F81;
      uint16_t* p = static_cast<uint16_t*>(t.data_ptr());
      for (int64_t i = 0; i < n; ++i) p[i] = bits;
      break;
    }
    default:
      TEST_CHECK(false, "poison: unexpected dtype");
  }
}

struct EmuLaunch {
  template <typename... Params>
  void operator()(void (*kernel)(Params...), tpx::Grid grid,
                  std::type_identity_t<Params>... args) const {
    TEST_CHECK(grid.x >= 1 && grid.y >= 1 && grid.y <= 65535, "grid (%lld, %lld)",
               (long long)grid.x, (long long)grid.y);
    const cuda_emu::Failure f = cuda_emu::launch(kernel, grid.x, grid.y, tpx::kThreads, args...);
    TEST_CHECK(!f, "%s", f.message.c_str());
  }
};

struct EmuRunner {
  int64_t sms;

  at::Tensor new_output(at::IntArrayRef sizes, const at::Tensor& like) const {
    at::Tensor t = at::empty(sizes, like.options());
    poison(t);
    return t;
  }

  template <typename Source>
  void operator()(const Source& src, int64_t B, int64_t C, tpx::CoordinateBuffers& buf,
                  double momentum, bool check_valid) const {
    const tpx::NodeArgs args = tpx::node_args(buf, momentum, check_valid);
    const tpx::NodePlan plan = tpx::node_plan(B, C, Source::G, sms, args);
    const at::Tensor ws = at::empty({plan.workspace_size()}, buf.k.options());
    for (const at::Tensor& t : {ws, buf.k, buf.var_lr, buf.var_rp}) poison(t);
    tpx::launch_node(EmuLaunch{}, src, B, C, plan, ws.data_ptr<double>(), args);
  }

  // CudaRunner::comoments on CPU tensors, with the outputs and workspace poisoned.
  template <typename T>
  void comoments(const tpx::ComomentSource<T>& src, int64_t B, at::Tensor& cov, at::Tensor& bound,
                 at::Tensor& finite, double ucb) const {
    const tpx::ComomentPlan plan = tpx::plan_comoments(B, src.columns(), sms, ucb > 0.0);
    const at::Tensor ws = at::empty({plan.workspace_size()}, cov.options());
    for (const at::Tensor& t : {ws, cov, bound}) poison(t);
    finite.fill_(true);
    const tpx::ComomentArgs out{cov.data_ptr<double>(), bound.data_ptr<double>(),
                                finite.data_ptr<bool>(), ucb};
    tpx::launch_comoments(EmuLaunch{}, src, B, plan, ws.data_ptr<double>(), out);
  }
};

// ---- The CPU op, through the dispatcher ----------------------------------------------

using IvwOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using GaussOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using CoOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

IvwOut cpu_ivw(const at::Tensor& g_lr, const at::Tensor& g_rp, const OptTensor& run_lr,
               const OptTensor& run_rp, double momentum, std::optional<double> fixed,
               double ucb) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("tpx_ext::ivw_combine", "")
          .typed<IvwOut(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                        double, std::optional<double>, double)>();
  return op.call(g_lr, g_rp, run_lr, run_rp, momentum, fixed, ucb);
}

GaussOut cpu_gaussian(const at::Tensor& d, const at::Tensor& eps, const at::Tensor& sigma,
                      const at::Tensor& adv, const OptTensor& run_lr, const OptTensor& run_rp,
                      double momentum, std::optional<double> fixed, bool check_sigma,
                      double ucb) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("tpx_ext::gaussian_tpx_backward", "")
          .typed<GaussOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const OptTensor&, const OptTensor&, double,
                          std::optional<double>, bool, double)>();
  return op.call(d, eps, sigma, adv, run_lr, run_rp, momentum, fixed, check_sigma, ucb);
}

CoOut cpu_comoments(const at::Tensor& d, const at::Tensor& eps, const at::Tensor& sigma,
                    const at::Tensor& adv, int64_t groups, double ucb) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("tpx_ext::gaussian_tpx_comoments", "")
          .typed<CoOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       int64_t, double)>();
  return op.call(d, eps, sigma, adv, groups, ucb);
}

// ---- Comparison ------------------------------------------------------------------------

std::vector<double> values(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// Relative tolerance between the backends' combined gradients: each is
// within one ulp of the float64 result, so two apart at most.
double output_tol(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return 2e-12;
    case at::kFloat: return 2e-6;
    case at::kHalf: return 4e-3;
    default: return 2e-2;  // bfloat16
  }
}

// Per-coordinate statistics and weights (float64 on both backends: the
// same moments, summed in different orders), and the combined gradients,
// equal where k is 0, 1 or NaN.
void compare(const std::string& what, const at::Tensor& g_emu, const at::Tensor& g_cpu,
             const at::Tensor& k_emu, const at::Tensor& k_cpu, const at::Tensor& vl_emu,
             const at::Tensor& vl_cpu, const at::Tensor& vr_emu, const at::Tensor& vr_cpu,
             const at::Tensor& nf_emu, const at::Tensor& nf_cpu, int64_t C) {
  const char* w = what.c_str();
  TEST_CHECK(g_emu.scalar_type() == g_cpu.scalar_type() && g_emu.sizes() == g_cpu.sizes(), "%s", w);
  const std::vector<double> ke = values(k_emu), kc = values(k_cpu), le = values(vl_emu),
                            lc = values(vl_cpu), re = values(vr_emu), rc = values(vr_cpu);
  for (size_t q = 0; q < kc.size(); ++q) {
    TEST_CHECK_NEAR(le[q], lc[q], 1e-10, "%s: var_lr[%zu]", w, q);
    TEST_CHECK_NEAR(re[q], rc[q], 1e-10, "%s: var_rp[%zu]", w, q);
    TEST_CHECK_NEAR(ke[q], kc[q], 1e-10, "%s: k[%zu]", w, q);
    if (std::isnan(kc[q]) || kc[q] == 0.0 || kc[q] == 1.0) TEST_CHECK_SAME(ke[q], kc[q], "%s: k[%zu]", w, q);
  }
  const std::vector<double> ge = values(g_emu), gc = values(g_cpu);
  const double tol = output_tol(g_cpu.scalar_type());
  for (size_t e = 0; e < gc.size(); ++e) {
    const double kq = kc[e % C];
    if (std::isnan(kq) || kq == 0.0 || kq == 1.0) {
      TEST_CHECK_SAME(ge[e], gc[e], "%s: g[%zu] (k = %g)", w, e, kq);
    } else {
      TEST_CHECK_NEAR(ge[e], gc[e], tol, "%s: g[%zu]", w, e);
    }
  }
  TEST_CHECK(nf_emu.item<int64_t>() == nf_cpu.item<int64_t>(), "%s: nonfinite %lld vs %lld", w,
             (long long)nf_emu.item<int64_t>(), (long long)nf_cpu.item<int64_t>());
}

// ---- Cases ---------------------------------------------------------------------------------

struct Setup {
  int64_t B, C, sms;
  at::ScalarType dtype;
  int mode;  // 0 plain, 1 running (float64 buffers, in place), 2 running (float32 buffers), 3 fixed
  double ucb = 0.0;  // > 0: weights from the variances' upper bounds (pass 1b)
};

std::string describe(const char* op, const Setup& s) {
  const char* modes[] = {"plain", "running float64", "running float32", "fixed 0.3"};
  return std::string(op) + " " + c10::toString(s.dtype) + " [" + std::to_string(s.B) + ", " +
         std::to_string(s.C) + "] sms=" + std::to_string(s.sms) + " " + modes[s.mode] +
         " ucb=" + std::to_string(s.ucb);
}

// Running buffers for modes 1 and 2 (one pair; the same seed gives the
// emulated and the CPU op equal pairs), half of them NaN: no data yet.
std::pair<OptTensor, OptTensor> running(const Setup& s, int64_t coords, uint64_t seed) {
  if (s.mode != 1 && s.mode != 2) return {std::nullopt, std::nullopt};
  at::manual_seed(seed);
  at::Tensor r = at::rand({2, coords}, at::kDouble) + 0.5;
  r.index_put_({0, at::indexing::Slice(0, at::indexing::None, 2)}, kNaN);  // no data yet
  if (s.mode == 2) r = r.to(at::kFloat);
  return {r[0].clone(), r[1].clone()};
}

void case_ivw(const Setup& s) {
  const std::string what = describe("ivw_combine", s);
  at::manual_seed(s.B * 7919 + s.C);
  const at::Tensor col = at::arange(s.C, at::kDouble) * 0.3;
  at::Tensor lr = (at::randn({s.B, s.C}, at::kDouble) * (1 + at::arange(s.C) % 3) + col).to(s.dtype);
  at::Tensor rp = (at::randn({s.B, s.C}, at::kDouble) * 0.8 + col).to(s.dtype);
  if (s.C >= 4) {  // both estimators bad, LR bad, RP constant
    lr.index_put_({s.B / 2, 1}, kInf);
    rp.index_put_({s.B / 2, 1}, -kInf);
    lr.index_put_({s.B - 1, 2}, kNaN);
    rp.select(1, 3).fill_(1.5);
  }
  const std::optional<double> fixed = s.mode == 3 ? std::optional<double>(0.3) : std::nullopt;
  const auto [e_lr, e_rp] = running(s, s.C, s.B + s.C);
  const auto [c_lr, c_rp] = running(s, s.C, s.B + s.C);
  const auto [ge, ke, le, re, ne] =
      tpx::ivw_combine_impl(EmuRunner{s.sms}, lr, rp, e_lr, e_rp, 0.9, fixed, s.ucb);
  const auto [gc, kc, lc, rc, nc] = cpu_ivw(lr, rp, c_lr, c_rp, 0.9, fixed, s.ucb);
  compare(what, ge, gc, ke, kc, le, lc, re, rc, ne, nc, s.C);
  if (e_lr) {
    TEST_CHECK(at::allclose(*e_lr, *c_lr, 1e-10, 0.0, /*equal_nan=*/true) &&
                   at::allclose(*e_rp, *c_rp, 1e-10, 0.0, true),
               "%s: running statistics differ", what.c_str());
  }
}

void case_gaussian(const Setup& s, int64_t invalid_at = -1) {
  std::string what = describe("gaussian_tpx_backward", s);
  const int64_t B = s.B, D = s.C;
  at::manual_seed(B * 104729 + D);
  const at::Tensor d = at::randn({B, D}, at::kDouble).to(s.dtype);
  const at::Tensor eps = at::randn({B, D}, at::kDouble).to(s.dtype);
  at::Tensor sigma = (at::rand({B, D}, at::kDouble) * 1.7 + 0.3).to(s.dtype);
  const at::Tensor adv = at::arange(B, at::kDouble).remainder(7) + 0.5 + at::randn({B}, at::kDouble);
  if (invalid_at >= 0) {
    sigma.view(-1).index_put_({invalid_at}, invalid_at % 2 ? kNaN : -1.0);
    what += " sigma[" + std::to_string(invalid_at) + "] invalid";
  }
  const std::optional<double> fixed = s.mode == 3 ? std::optional<double>(0.3) : std::nullopt;
  const auto [e_lr, e_rp] = running(s, 2 * D, B + D);
  const auto [c_lr, c_rp] = running(s, 2 * D, B + D);
  if (invalid_at >= 0) {
    const at::Tensor before = e_lr->clone();
    bool threw = false;
    try {
      tpx::gaussian_tpx_backward_impl(EmuRunner{s.sms}, d, eps, sigma, adv, e_lr, e_rp, 0.5, fixed,
                                      true, s.ucb);
    } catch (const c10::Error& e) {
      threw = std::string(e.what_without_backtrace()).find("sigma") != std::string::npos;
    }
    TEST_CHECK(threw, "%s: no c10::Error naming sigma", what.c_str());
    TEST_CHECK(at::equal(e_lr->isnan(), before.isnan()) &&
                   at::equal(e_lr->nan_to_num(), before.nan_to_num()),
               "%s: running statistics changed", what.c_str());
    return;
  }
  const auto [gme, gse, ke, le, re, ne] =
      tpx::gaussian_tpx_backward_impl(EmuRunner{s.sms}, d, eps, sigma, adv, e_lr, e_rp, 0.5, fixed,
                                      true, s.ucb);
  const auto [gmc, gsc, kc, lc, rc, nc] =
      cpu_gaussian(d, eps, sigma, adv, c_lr, c_rp, 0.5, fixed, true, s.ucb);
  compare(what, at::cat({gme, gse}, 1), at::cat({gmc, gsc}, 1), ke, kc, le, lc, re, rc, ne, nc,
          2 * D);
  if (e_lr) {
    TEST_CHECK(at::allclose(*e_lr, *c_lr, 1e-10, 0.0, true) &&
                   at::allclose(*e_rp, *c_rp, 1e-10, 0.0, true),
               "%s: running statistics differ", what.c_str());
  }
}

// gaussian_tpx_comoments: the emulated CUDA kernels behind the host driver
// against the CPU op. Both accumulate in float64 from the same values, in
// different orders: entries agree to 1e-12 of their scale sqrt(var_a var_b),
// the bounds to 1e-12, the non-finite pattern and exact zeros exactly.
void case_comoments(int64_t B, int64_t D, int64_t groups, int64_t sms, at::ScalarType dtype,
                    double ucb, bool special) {
  const std::string what = "gaussian_tpx_comoments " + std::string(c10::toString(dtype)) + " [" +
                           std::to_string(B) + ", " + std::to_string(D) + "] groups=" +
                           std::to_string(groups) + " sms=" + std::to_string(sms) +
                           " ucb=" + std::to_string(ucb) + (special ? " special" : "");
  const char* w = what.c_str();
  at::manual_seed(B * 7907 + D * 13 + groups);
  at::Tensor d = at::randn({B, D}, at::kDouble);
  at::Tensor eps = at::randn({B, D}, at::kDouble);
  at::Tensor sigma = at::rand({B, D}, at::kDouble) * 1.7 + 0.3;
  const at::Tensor adv = at::randn({B}, at::kDouble).to(at::kFloat);
  if (special && D >= 3) {
    d.index_put_({B / 2, 0}, kInf);       // RP of mu_0: not finite
    eps.index_put_({B - 1, 1}, kNaN);     // LR of mu_1: not finite
    d.select(1, 2).fill_(2.5);            // RP of mu_2: constant
  }
  d = d.to(dtype), eps = eps.to(dtype), sigma = sigma.to(dtype);
  // Non-contiguous inputs: the host driver makes them contiguous.
  const at::Tensor d_t = d.t().contiguous().t();
  const auto [ce, be, fe] =
      tpx::gaussian_tpx_comoments_impl(EmuRunner{sms}, d_t, eps, sigma, adv, groups, ucb);
  const auto [cc, bc, fc] = cpu_comoments(d, eps, sigma, adv, groups, ucb);
  const int64_t K = 2 * groups * D;
  TEST_CHECK(ce.sizes() == at::IntArrayRef({K, K}) && be.numel() == K && fe.numel() == K &&
                 fe.scalar_type() == at::kBool && ce.scalar_type() == at::kDouble,
             "%s: output shapes or dtypes", w);
  TEST_CHECK(at::equal(fe, fc), "%s: finite differs", w);
  const std::vector<double> cv = values(ce), cw = values(cc), bv = values(be), bw = values(bc);
  for (int64_t a = 0; a < K; ++a) {
    TEST_CHECK(tpx_test::same(bv[a], bw[a]) || std::fabs(bv[a] - bw[a]) <= 1e-12 * std::fabs(bw[a]),
               "%s: bound[%lld] = %.17g vs %.17g", w, (long long)a, bv[a], bw[a]);
    for (int64_t b = 0; b < K; ++b) {
      const double x = cv[a * K + b], y = cw[a * K + b];
      const double scale = std::sqrt(std::fabs(cw[a * K + a] * cw[b * K + b]));
      TEST_CHECK(tpx_test::same(x, y) || std::fabs(x - y) <= 1e-12 * scale,
                 "%s: cov(%lld, %lld) = %.17g vs %.17g", w, (long long)a, (long long)b, x, y);
      if (y == 0.0 || std::isinf(y)) TEST_CHECK_SAME(x, y, "%s: cov(%lld, %lld)", w, (long long)a, (long long)b);
    }
  }
}

}  // namespace

// Every dtype and mode on shapes with one row chunk (sms = 1) and with
// several (7, 132 SMs), both ops; then an invalid sigma; then
// gaussian_tpx_comoments, every dtype, groups 1 and 2, ucb 0 and 2.
int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  std::printf("test_cuda_emulated_ops\n");
  const int64_t shapes[][3] = {{1, 1, 1}, {3, 6, 132}, {17, 257, 7}, {257, 60, 132}, {2500, 6, 7}};
  const at::ScalarType dtypes[] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};
  int cases = 0;
  for (const auto& [B, C, sms] : shapes) {
    for (int t = 0; t < 4; ++t) {
      // ucb 2 on every other case: each dtype and mode meets it across the shapes.
      const double ucb = (t + cases / 8) % 2 ? 2.0 : 0.0;
      case_ivw(Setup{B, C, sms, dtypes[t], (t + cases) % 4, ucb});
      case_gaussian(Setup{B, C, sms, dtypes[t], (t + cases + 1) % 4, 2.0 - ucb});
      cases += 2;
    }
  }
  for (const auto& [B, C, sms] : shapes) {
    case_gaussian(Setup{B, C, sms, at::kFloat, 1, 2.0}, B * C - 1);
    case_gaussian(Setup{B, C, sms, at::kDouble, 1}, 0);
    cases += 2;
  }
  const int64_t co_shapes[][3] = {{1, 3, 1}, {2, 1, 7}, {33, 5, 7}, {257, 30, 132}, {1000, 6, 1}};
  for (const auto& [B, D, sms] : co_shapes) {
    for (int t = 0; t < 4; ++t) {  // each (groups, ucb) once per shape, special with both groups
      case_comoments(B, D, 1 + (t + t / 2) % 2, sms, dtypes[t], (t % 2) * 2.0, t >= 2);
      ++cases;
    }
  }
  std::printf("test_cuda_emulated_ops: %d cases, emulated CUDA kernels agree with the CPU op\n",
              cases);
  return 0;
}
