// The math of a TPX node's backward that the CPU and CUDA kernels share.
//
// Everything here is a plain function usable on host and device, so the CPU
// tests exercise exactly the code the GPU runs. Spec: docs/TPX.md sec. 1-3.
//
// Vocabulary (see docs/tensor_shapes.md):
//   B      batch size (independent samples at one node)
//   C      coordinates per group (D for a Gaussian node)
//   G      groups of coordinates produced per element (1 for ivw_combine,
//          2 for a Gaussian node: the mu and the sigma coordinates)
//   a "coordinate" is one column of one group; there are G*C of them and
//   each has one LR weight k.
//
// Statistics are accumulated in double whatever the input dtype: per-sample
// gradients of 1e30 (exploding RP chains) square to 1e60, far beyond float32.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TPX_HD __host__ __device__ __forceinline__
#else
#define TPX_HD inline
#endif

namespace tpx {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Branch-free finiteness test (inf - inf and NaN - NaN are NaN); vectorises.
TPX_HD bool is_finite(double x) { return (x - x) == 0.0; }

// One Welford step for a value that is the n-th of its stream (inv_n = 1/n).
// Pure arithmetic so that loops over columns vectorise: a non-finite value
// makes mean/m2 non-finite for good (inf - inf = NaN propagates), which is
// how a bad stream is recognised afterwards (moments_bad).
// m2 uses delta^2 (n-1)/n (= delta * (x - new mean)), so only the mean is on
// the loop-carried dependency chain; delta * (delta * w), not delta^2 * w, so
// that w = 0 (first sample) never meets an infinite delta^2 (|x| > 1.3e154).
TPX_HD void welford_add(double x, double inv_n, double& mean, double& m2) {
  const double delta = x - mean;
  mean += delta * inv_n;
  m2 += delta * (delta * (1.0 - inv_n));
}

// Two values at once, the (n+1)-th and (n+2)-th of a stream that holds n:
// they are paired first, then Chan-merged in (w_mean = 2 / (n + 2),
// w_m2 = 2n / (n + 2)). Half the dependency chain of two welford_add calls.
TPX_HD void welford_add_pair(double x1, double x2, double w_mean, double w_m2, double& mean,
                             double& m2) {
  const double d12 = x1 - x2;
  const double delta = 0.5 * (x1 + x2) - mean;
  mean += delta * w_mean;
  m2 += 0.5 * d12 * d12 + delta * (delta * w_m2);
}

// Chan et al. merge of stream b (n_b samples) into stream a (n_a samples).
TPX_HD void chan_merge(double n_a, double& mean_a, double& m2_a, double n_b, double mean_b,
                       double m2_b) {
  if (n_b == 0.0) return;
  const double n = n_a + n_b;
  const double delta = mean_b - mean_a;
  mean_a += delta * (n_b / n);
  // delta * (delta * w), not delta * delta * w: merging into an empty stream
  // (w = 0) must not turn a mean beyond sqrt(DBL_MAX) into inf * 0 = NaN.
  m2_a += m2_b + delta * (delta * (n_a * n_b / n));
}

// A stream is bad when it saw a non-finite sample, or when its moments
// overflowed double (finite float64 inputs near 1e154 and beyond): either
// way its variance is not representable and it is treated as +inf.
TPX_HD bool moments_bad(double mean, double m2) { return !(is_finite(mean) && is_finite(m2)); }

// Unbiased batch variance; +inf for a stream with a non-finite sample.
// One sample carries no information about spread: variance 0.
TPX_HD double batch_variance(double m2, double n, bool bad) {
  if (bad) return kInf;
  return n > 1.0 ? fmax(m2, 0.0) / (n - 1.0) : 0.0;
}

// Folds a batch variance into a running (EMA) variance and returns the
// variance that enters the weight. NaN in `running` means "no data yet".
// Only finite batch variances update the running value, so one exploding
// batch does not poison the statistics forever; that batch itself still
// uses +inf for the estimator that exploded.
TPX_HD double smoothed_variance(double batch_var, double& running, double momentum) {
  if (!is_finite(batch_var)) return batch_var;
  running = (running != running) ? batch_var : momentum * running + (1.0 - momentum) * batch_var;
  return running;
}

// Inverse-variance weight on LR: k = v_rp / (v_lr + v_rp), in [0, 1].
// Both zero (or both +inf) -> 0.5; +inf on one side -> all weight on the other.
// Written as 1 / (1 + v_lr / v_rp) so that variances near the double range
// do not overflow in the sum.
TPX_HD double lr_weight(double v_lr, double v_rp) {
  if (v_lr == v_rp) return 0.5;
  if (v_rp == kInf || v_lr == 0.0) return 1.0;
  if (v_lr == kInf || v_rp == 0.0) return 0.0;
  return 1.0 / (1.0 + v_lr / v_rp);
}

// Per coordinate: merged moments -> weight, variances for logging, running
// stats update. Returns k, or NaN when both estimators had a non-finite
// sample in IVW mode (the coordinate's combined gradient is then 0).
// fixed_k >= 0 bypasses the weighting (mix mode; rp/lr are k = 0/1).
struct CoordinateResult {
  double k;
  double var_lr;
  double var_rp;
  bool both_bad;
};

TPX_HD CoordinateResult coordinate_weight(double n, double m2_lr, bool bad_lr, double m2_rp,
                                          bool bad_rp, bool has_running, double& run_lr,
                                          double& run_rp, double momentum, double fixed_k) {
  CoordinateResult r;
  r.var_lr = batch_variance(m2_lr, n, bad_lr);
  r.var_rp = batch_variance(m2_rp, n, bad_rp);
  r.both_bad = bad_lr && bad_rp;
  double v_lr = r.var_lr, v_rp = r.var_rp;
  if (has_running) {
    v_lr = smoothed_variance(r.var_lr, run_lr, momentum);
    v_rp = smoothed_variance(r.var_rp, run_rp, momentum);
  }
  if (fixed_k >= 0.0) {
    r.k = fixed_k;
  } else {
    r.k = r.both_bad ? kNaN : lr_weight(v_lr, v_rp);
  }
  return r;
}

// Combined per-sample gradient. k == 0 and k == 1 return one estimator
// exactly (so rp/lr are reproduced and the discarded estimator's inf/NaN
// never leaks through 0 * inf); NaN k means "zero this coordinate". Written
// as two masked terms, without branches, so the CPU loop vectorises.
TPX_HD double combine(double k, double g_lr, double g_rp) {
  const bool use_lr = (k != 0.0) & (k == k);
  const bool use_rp = (k != 1.0) & (k == k);
  const double t_lr = use_lr ? k * g_lr : 0.0;
  const double t_rp = use_rp ? (1.0 - k) * g_rp : 0.0;
  return t_lr + t_rp;
}

// ---------------------------------------------------------------------------
// Element sources: what an op reads at (row i, column j) and writes back.
// Both backends loop over (i, j) and call these; nothing else differs.

template <typename T>
TPX_HD double load(const T* p, int64_t idx) {
  return static_cast<double>(static_cast<float>(p[idx]));
}
template <>
TPX_HD double load<double>(const double* p, int64_t idx) {
  return p[idx];
}

template <typename T>
TPX_HD T store_cast(double x) {
  return static_cast<T>(static_cast<float>(x));
}
template <>
TPX_HD double store_cast<double>(double x) {
  return x;
}

// A source addresses elements by their flat index e = i * C + j into the
// contiguous [B, C] inputs; `row` is row_value(i), the per-row input (the
// advantage of a Gaussian node), hoisted so the CPU loop over a block of
// rows stays a flat, vectorisable loop.

// ivw_combine: the per-sample LR and RP gradients are given. G = 1.
template <typename T>
struct IvwSource {
  static constexpr int G = 1;
  const T* g_lr;
  const T* g_rp;
  T* out;

