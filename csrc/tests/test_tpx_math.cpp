// Unit tests of csrc/tpx_math.h, the math the CPU and CUDA kernels share.
// Pure header: no torch. Run by ctest (test_tpx_math).
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "tpx_math.h"

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Moments {
  double n = 0.0, mean = 0.0, m2 = 0.0;
  bool bad = false;
};

// Welford over x[b, e), as the kernels run it within one chunk of rows.
Moments welford(const std::vector<double>& x, size_t b, size_t e) {
  Moments m;
  for (size_t i = b; i < e; ++i) {
    m.n += 1.0;
    tpx::welford_add(x[i], 1.0 / m.n, m.mean, m.m2, m.bad);
  }
  return m;
}

void merge(Moments& a, const Moments& b) {
  tpx::chan_merge(a.n, a.mean, a.m2, a.bad, b.n, b.mean, b.m2, b.bad);
  a.n += b.n;
}

// Two-pass reference in long double.
void two_pass(const std::vector<double>& x, double* mean, double* m2) {
  long double s = 0.0L;
  for (double v : x) s += v;
  const long double mu = s / static_cast<long double>(x.size());
  long double q = 0.0L;
  for (double v : x) q += (v - mu) * (v - mu);
  *mean = static_cast<double>(mu);
  *m2 = static_cast<double>(q);
}

void test_welford_chan() {
  std::mt19937_64 rng(12345);
  std::normal_distribution<double> normal;
  int cases = 0;
  // Scales and offsets, including an offset far larger than the spread
  // (where a naive sum-of-squares formula loses every digit).
  const double scales[] = {1.0, 1e-3, 1e5, 1e150};
  const double offsets[] = {0.0, 3.0, 1e4};
  for (double scale : scales) {
    for (double offset : offsets) {
      for (size_t n = 1; n <= 12; ++n) {
        std::vector<double> x(n);
        for (double& v : x) v = (offset + normal(rng)) * scale;
        double ref_mean, ref_m2;
        two_pass(x, &ref_mean, &ref_m2);
        // Welford's error grows with n and with the condition number of the
        // data, 1 + |mean| / sd; with it, a few ulps of m2 (relative).
        const double sd = std::sqrt(ref_m2 / static_cast<double>(n));
        const double cond = 1.0 + (sd > 0.0 ? std::fabs(ref_mean) / sd : 0.0);
        const double tol = 1e-12;
        const double m2_tol = 8.0 * DBL_EPSILON * static_cast<double>(n) * cond * ref_m2;

        const Moments whole = welford(x, 0, n);
        TEST_CHECK_NEAR(whole.mean, ref_mean, tol, "n=%zu scale=%g offset=%g", n, scale, offset);
        TEST_CHECK(std::fabs(whole.m2 - ref_m2) <= m2_tol, "m2 %.17g vs %.17g n=%zu scale=%g offset=%g",
              whole.m2, ref_m2, n, scale, offset);
        TEST_CHECK(!whole.bad);

        // Two streams split at every position (empty halves included).
        for (size_t s = 0; s <= n; ++s) {
          Moments a = welford(x, 0, s);
          const Moments b = welford(x, s, n);
          merge(a, b);
          TEST_CHECK(a.n == static_cast<double>(n));
          TEST_CHECK_NEAR(a.mean, ref_mean, tol, "n=%zu split=%zu", n, s);
          TEST_CHECK(std::fabs(a.m2 - ref_m2) <= m2_tol, "m2 %.17g vs %.17g n=%zu split=%zu", a.m2,
                ref_m2, n, s);
          ++cases;
        }

        // The CPU kernel's pattern: c chunks (rows n*k/c .. n*(k+1)/c), each
        // merged in turn into the running result of the chunks before it.
        for (size_t c = 1; c <= n; ++c) {
          Moments acc = welford(x, 0, n / c);
          for (size_t k = 1; k < c; ++k) merge(acc, welford(x, n * k / c, n * (k + 1) / c));
          TEST_CHECK(acc.n == static_cast<double>(n));
          TEST_CHECK_NEAR(acc.mean, ref_mean, tol, "n=%zu chunks=%zu", n, c);
          TEST_CHECK(std::fabs(acc.m2 - ref_m2) <= m2_tol, "n=%zu chunks=%zu", n, c);
          const double var = tpx::batch_variance(acc.m2, acc.n, acc.bad);
          const double ref_var = n > 1 ? ref_m2 / (n - 1.0) : 0.0;
          TEST_CHECK(std::fabs(var - ref_var) <= 1.01 * m2_tol / std::fmax(1.0, n - 1.0),
                "var %.17g vs %.17g n=%zu chunks=%zu", var, ref_var, n, c);
          ++cases;
        }
      }
    }
  }
  std::printf("  welford/chan: %d split and chunk cases match the two-pass reference\n", cases);
}

