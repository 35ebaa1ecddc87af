// The math of a TPX node's backward that the CPU and CUDA kernels share.
//
// Everything here is a plain function usable on host and device, so the CPU
// tests exercise exactly the code the GPU runs. Spec: docs/TPX.md sec. 1-3.
// One difference in precision, not in code: the CPU's pass 2 of bfloat16
// inputs runs the per-sample and combine templates below on floats
// (cpu/tpx_cpu_kernels.inc, "Pass 2 in float"); the GPU runs them in double.
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
#elif defined(__GNUC__)
// Always inlined: the CPU kernel instantiates the templates below on vector
// types inside functions compiled for different ISAs (baseline and AVX2),
// and a vector passed to an out-of-line copy would cross that ABI boundary.
#define TPX_HD inline __attribute__((always_inline))
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

// Shifted block sums: the CPU kernel's accumulation. A stream's state is
// (n, mean, m2). A block of nb further samples is summed relative to the
// stream's current mean (its shift): s1 = sum(y), s2 = sum(y^2), y = x - mean,
// which costs one add and one multiply-add per sample and keeps s1, s2 in
// registers; merge_shifted then folds the block in (Chan's formula with the
// block's mean = shift + s1 / nb and m2 = s2 - s1^2 / nb). Because the shift
// is the stream's own running mean, y is of the order of the spread, not of
// the magnitude, so the subtraction s2 - s1^2 / nb stays well conditioned
// (relative error ~ nb * eps of the stream's variance). The stream starts
// with n = 0 and mean = its first sample, so a constant stream
// has y = 0 exactly and variance exactly 0, and magnitudes beyond
// sqrt(DBL_MAX) never get squared unless the spread is that large (then the
// variance is not representable and the stream turns bad, as with Welford).
// V is double, or on the CPU a vector of doubles (GCC vector extension).
template <typename V>
TPX_HD void shifted_add(V y, V& s1, V& s2) {
  s1 += y;
  s2 += y * y;
}

template <typename V>
TPX_HD void merge_shifted(double n, double nb, V s1, V s2, V& mean, V& m2) {
  const double inv_nb = 1.0 / nb, inv_total = 1.0 / (n + nb), w = n * nb * inv_total;
  const V delta = s1 * inv_nb;  // block mean minus the shift
  mean += s1 * inv_total;       // shift + delta * nb / (n + nb)
  // delta * (delta * w): w = 0 (first block) must not meet an infinite delta^2.
  m2 += (s2 - s1 * delta) + delta * (delta * w);
}

// Merge of k streams that hold n samples each (stream i: mean[i * stride],
// m2[i * stride]): the CPU kernel's lanes of one column. Chan's formula
// with equal counts reduces to a two-pass over the means, here shifted by
// the first one, so that equal means add exactly their m2 (a constant column
// stays exactly 0) and means beyond sqrt(DBL_MAX) are never squared unless
// they differ that much. No division per stream, unlike k - 1 chan_merge.
TPX_HD void merge_equal_streams(const double* mean, const double* m2, int64_t stride, int64_t k,
                                double n, double& mean_out, double& m2_out) {
  const double m0 = mean[0];
  double sum_d = 0.0, sum_m2 = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    sum_d += mean[i * stride] - m0;
    sum_m2 += m2[i * stride];
  }
  const double d_bar = sum_d / static_cast<double>(k);
  double q = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    const double t = (mean[i * stride] - m0) - d_bar;
    q += t * t;
  }
  mean_out = m0 + d_bar;
  m2_out = sum_m2 + n * q;
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

// ---- Upper confidence bounds on the variances (ucb > 0; TPX.md sec. 2) -------------
// With ucb > 0 the weight uses, in place of a batch variance s^2, the bound
//   v = s^2 (1 + ucb sqrt(max(m4 / s^4 - 1, 0) / n)),   m4 = (1/n) sum (x - mean)^4,
// s^2 plus ucb estimated standard errors of it. The 4th moment comes from a
// pass over the batch after the means and variances are known (pass 1b):
// it sums z^2 with z = (x - mean)^2 / s^2, so that m4 / s^4 = sum z^2 / n.
// Standardised this way z <= n - 1, so the sum cannot overflow whatever
// the gradients' magnitude, and the pass merges by plain addition.

// 1 / s^2 for pass 1b; 0 where s^2 is 0, subnormal or not finite (the bound
// is s^2 itself there, whatever the sum).
TPX_HD double inverse_variance_or_zero(double var) {
  const double iv = 1.0 / var;
  return (var > 0.0) & (iv < kInf) ? iv : 0.0;
}