  TPX_HD double row_value(int64_t) const { return 0.0; }
  TPX_HD void read(int64_t e, double, double* lr, double* rp) const {
    lr[0] = load(g_lr, e);
    rp[0] = load(g_rp, e);
  }
  TPX_HD bool valid(int64_t) const { return true; }
  TPX_HD void write(int64_t e, const double* g) const { out[e] = store_cast<T>(g[0]); }
};

// One Gaussian node x = mu + sigma * eps (TPX.md sec. 1). G = 2: group 0 is
// the mu coordinates, group 1 the sigma coordinates.
//   RP:  d,                   d * eps
//   LR:  A * eps / sigma,     A * (eps^2 - 1) / sigma
template <typename T>
struct GaussianSource {
  static constexpr int G = 2;
  const T* d;
  const T* eps;
  const T* sigma;
  const double* adv;  // [B], converted to double by the host code
  T* grad_mu;
  T* grad_sigma;

  TPX_HD double row_value(int64_t i) const { return adv[i]; }
  TPX_HD void read(int64_t e, double a, double* lr, double* rp) const {
    const double dv = load(d, e), x = load(eps, e), s = load(sigma, e);
    const double a_over_s = a / s;
    lr[0] = a_over_s * x;
    rp[0] = dv;
    lr[1] = a_over_s * (x * x - 1.0);
    rp[1] = dv * x;
  }
  // sigma must be finite and > 0 (NaN fails both comparisons).
  TPX_HD bool valid(int64_t e) const {
    const double s = load(sigma, e);
    return (s > 0.0) & (s < kInf);  // bitwise: no branch in the vectorised loop
  }
  TPX_HD void write(int64_t e, const double* g) const {
    grad_mu[e] = store_cast<T>(g[0]);
    grad_sigma[e] = store_cast<T>(g[1]);
  }
};

}  // namespace tpx