void test_nonfinite_streams() {
  // A non-finite sample marks the stream bad; the accumulators stay finite.
  for (double bad_value : {kInf, -kInf, kNaN}) {
    const std::vector<double> x = {1.0, 2.0, bad_value, 4.0};
    const Moments m = welford(x, 0, x.size());
    TEST_CHECK(m.bad);
    TEST_CHECK(std::isfinite(m.mean) && std::isfinite(m.m2));
    TEST_CHECK(tpx::batch_variance(m.m2, m.n, m.bad) == kInf);
    // Badness survives a merge in either direction.
    Moments good = welford(x, 0, 2), bad = welford(x, 2, 4);
    merge(good, bad);
    TEST_CHECK(good.bad);
    Moments bad2 = welford(x, 2, 4);
    merge(bad2, welford(x, 0, 2));
    TEST_CHECK(bad2.bad);
  }
  // Merging an empty stream changes nothing, even a bad flag already set.
  Moments a = welford({1.0, 5.0}, 0, 2);
  const Moments before = a;
  merge(a, Moments{});
  TEST_CHECK_SAME(a.mean, before.mean);
  TEST_CHECK_SAME(a.m2, before.m2);
  std::printf("  non-finite samples: stream marked bad, variance +inf\n");
}

void test_constant_column() {
  for (double c : {0.0, 0.1, -3.7, 1e-300, 1e10, -1e300}) {
    for (size_t n : {2u, 3u, 7u, 50u}) {
      const std::vector<double> x(n, c);
      const Moments m = welford(x, 0, n);
      TEST_CHECK(m.m2 == 0.0, "c=%g n=%zu m2=%g", c, n, m.m2);
      TEST_CHECK(tpx::batch_variance(m.m2, m.n, m.bad) == 0.0, "c=%g n=%zu", c, n);
      for (size_t s = 0; s <= n; ++s) {
        Moments a = welford(x, 0, s);
        merge(a, welford(x, s, n));
        TEST_CHECK(tpx::batch_variance(a.m2, a.n, a.bad) == 0.0, "c=%g n=%zu split=%zu", c, n, s);
      }
    }
  }
  std::printf("  constant columns: variance exactly 0\n");
}

void test_batch_variance() {
  TEST_CHECK(tpx::batch_variance(0.0, 1.0, false) == 0.0);
  TEST_CHECK(tpx::batch_variance(123.0, 1.0, false) == 0.0);  // one sample: no spread
  TEST_CHECK(tpx::batch_variance(0.0, 0.0, false) == 0.0);
  TEST_CHECK(tpx::batch_variance(6.0, 4.0, false) == 2.0);
  TEST_CHECK(tpx::batch_variance(-1e-18, 4.0, false) == 0.0);  // rounding below 0 is clamped
  TEST_CHECK(tpx::batch_variance(0.0, 1.0, true) == kInf);
  TEST_CHECK(tpx::batch_variance(6.0, 4.0, true) == kInf);
  std::printf("  batch_variance: n=1 -> 0, bad stream -> +inf\n");
}