// Adds z^2 of one sample; d * (d * inv_var), not d * d * inv_var, so that a
// deviation beyond sqrt(DBL_MAX) is never squared on its own.
template <typename V>
TPX_HD void standardized_fourth_add(V x, V mean, V inv_var, V& sum_z2) {
  const V d = x - mean;
  const V z = d * (d * inv_var);
  sum_z2 += z * z;
}

// The bound from the batch variance, the sum of z^2 over the n samples and ucb.
TPX_HD double variance_bound(double var, double sum_z2, double n, double ucb) {
  if (!(ucb > 0.0) || !(n > 1.0) || !(var > 0.0) || !is_finite(var)) return var;
  const double excess = fmax(sum_z2 / n - 1.0, 0.0);
  return var * (1.0 + ucb * sqrt(excess / n));
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
// ucb > 0: the weight and the running statistics use the variances' upper
// bounds (sum_z2_*: pass 1b's sums); var_lr / var_rp stay the batch variances.
struct CoordinateResult {
  double k;
  double var_lr;
  double var_rp;
  bool both_bad;
};

struct CoordinateMoments {
  double m2;
  bool bad;
  double sum_z2;  // pass 1b's sum (ucb > 0), else unused
};

TPX_HD CoordinateResult coordinate_weight(double n, CoordinateMoments lr, CoordinateMoments rp,
                                          double ucb, bool has_running, double& run_lr,
                                          double& run_rp, double momentum, double fixed_k) {
  CoordinateResult r;
  r.var_lr = batch_variance(lr.m2, n, lr.bad);
  r.var_rp = batch_variance(rp.m2, n, rp.bad);
  r.both_bad = lr.bad && rp.bad;
  double v_lr = variance_bound(r.var_lr, lr.sum_z2, n, ucb);
  double v_rp = variance_bound(r.var_rp, rp.sum_z2, n, ucb);
  if (has_running) {
    v_lr = smoothed_variance(v_lr, run_lr, momentum);
    v_rp = smoothed_variance(v_rp, run_rp, momentum);
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
// as two masked terms, without branches, so the CPU loop vectorises (V is
// double, or a vector of doubles whose comparisons give lane masks).
template <typename V>
TPX_HD V combine(V k, V g_lr, V g_rp) {
  const V zero{};
  const auto use_lr = (k != 0.0) & (k == k);
  const auto use_rp = (k != 1.0) & (k == k);
  const V t_lr = use_lr ? k * g_lr : zero;
  const V t_rp = use_rp ? (1.0 - k) * g_rp : zero;
  return t_lr + t_rp;
}

// combine() for a weight strictly inside (0, 1), with k_rp = 1 - k given:
// then both terms are used and no masking is needed.
template <typename V>
TPX_HD V mix(V k, V k_rp, V g_lr, V g_rp) {
  return k * g_lr + k_rp * g_rp;
}

// The per-sample gradients of a Gaussian node (TPX.md sec. 1) from
// a_over_s = A / sigma, eps and d:
//   LR:  A * eps / sigma,     A * (eps^2 - 1) / sigma
//   RP:  d,                   d * eps
template <typename V>
TPX_HD void gaussian_per_sample(V a_over_s, V x, V dv, V* lr, V* rp) {
  lr[0] = a_over_s * x;
  rp[0] = dv;
  lr[1] = a_over_s * (x * x - 1.0);
  rp[1] = dv * x;
}

// 1 / s from r0 = the float reciprocal of s (s a float value, in double),
// with one Newton step in double: r0 (2 - s r0). s and r0 have 24-bit
// significands, so s * r0 is exact in double and 2 - s * r0 is exact too
// (Sterbenz), whether or not the compiler fuses it; with r0 = (1 + d) / s,
// |d| <= 2^-24, the result is (1 - d^2) / s rounded once: relative error
// <= 2^-48 + 2^-53 (vs 2^-53 for a correctly rounded 1 / s). Valid while the
// float reciprocal is a normal float: s in [kFastRecipMin, kFastRecipMax)
// (otherwise r0 is 0, inf or subnormal); callers check the range and divide
// outside it.
constexpr double kFastRecipMin = 1.1754943508222875e-38;  // 2^-126
constexpr double kFastRecipMax = 8.507059173023462e37;    // 2^126
template <typename V>
TPX_HD V refine_reciprocal(V s, V r0) {
  return r0 * (2.0 - s * r0);
}

// ---- Co-moments: the joint covariance of a node's per-sample gradients -------------
// gaussian_tpx_comoments (TPX.md sec. 1-2, the matrix weight rules) needs the
// unbiased covariance of z_i = [g_LR,i, g_RP,i] over the batch, K = 2 G C
// columns. The co-moment M_ab = sum_i (z_ia - mean_a)(z_ib - mean_b) is
// accumulated like the variances above: shifted block sums folded into a
// stream (n, mean, M), and streams merged pairwise by Chan et al.'s formula,
//   M = M_a + M_b + dx dy n_a n_b / n,   dx, dy the differences of the means,
// which for a = b is chan_merge. A constant column has y = 0 exactly in every
// sum and delta 0 in every merge, so its row and column of M are exactly 0;
// a non-finite sample makes its column's mean and M_aa non-finite for good
// (moments_bad), and only its own row and column of M (the caller drops them).

// Chan's merge of one co-moment entry: stream b (n_b samples, means mx_b,
// my_b of the two columns, co-moment m_b) into stream a. The a-side means are
// updated too, so a caller that merges a sequence of streams per entry keeps
// them (for a = b pass the same mean twice: the result is chan_merge's).
TPX_HD void comoment_merge(double n_a, double& mx_a, double& my_a, double& m_a, double n_b,
                           double mx_b, double my_b, double m_b) {
  if (n_b == 0.0) return;
  const double n = n_a + n_b, f = n_b / n;
  const double dx = mx_b - mx_a, dy = my_b - my_a;
  mx_a += dx * f;
  my_a += dy * f;
  // dx * (dy * w), as chan_merge: w = 0 must not meet an infinite product.
  m_a += m_b + dx * (dy * (n_a * n_b / n));
}

// Folds a block of nb samples into a co-moment entry m: s1x, s1y are the
// block's sums of the two columns' values relative to the stream's current
// means (its shifts), s2 the sum of their products, n the stream's samples
// before the block. merge_shifted's rule for a co-moment (for x = y it adds
// what merge_shifted adds to m2); the means themselves move on as there:
// mean += s1 / (n + nb). V as in merge_shifted.
template <typename V>
TPX_HD void comoment_add(double n, double nb, V s1x, V s1y, V s2, V& m) {
  const double inv_nb = 1.0 / nb, w = n * nb / (n + nb);
  const V dx = s1x * inv_nb, dy = s1y * inv_nb;  // block means minus the shifts
  m += (s2 - s1x * dy) + dx * (dy * w);
}

// An entry of the output covariance from the merged co-moment m of n samples:
// a column with a non-finite sample (bad) has +inf on the diagonal and 0 in
// the rest of its row and column; otherwise m / (n - 1), 0 for one sample
// (the diagonal is batch_variance's, clamped at 0).
TPX_HD double comoment_covariance(double m, double n, bool bad_x, bool bad_y, bool diagonal) {
  if (diagonal) return batch_variance(m, n, bad_x);
  if (bad_x || bad_y) return 0.0;
  return n > 1.0 ? m / (n - 1.0) : 0.0;
}

// A column's upper confidence bound (variance_bound), +inf where it is bad.
TPX_HD double comoment_bound(double var, bool bad, double sum_z2, double n, double ucb) {
  return bad ? kInf : variance_bound(var, sum_z2, n, ucb);
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
    gaussian_per_sample(a / s, x, dv, lr, rp);
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

// The columns of gaussian_tpx_comoments: z = [g_LR, g_RP] of a Gaussian node
// over its first `groups` coordinate groups (TPX.md sec. 1 table; groups = 1:
// the D mu coordinates, 2: mu then sigma), GC = groups * D columns each, so
// K = 2 GC: column c < GC is LR coordinate c, column GC + c is RP coordinate c.
// Coordinate q is group q / D, column q % D of the [B, D] inputs. Per-sample
// values are formed by gaussian_per_sample from A / sigma, as in GaussianSource.
template <typename T>
struct ComomentSource {
  const T* d;
  const T* eps;
  const T* sigma;
  const double* adv;  // [B], converted to double by the host code
  int64_t D;
  int64_t groups;

  TPX_HD int64_t columns() const { return 2 * groups * D; }

  // z_ic: one column of one sample.
  TPX_HD double value(int64_t i, int64_t c) const {
    const int64_t gc = groups * D;
    const bool rp = c >= gc;
    const int64_t q = rp ? c - gc : c;
    const int g = q >= D ? 1 : 0;
    const int64_t e = i * D + (q - g * D);
    double lr[2], rpv[2];
    gaussian_per_sample(adv[i] / load(sigma, e), load(eps, e), load(d, e), lr, rpv);
    return rp ? rpv[g] : lr[g];
  }

  // z_i: all K columns of sample i into z.
  TPX_HD void row(int64_t i, double* z) const {
    const int64_t gc = groups * D;
    const double a = adv[i];
    for (int64_t j = 0; j < D; ++j) {
      const int64_t e = i * D + j;
      double lr[2], rpv[2];
      gaussian_per_sample(a / load(sigma, e), load(eps, e), load(d, e), lr, rpv);
      for (int64_t g = 0; g < groups; ++g) {
        z[g * D + j] = lr[g];
        z[gc + g * D + j] = rpv[g];
      }
    }
  }
};

}  // namespace tpx
