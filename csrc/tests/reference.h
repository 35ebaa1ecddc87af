// The float64 reference the C++ tests compare the ops and kernels with,
// written from the spec (docs/TPX.md sec. 1-3), independent of tpx_math.h,
// and the checks of a result against it. Plain C++ on std::vector<double>:
// test_ops (through the dispatcher) and the CUDA emulation test (the device
// code on the CPU) share it.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "check.h"

namespace tpx_test {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- Naive float64 reference ------------------------------------------------

struct Reference {
  std::vector<double> g;  // [B, C] combined gradient
  std::vector<double> k, var_lr, var_rp;
  int64_t nonfinite = 0;
};

// Two-pass, on the data shifted by their first row (as tpx_ext.reference
// does), so that a constant column has variance exactly 0 whatever its
// magnitude. +inf for a column with a non-finite entry, and for one whose
// variance is not representable in double (finite float64 inputs whose
// spread is beyond ~1e154).
inline double column_variance(const std::vector<double>& x, int64_t B, int64_t C, int64_t j) {
  const double x0 = x[j];
  double sum = 0.0;
  for (int64_t i = 0; i < B; ++i) {
    if (!std::isfinite(x[i * C + j])) return kInf;
    sum += x[i * C + j] - x0;
  }
  if (B < 2) return 0.0;
  const double mean = sum / static_cast<double>(B);
  double q = 0.0;
  for (int64_t i = 0; i < B; ++i) q += (x[i * C + j] - x0 - mean) * (x[i * C + j] - x0 - mean);
  const double var = q / static_cast<double>(B - 1);
  return std::isfinite(var) ? var : kInf;
}

// The variance's upper bound of TPX.md sec. 2: var (1 + ucb sqrt(max(m4 /
// var^2 - 1, 0) / B)), m4 = (1/B) sum (x - mean)^4, in long double (whose
// range holds 4th powers of any double); var itself where ucb = 0, B < 2 or
// var is 0 or not finite.
inline double column_bound(const std::vector<double>& x, int64_t B, int64_t C, int64_t j,
                           double var, double ucb) {
  if (ucb == 0.0 || B < 2 || !(var > 0.0) || !std::isfinite(var)) return var;
  long double mean = 0.0L;
  for (int64_t i = 0; i < B; ++i) mean += x[i * C + j];
  mean /= B;
  long double m4 = 0.0L;
  for (int64_t i = 0; i < B; ++i) {
    const long double d = x[i * C + j] - mean;
    m4 += d * d * d * d;
  }
  m4 /= B;
  const long double excess = std::fmax(m4 / (static_cast<long double>(var) * var) - 1.0L, 0.0L);
  return static_cast<double>(var * (1.0L + ucb * std::sqrt(excess / B)));
}

// lr, rp: [B, C] per-sample gradients. running: per-column EMA (NaN: no data
// yet), updated in place, or null. fixed_k < 0: inverse-variance weighting,
// from the variances' upper bounds where ucb > 0 (column_bound).
inline Reference reference(const std::vector<double>& lr, const std::vector<double>& rp, int64_t B,
                    int64_t C, std::vector<double>* run_lr, std::vector<double>* run_rp,
                    double momentum, double fixed_k, double ucb = 0.0) {
  Reference r;
  r.g.assign(B * C, 0.0);
  if (fixed_k >= 0.0) ucb = 0.0;
  for (int64_t j = 0; j < C; ++j) {
    const double var_lr = column_variance(lr, B, C, j), var_rp = column_variance(rp, B, C, j);
    double v_lr = column_bound(lr, B, C, j, var_lr, ucb);
    double v_rp = column_bound(rp, B, C, j, var_rp, ucb);
    auto smooth = [&](double var, double& run) {
      if (!std::isfinite(var)) return var;
      run = std::isnan(run) ? var : momentum * run + (1.0 - momentum) * var;
      return run;
    };
    if (run_lr) {
      v_lr = smooth(v_lr, (*run_lr)[j]);
      v_rp = smooth(v_rp, (*run_rp)[j]);
    }
    const bool both_bad = std::isinf(var_lr) && std::isinf(var_rp);
    double k;
    if (fixed_k >= 0.0) {
      k = fixed_k;
    } else if (both_bad) {
      k = kNaN;
    } else if (v_lr == v_rp) {
      k = 0.5;
    } else if (std::isinf(v_lr)) {
      k = 0.0;
    } else if (std::isinf(v_rp)) {
      k = 1.0;
    } else {
      k = static_cast<double>(static_cast<long double>(v_rp) /
                              (static_cast<long double>(v_lr) + static_cast<long double>(v_rp)));
    }
    r.k.push_back(k);
    r.var_lr.push_back(var_lr);
    r.var_rp.push_back(var_rp);
    r.nonfinite += both_bad;
    for (int64_t i = 0; i < B; ++i) {
      const double a = lr[i * C + j], b = rp[i * C + j];
      r.g[i * C + j] = std::isnan(k) ? 0.0 : k == 0.0 ? b : k == 1.0 ? a : k * a + (1.0 - k) * b;
    }
  }
  return r;
}

// Per-sample gradients of x = mu + sigma * eps (TPX.md sec. 1), as [B, 2D]
// (columns mu_0..mu_D, then sigma_0..sigma_D).
inline void gaussian_grads(const std::vector<double>& d, const std::vector<double>& eps,
                           const std::vector<double>& sigma, const std::vector<double>& adv,
                           int64_t B, int64_t D, std::vector<double>* lr,
                           std::vector<double>* rp) {
  lr->assign(B * 2 * D, 0.0);
  rp->assign(B * 2 * D, 0.0);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t j = 0; j < D; ++j) {
      const double dv = d[i * D + j], e = eps[i * D + j], s = sigma[i * D + j];
      // A / sigma first, as the kernels round it: where k is 0 or 1 an op
      // returns one estimator's per-sample gradient exactly, and then it is
      // this one.
      const double a_over_s = adv[i] / s;
      (*lr)[i * 2 * D + j] = a_over_s * e;
      (*lr)[i * 2 * D + D + j] = a_over_s * (e * e - 1.0);
      (*rp)[i * 2 * D + j] = dv;
      (*rp)[i * 2 * D + D + j] = dv * e;
    }
  }
}