void test_lr_weight() {
  // Documented special cases. k is the weight on LR: k = v_rp / (v_lr + v_rp).
  TEST_CHECK(tpx::lr_weight(0.0, 0.0) == 0.5);
  TEST_CHECK(tpx::lr_weight(kInf, kInf) == 0.5);
  TEST_CHECK(tpx::lr_weight(3.0, 3.0) == 0.5);
  TEST_CHECK(tpx::lr_weight(kInf, 1.0) == 0.0);  // LR exploded: all weight on RP
  TEST_CHECK(tpx::lr_weight(kInf, 0.0) == 0.0);
  TEST_CHECK(tpx::lr_weight(1.0, kInf) == 1.0);  // RP exploded: all weight on LR
  TEST_CHECK(tpx::lr_weight(0.0, kInf) == 1.0);
  TEST_CHECK(tpx::lr_weight(0.0, 2.0) == 1.0);  // zero-variance LR takes it all
  TEST_CHECK(tpx::lr_weight(2.0, 0.0) == 0.0);
  TEST_CHECK(tpx::lr_weight(1.0, 3.0) == 0.75);
  TEST_CHECK(tpx::lr_weight(3.0, 1.0) == 0.25);

  // Near the top of the double range v_lr + v_rp overflows; the weight must not.
  TEST_CHECK(tpx::lr_weight(1e300, 1e300) == 0.5);
  TEST_CHECK_NEAR(tpx::lr_weight(1e300, 3e300), 0.75, 1e-15);
  TEST_CHECK_NEAR(tpx::lr_weight(1e308, 1.7e308), 1.7 / 2.7, 1e-15);
  TEST_CHECK_NEAR(tpx::lr_weight(DBL_MAX, DBL_MAX / 2), 1.0 / 3.0, 1e-15);
  TEST_CHECK_NEAR(tpx::lr_weight(DBL_MAX / 2, DBL_MAX), 2.0 / 3.0, 1e-15);
  // And at the bottom (subnormals).
  TEST_CHECK_NEAR(tpx::lr_weight(5e-324, 1e-323), 2.0 / 3.0, 1e-15);
  TEST_CHECK_NEAR(tpx::lr_weight(1e-310, 3e-310), 0.75, 1e-12);

  // Sweep over the whole range: always in [0, 1], matches the definition
  // evaluated in long double (wider exponent, so the sum cannot overflow).
  std::vector<double> vals = {0.0, 5e-324, 1e-310, DBL_MIN, DBL_MAX, kInf};
  for (int e = -300; e <= 300; e += 7) {
    vals.push_back(std::pow(10.0, e));
    vals.push_back(3.3 * std::pow(10.0, e));
  }
  int cases = 0;
  for (double a : vals) {
    for (double b : vals) {
      const double k = tpx::lr_weight(a, b);
      TEST_CHECK(k >= 0.0 && k <= 1.0, "lr_weight(%g, %g) = %g", a, b, k);
      if (std::isfinite(a) && std::isfinite(b) && (a > 0.0 || b > 0.0)) {
        const long double ref =
            static_cast<long double>(b) / (static_cast<long double>(a) + static_cast<long double>(b));
        TEST_CHECK_NEAR(k, static_cast<double>(ref), 1e-13, "lr_weight(%g, %g)", a, b);
      }
      // Swapping the variances swaps the weights (within rounding).
      TEST_CHECK_NEAR(k + tpx::lr_weight(b, a), 1.0, 1e-15, "a=%g b=%g", a, b);
      ++cases;
    }
  }
  std::printf("  lr_weight: special cases and %d sweep pairs in [0, 1]\n", cases);
}

void test_smoothed_variance() {
  double running = kNaN;  // no data yet: the batch value is taken
  TEST_CHECK(tpx::smoothed_variance(2.0, running, 0.9) == 2.0);
  TEST_CHECK(running == 2.0);
  TEST_CHECK(tpx::smoothed_variance(4.0, running, 0.5) == 3.0);
  TEST_CHECK(running == 3.0);
  TEST_CHECK(tpx::smoothed_variance(5.0, running, 0.0) == 5.0);  // momentum 0: batch value
  TEST_CHECK(running == 5.0);
  TEST_CHECK_NEAR(tpx::smoothed_variance(10.0, running, 0.9), 0.9 * 5.0 + 0.1 * 10.0, 1e-15);

  // A non-finite batch variance is returned but leaves the running value.
  running = 7.0;
  TEST_CHECK(tpx::smoothed_variance(kInf, running, 0.5) == kInf);
  TEST_CHECK(running == 7.0);
  TEST_CHECK(std::isnan(tpx::smoothed_variance(kNaN, running, 0.5)));
  TEST_CHECK(running == 7.0);
  running = kNaN;
  TEST_CHECK(tpx::smoothed_variance(kInf, running, 0.5) == kInf);
  TEST_CHECK(std::isnan(running));
  std::printf("  smoothed_variance: NaN running, momentum 0, non-finite batch\n");
}

void test_combine() {
  // k = 0 and k = 1 give one estimator exactly: the other's inf/NaN must not leak.
  TEST_CHECK_SAME(tpx::combine(0.0, kInf, 2.5), 2.5);
  TEST_CHECK_SAME(tpx::combine(0.0, kNaN, 2.5), 2.5);
  TEST_CHECK_SAME(tpx::combine(0.0, -kInf, -kInf), -kInf);
  TEST_CHECK_SAME(tpx::combine(1.0, 3.0, kInf), 3.0);
  TEST_CHECK_SAME(tpx::combine(1.0, 3.0, kNaN), 3.0);
  TEST_CHECK_SAME(tpx::combine(0.0, 1.0, 0.1), 0.1);  // bit for bit, no (1 - 0) * x rounding path
  TEST_CHECK_SAME(tpx::combine(1.0, 0.1, 7.0), 0.1);
  // NaN k: the coordinate is zeroed.
  TEST_CHECK_SAME(tpx::combine(kNaN, 1.0, 2.0), 0.0);
  TEST_CHECK_SAME(tpx::combine(kNaN, kInf, kNaN), 0.0);
  TEST_CHECK_SAME(tpx::combine(0.25, 4.0, 8.0), 7.0);
  TEST_CHECK_SAME(tpx::combine(0.5, -2.0, 2.0), 0.0);
  std::printf("  combine: k=0/1 exact, NaN k -> 0\n");
}

void test_coordinate_weight() {
  double run_lr = kNaN, run_rp = kNaN;
  // n = 3, m2_lr = 4 -> var 2; m2_rp = 12 -> var 6; k = 6 / 8.
  tpx::CoordinateResult r =
      tpx::coordinate_weight(3.0, 4.0, false, 12.0, false, false, run_lr, run_rp, 0.5, -1.0);
  TEST_CHECK(r.var_lr == 2.0 && r.var_rp == 6.0 && r.k == 0.75 && !r.both_bad);
  TEST_CHECK(std::isnan(run_lr) && std::isnan(run_rp));  // no running stats: untouched
  // With running stats: first call takes the batch values, second averages.
  r = tpx::coordinate_weight(3.0, 4.0, false, 12.0, false, true, run_lr, run_rp, 0.5, -1.0);
  TEST_CHECK(run_lr == 2.0 && run_rp == 6.0 && r.k == 0.75);
  r = tpx::coordinate_weight(3.0, 12.0, false, 4.0, false, true, run_lr, run_rp, 0.5, -1.0);
  TEST_CHECK(r.var_lr == 6.0 && r.var_rp == 2.0);  // batch variances are reported unsmoothed
  TEST_CHECK(run_lr == 4.0 && run_rp == 4.0 && r.k == 0.5);
  // Both bad: k NaN (coordinate zeroed), running values kept.
  r = tpx::coordinate_weight(3.0, 0.0, true, 0.0, true, true, run_lr, run_rp, 0.5, -1.0);
  TEST_CHECK(r.both_bad && std::isnan(r.k) && r.var_lr == kInf && r.var_rp == kInf);
  TEST_CHECK(run_lr == 4.0 && run_rp == 4.0);
  // One bad: all weight on the other.
  r = tpx::coordinate_weight(3.0, 0.0, true, 12.0, false, false, run_lr, run_rp, 0.5, -1.0);
  TEST_CHECK(r.k == 0.0 && !r.both_bad);
  // Fixed weight bypasses the weighting, even for bad streams.
  r = tpx::coordinate_weight(3.0, 0.0, true, 0.0, true, false, run_lr, run_rp, 0.5, 0.3);
  TEST_CHECK(r.k == 0.3 && r.both_bad);
  std::printf("  coordinate_weight: running stats, both-bad, fixed weight\n");
}