// ---- Co-moments (gaussian_tpx_comoments) -------------------------------------------

struct ComomentReference {
  std::vector<double> cov;    // [K, K]
  std::vector<double> bound;  // [K]
  std::vector<char> finite;   // [K]
};

// z [B, K] of a Gaussian node (tpx_ext.reference.gaussian_comoments): the LR
// gradients of the first `groups` coordinate groups (mu, then sigma), then
// the RP ones, from gaussian_grads (A / sigma first, as the kernels).
inline std::vector<double> comoment_columns(const std::vector<double>& d,
                                            const std::vector<double>& eps,
                                            const std::vector<double>& sigma,
                                            const std::vector<double>& adv, int64_t B, int64_t D,
                                            int64_t groups) {
  std::vector<double> lr, rp;
  gaussian_grads(d, eps, sigma, adv, B, D, &lr, &rp);
  const int64_t GC = groups * D, K = 2 * GC;
  std::vector<double> z(B * K);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t q = 0; q < GC; ++q) {
      z[i * K + q] = lr[i * 2 * D + q];
      z[i * K + GC + q] = rp[i * 2 * D + q];
    }
  }
  return z;
}

// The unbiased covariance of z [B, K], two-pass on the data shifted by their
// first row (a constant column has exactly zero covariance); a column with a
// non-finite entry (column_variance +inf) has +inf on the diagonal and 0 in
// the rest of its row and column; B = 1: zeros. bound: column_bound of each
// column's variance, +inf where not finite.
inline ComomentReference comoment_reference(const std::vector<double>& z, int64_t B, int64_t K,
                                            double ucb) {
  ComomentReference r;
  r.cov.assign(K * K, 0.0);
  r.bound.assign(K, 0.0);
  r.finite.assign(K, 0);
  std::vector<double> mean(K, 0.0);
  for (int64_t a = 0; a < K; ++a) {
    const double var = column_variance(z, B, K, a);
    r.finite[a] = std::isfinite(var);
    r.bound[a] = r.finite[a] ? column_bound(z, B, K, a, var, ucb) : kInf;
    if (!r.finite[a]) continue;
    double sum = 0.0;
    for (int64_t i = 0; i < B; ++i) sum += z[i * K + a] - z[a];
    mean[a] = sum / static_cast<double>(B);
  }
  for (int64_t a = 0; a < K; ++a) {
    for (int64_t b = 0; b < K; ++b) {
      if (!r.finite[a] || !r.finite[b]) {
        r.cov[a * K + b] = a == b ? kInf : 0.0;
        continue;
      }
      if (B < 2) continue;
      double q = 0.0;
      for (int64_t i = 0; i < B; ++i)
        q += (z[i * K + a] - z[a] - mean[a]) * (z[i * K + b] - z[b] - mean[b]);
      r.cov[a * K + b] = q / static_cast<double>(B - 1);
    }
  }
  return r;
}