void test_sources() {
  // GaussianSource, B = 2 rows, C = 2 columns (all values exact in binary).
  const double d[] = {4.0, -1.0, 0.5, 2.0};
  const double eps[] = {0.5, 2.0, -1.0, 0.0};
  const double sigma[] = {2.0, 0.25, 1.0, 4.0};
  const double adv[] = {3.0, -2.0};
  double gmu[4] = {}, gsig[4] = {};
  const tpx::GaussianSource<double> src{d, eps, sigma, adv, gmu, gsig, 2};
  static_assert(tpx::GaussianSource<double>::G == 2);
  double lr[2], rp[2];
  // (0, 0): A/s = 1.5 -> LR mu 1.5 * 0.5, LR sigma 1.5 * (0.25 - 1); RP d, d * eps.
  TEST_CHECK(src.read(0, 0, lr, rp));
  TEST_CHECK(lr[0] == 0.75 && lr[1] == -1.125 && rp[0] == 4.0 && rp[1] == 2.0);
  // (0, 1): A/s = 12 -> 24, 12 * 3 = 36; RP -1, -2.
  TEST_CHECK(src.read(0, 1, lr, rp));
  TEST_CHECK(lr[0] == 24.0 && lr[1] == 36.0 && rp[0] == -1.0 && rp[1] == -2.0);
  // (1, 0): A/s = -2 -> 2, -2 * 0 = 0; RP 0.5, -0.5.
  TEST_CHECK(src.read(1, 0, lr, rp));
  TEST_CHECK(lr[0] == 2.0 && lr[1] == 0.0 && rp[0] == 0.5 && rp[1] == -0.5);
  // (1, 1): A/s = -0.5 -> 0 (eps 0), -0.5 * -1 = 0.5; RP 2, 0.
  TEST_CHECK(src.read(1, 1, lr, rp));
  TEST_CHECK(lr[0] == 0.0 && lr[1] == 0.5 && rp[0] == 2.0 && rp[1] == 0.0);
  const double g[2] = {7.0, -8.0};
  src.write(1, 0, g);
  TEST_CHECK(gmu[2] == 7.0 && gsig[2] == -8.0 && gmu[0] == 0.0 && gsig[3] == 0.0);

  // Invalid sigma: read reports it (<= 0, inf, NaN).
  for (double bad_sigma : {0.0, -1.0, kInf, kNaN}) {
    const double s1[] = {bad_sigma};
    const double d1[] = {1.0}, e1[] = {1.0}, a1[] = {1.0};
    double o1[1], o2[1];
    const tpx::GaussianSource<double> one{d1, e1, s1, a1, o1, o2, 1};
    TEST_CHECK(!one.read(0, 0, lr, rp), "sigma=%g", bad_sigma);
  }

  // Float inputs are widened exactly; outputs rounded to float.
  const float fd[] = {0.1f}, fe[] = {3.0f}, fs[] = {0.5f};
  const double fa[] = {1.0};
  float fmu[1], fsig[1];
  const tpx::GaussianSource<float> fsrc{fd, fe, fs, fa, fmu, fsig, 1};
  TEST_CHECK(fsrc.read(0, 0, lr, rp));
  TEST_CHECK(rp[0] == static_cast<double>(0.1f) && rp[1] == static_cast<double>(0.1f) * 3.0);
  TEST_CHECK(lr[0] == 6.0 && lr[1] == 16.0);
  const double gw[2] = {0.1, 1e40};
  fsrc.write(0, 0, gw);
  TEST_CHECK(fmu[0] == 0.1f && std::isinf(fsig[0]));

  // IvwSource: G = 1, reads the two given gradients.
  const float glr[] = {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f};
  const float grp[] = {-1.0f, -2.0f, -3.0f, -4.0f, -5.0f, -6.0f};
  float out[6] = {};
  const tpx::IvwSource<float> ivw{glr, grp, out, 3};
  TEST_CHECK(ivw.read(1, 2, lr, rp));
  TEST_CHECK(lr[0] == 6.0 && rp[0] == -6.0);
  const double g1[1] = {2.5};
  ivw.write(1, 0, g1);
  TEST_CHECK(out[3] == 2.5f);
  std::printf("  GaussianSource/IvwSource: read/write formulas on a hand example\n");
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // keep progress and failures in order
  std::printf("test_tpx_math\n");
  test_welford_chan();
  test_nonfinite_streams();
  test_constant_column();
  test_batch_variance();
  test_lr_weight();
  test_smoothed_variance();
  test_combine();
  test_coordinate_weight();
  test_sources();
  std::printf("test_tpx_math: all checks passed\n");
  return 0;
}