// One op result (cov [K, K], bound [K], finite [K] as 0/1) against the
// reference: the non-finite pattern and the zero rows of constant columns
// exactly, the symmetry exactly, entries to tol relative to their scale
// sqrt(var_a var_b), bounds to tol relative. `constant`: columns known to be
// constant, whose finite rows and columns must be exactly 0.
inline void compare_comoments(const char* what, const std::vector<double>& cov,
                              const std::vector<double>& bound, const std::vector<char>& finite,
                              const ComomentReference& ref, int64_t K, double tol,
                              const std::vector<int64_t>& constant = {}) {
  TEST_CHECK(static_cast<int64_t>(cov.size()) == K * K && static_cast<int64_t>(bound.size()) == K,
             "%s", what);
  for (int64_t a = 0; a < K; ++a) {
    TEST_CHECK(finite[a] == ref.finite[a], "%s: finite[%lld] = %d, expected %d", what,
               (long long)a, finite[a], ref.finite[a]);
    TEST_CHECK(same(bound[a], ref.bound[a]) || std::fabs(bound[a] - ref.bound[a]) <= tol * std::fabs(ref.bound[a]),
               "%s: bound[%lld] = %.17g, expected %.17g", what, (long long)a, bound[a], ref.bound[a]);
  }
  for (int64_t a = 0; a < K; ++a) {
    for (int64_t b = 0; b < K; ++b) {
      const double got = cov[a * K + b], want = ref.cov[a * K + b];
      TEST_CHECK_SAME(got, cov[b * K + a], "%s: cov not symmetric at (%lld, %lld)", what,
                      (long long)a, (long long)b);
      if (!ref.finite[a] || !ref.finite[b]) {
        TEST_CHECK_SAME(got, want, "%s: cov(%lld, %lld) of a non-finite column", what,
                        (long long)a, (long long)b);
        continue;
      }
      const double scale = std::sqrt(ref.cov[a * K + a] * ref.cov[b * K + b]);
      TEST_CHECK(std::fabs(got - want) <= tol * scale || got == want,
                 "%s: cov(%lld, %lld) = %.17g, expected %.17g (scale %.3g, tol %g)", what,
                 (long long)a, (long long)b, got, want, scale, tol);
    }
  }
  for (int64_t c : constant) {
    for (int64_t b = 0; b < K; ++b) {
      if (!ref.finite[b]) continue;
      TEST_CHECK(cov[c * K + b] == 0.0, "%s: cov(%lld, %lld) = %.17g of a constant column", what,
                 (long long)c, (long long)b, cov[c * K + b]);
    }
  }
}

// ---- Checks against the reference ------------------------------------------------

// Compares one op result (as float64 values: g [B, C], k / var_lr / var_rp
// [C], the non-finite count) with the reference; tol: the combined
// gradient's relative tolerance in its dtype. The per-coordinate statistics
// are float64 whatever the input dtype; k = 0/1/NaN must be exact, and then
// so must the combined gradient (one estimator reproduced, or 0).
inline void compare_values(const char* what, const std::vector<double>& gv,
                           const std::vector<double>& kv, const std::vector<double>& vl,
                           const std::vector<double>& vr, int64_t nonfinite, const Reference& ref,
                           const std::vector<double>& lr, const std::vector<double>& rp, int64_t C,
                           double tol) {
  TEST_CHECK(static_cast<int64_t>(kv.size()) == C && gv.size() == ref.g.size(), "%s", what);
  for (int64_t j = 0; j < C; ++j) {
    TEST_CHECK_NEAR(vl[j], ref.var_lr[j], 1e-10, "%s: var_lr column %lld", what, (long long)j);
    TEST_CHECK_NEAR(vr[j], ref.var_rp[j], 1e-10, "%s: var_rp column %lld", what, (long long)j);
    TEST_CHECK_NEAR(kv[j], ref.k[j], 1e-10, "%s: k column %lld", what, (long long)j);
    const bool exact = std::isnan(ref.k[j]) || ref.k[j] == 0.0 || ref.k[j] == 1.0;
    if (exact) TEST_CHECK_SAME(kv[j], ref.k[j], "%s: k column %lld", what, (long long)j);
  }
  for (size_t q = 0; q < gv.size(); ++q) {
    const double kj = ref.k[q % C];
    if (std::isnan(kj)) {
      TEST_CHECK_SAME(gv[q], 0.0, "%s: g[%zu] of a zeroed coordinate", what, q);
    } else if (kj == 0.0) {
      TEST_CHECK_SAME(gv[q], rp[q], "%s: g[%zu] must be g_rp exactly (k = 0)", what, q);
    } else if (kj == 1.0) {
      TEST_CHECK_SAME(gv[q], lr[q], "%s: g[%zu] must be g_lr exactly (k = 1)", what, q);
    } else {
      // Given the k the op returned (checked above against the reference),
      // g is k * lr + (1 - k) * rp up to rounding to the output dtype.
      const double kk = kv[q % C];
      const double expect = kk * lr[q] + (1.0 - kk) * rp[q];
      const double scale = std::fmax(1.0, std::fabs(kk * lr[q]) + std::fabs((1.0 - kk) * rp[q]));
      if (!std::isfinite(expect)) {  // fixed_weight mode passes an inf through
        TEST_CHECK_SAME(gv[q], expect, "%s: g[%zu]", what, q);
        continue;
      }
      TEST_CHECK(std::fabs(gv[q] - expect) <= tol * scale, "%s: g[%zu] = %.17g, expected %.17g",
                 what, q, gv[q], expect);
      TEST_CHECK_NEAR(gv[q], ref.g[q], 1e3 * tol, "%s: g[%zu] vs reference", what, q);
    }
  }
  TEST_CHECK(nonfinite == ref.nonfinite, "%s: nonfinite %lld vs %lld", what, (long long)nonfinite,
             (long long)ref.nonfinite);
}

// Running variances after a call, against the reference's.
inline void check_running_values(const std::string& what, const std::vector<double>& got_lr,
                                 const std::vector<double>& got_rp,
                                 const std::vector<double>& ref_lr,
                                 const std::vector<double>& ref_rp, double tol) {
  for (size_t j = 0; j < got_lr.size(); ++j) {
    TEST_CHECK_NEAR(got_lr[j], ref_lr[j], tol, "%s: running_var_lr[%lld]", what.c_str(),
                    (long long)j);
    TEST_CHECK_NEAR(got_rp[j], ref_rp[j], tol, "%s: running_var_rp[%lld]", what.c_str(),
                    (long long)j);
  }
}

// ---- Inputs ------------------------------------------------------------------------

// Random per-sample gradients with a different scale per column, so that k
// varies across (0, 1).
inline void fill(std::vector<double>& v, int64_t B, int64_t C, std::mt19937_64& rng, double scale) {
  std::normal_distribution<double> normal;
  v.resize(B * C);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t j = 0; j < C; ++j) v[i * C + j] = 0.3 * j + normal(rng) * scale * (1.0 + j % 3);
}

// d, eps ~ N(0, 1) and sigma ~ U(sigma_lo, 2) for one Gaussian node of B x C.
inline void fill_node(std::vector<double>& d, std::vector<double>& eps,
                      std::vector<double>& sigma, int64_t B, int64_t C, std::mt19937_64& rng,
                      double sigma_lo) {
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(sigma_lo, 2.0);
  d.resize(B * C), eps.resize(B * C), sigma.resize(B * C);
  for (auto& v : d) v = normal(rng);
  for (auto& v : eps) v = normal(rng);
  for (auto& v : sigma) v = uniform(rng);
}

}  // namespace tpx_test
