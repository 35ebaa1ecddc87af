// Unit tests of csrc/tpx_math.h, the math the CPU and CUDA kernels share.
// Pure header: no torch. Run by ctest (test_tpx_math).
#include <algorithm>
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
  // As the kernels decide it: from the moments, after the fact.
  bool bad() const { return tpx::moments_bad(mean, m2); }
  double variance() const { return tpx::batch_variance(m2, n, bad()); }
};

// Welford over x[b, e), as a kernel thread (or CPU lane) runs it.
Moments welford(const std::vector<double>& x, size_t b, size_t e) {
  Moments m;
  for (size_t i = b; i < e; ++i) {
    m.n += 1.0;
    tpx::welford_add(x[i], 1.0 / m.n, m.mean, m.m2);
  }
  return m;
}

void merge(Moments& a, const Moments& b) {
  tpx::chan_merge(a.n, a.mean, a.m2, b.n, b.mean, b.m2);
  a.n += b.n;
}

// One CPU-kernel lane (tpx_ops.cpp / tpx_cpu_kernels.inc, lanes_moments):
// the samples x[b], x[b + stride], ... (count of them) as shifted sums in
// panels of P samples, the shift starting at the first sample.
Moments shifted_lane(const std::vector<double>& x, size_t b, size_t stride, size_t count, size_t P) {
  Moments m;
  if (count == 0) return m;
  m.mean = x[b];  // n = 0: only the shift
  for (size_t k0 = 0; k0 < count; k0 += P) {
    const size_t nb = std::min(P, count - k0);
    double s1 = 0.0, s2 = 0.0;
    for (size_t k = k0; k < k0 + nb; ++k) tpx::shifted_add(x[b + k * stride] - m.mean, s1, s2);
    tpx::merge_shifted(m.n, static_cast<double>(nb), s1, s2, m.mean, m.m2);
    m.n += static_cast<double>(nb);
  }
  return m;
}

// The CPU kernel's pattern within one chunk of rows [b, e): whole blocks of
// V rows, where lane v sees rows b + v, b + v + V, ... (shifted_lane); the V
// lanes merged at once (merge_equal_streams); then the leftover rows as one
// more lane (itself merged the same way, as one stream, then Chan-merged).
Moments lanes(const std::vector<double>& x, size_t b, size_t e, size_t V, size_t P) {
  const size_t blocks = (e - b) / V;
  Moments out;
  if (blocks > 0) {
    std::vector<double> mean(V), m2(V);
    for (size_t v = 0; v < V; ++v) {
      const Moments lane = shifted_lane(x, b + v, V, blocks, P);
      mean[v] = lane.mean;
      m2[v] = lane.m2;
    }
    tpx::merge_equal_streams(mean.data(), m2.data(), 1, static_cast<int64_t>(V),
                             static_cast<double>(blocks), out.mean, out.m2);
    out.n = static_cast<double>(blocks * V);
  }
  if (b + blocks * V < e) {
    Moments tail;
    merge(tail, shifted_lane(x, b + blocks * V, 1, e - b - blocks * V, P));
    merge(out, tail);
  }
  return out;
}

// The CPU kernel's chunks (rows n*k/c .. n*(k+1)/c rounded down to whole
// blocks of V, the last chunk to n), each through `lanes`, merged in turn
// into chunk 0. P: blocks per panel (the kernel's is 16; smaller ones merge
// more often).
Moments kernel_pattern(const std::vector<double>& x, size_t c, size_t V, size_t P = 3) {
  const size_t n = x.size();
  const auto bound = [&](size_t k) { return k == c ? n : n * k / c / V * V; };
  Moments acc = lanes(x, 0, bound(1), V, P);
  for (size_t k = 1; k < c; ++k) merge(acc, lanes(x, bound(k), bound(k + 1), V, P));
  return acc;
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

void test_moments_bad() {
  TEST_CHECK(!tpx::moments_bad(0.0, 0.0));
  TEST_CHECK(!tpx::moments_bad(-3.5, 12.0));
  TEST_CHECK(!tpx::moments_bad(DBL_MAX, DBL_MAX));  // large but finite is fine
  TEST_CHECK(!tpx::moments_bad(-DBL_MAX, 0.0));
  TEST_CHECK(!tpx::moments_bad(5e-324, 5e-324));
  TEST_CHECK(!tpx::moments_bad(-0.0, -1e-18));  // m2 rounded below 0: not bad (clamped later)
  for (double v : {kInf, -kInf, kNaN}) {
    TEST_CHECK(tpx::moments_bad(v, 0.0), "mean=%g", v);
    TEST_CHECK(tpx::moments_bad(0.0, v), "m2=%g", v);
    TEST_CHECK(tpx::moments_bad(v, v), "both=%g", v);
  }
  TEST_CHECK(tpx::is_finite(0.0) && tpx::is_finite(-DBL_MAX) && tpx::is_finite(5e-324));
  TEST_CHECK(!tpx::is_finite(kInf) && !tpx::is_finite(-kInf) && !tpx::is_finite(kNaN));
  std::printf("  moments_bad/is_finite: finite vs inf, -inf, NaN in mean or m2\n");
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
        const double ref_var = n > 1 ? ref_m2 / (n - 1.0) : 0.0;
        const double var_tol = 1.01 * m2_tol / std::fmax(1.0, n - 1.0);

        const Moments whole = welford(x, 0, n);
        TEST_CHECK_NEAR(whole.mean, ref_mean, tol, "n=%zu scale=%g offset=%g", n, scale, offset);
        TEST_CHECK(std::fabs(whole.m2 - ref_m2) <= m2_tol, "m2 %.17g vs %.17g n=%zu scale=%g offset=%g",
              whole.m2, ref_m2, n, scale, offset);
        TEST_CHECK(!whole.bad(), "n=%zu scale=%g offset=%g", n, scale, offset);

        // Two streams split at every position (empty halves included).
        for (size_t s = 0; s <= n; ++s) {
          Moments a = welford(x, 0, s);
          const Moments b = welford(x, s, n);
          merge(a, b);
          TEST_CHECK(a.n == static_cast<double>(n));
          TEST_CHECK_NEAR(a.mean, ref_mean, tol, "n=%zu split=%zu", n, s);
          TEST_CHECK(std::fabs(a.m2 - ref_m2) <= m2_tol, "m2 %.17g vs %.17g n=%zu split=%zu", a.m2,
                ref_m2, n, s);
          TEST_CHECK(!a.bad(), "n=%zu split=%zu scale=%g offset=%g", n, s, scale, offset);
          ++cases;
        }

        // The CPU kernel's pattern: c chunks of rows, each read in blocks of
        // V rows as V lanes plus leftover rows (V > n: no whole block at
        // all), shifted sums over panels of P blocks.
        for (size_t c = 1; c <= n; ++c) {
          for (size_t V : {size_t{1}, size_t{2}, size_t{3}, size_t{5}, n, n + 1}) {
            for (size_t P : {size_t{1}, size_t{2}, size_t{16}}) {
              const Moments acc = kernel_pattern(x, c, V, P);
              TEST_CHECK(acc.n == static_cast<double>(n));
              TEST_CHECK_NEAR(acc.mean, ref_mean, tol, "n=%zu chunks=%zu V=%zu P=%zu", n, c, V, P);
              TEST_CHECK(std::fabs(acc.m2 - ref_m2) <= m2_tol, "m2 %.17g vs %.17g n=%zu chunks=%zu V=%zu P=%zu",
                         acc.m2, ref_m2, n, c, V, P);
              TEST_CHECK(!acc.bad(), "n=%zu chunks=%zu V=%zu P=%zu", n, c, V, P);
              const double var = acc.variance();
              TEST_CHECK(std::fabs(var - ref_var) <= var_tol,
                         "var %.17g vs %.17g n=%zu chunks=%zu V=%zu P=%zu", var, ref_var, n, c, V, P);
              ++cases;
            }
          }
        }
      }
    }
  }
  std::printf("  welford/chan: %d split, chunk and lane cases match the two-pass reference\n", cases);
}

void test_nonfinite_streams() {
  // A non-finite sample at any position of a stream, followed by finite
  // values or not, makes the stream bad for good (inf - inf = NaN
  // propagates); its variance is +inf, even for a single sample.
  int cases = 0;
  for (double bad_value : {kInf, -kInf, kNaN}) {
    for (size_t n = 1; n <= 9; ++n) {
      for (size_t p = 0; p < n; ++p) {
        std::vector<double> x(n);
        for (size_t i = 0; i < n; ++i) x[i] = 0.5 * static_cast<double>(i) - 1.0;
        x[p] = bad_value;
        const Moments m = welford(x, 0, n);
        TEST_CHECK(m.bad(), "bad=%g n=%zu pos=%zu mean=%g m2=%g", bad_value, n, p, m.mean, m.m2);
        TEST_CHECK(m.variance() == kInf, "bad=%g n=%zu pos=%zu", bad_value, n, p);
        // Merges where only one side is bad (either side, either order of
        // merging), and merges of a bad stream with an empty one.
        for (size_t s = 0; s <= n; ++s) {
          const Moments left = welford(x, 0, s), right = welford(x, s, n);
          TEST_CHECK(left.bad() == (p < s) && right.bad() == (p >= s),
                     "only the side holding the bad sample is bad: n=%zu pos=%zu split=%zu", n, p, s);
          Moments a = left;
          merge(a, right);
          TEST_CHECK(a.bad() && a.n == static_cast<double>(n), "bad=%g n=%zu pos=%zu split=%zu",
                     bad_value, n, p, s);
          TEST_CHECK(a.variance() == kInf);
          Moments b = right;
          merge(b, left);
          TEST_CHECK(b.bad(), "reversed: bad=%g n=%zu pos=%zu split=%zu", bad_value, n, p, s);
          ++cases;
        }
        for (size_t c = 1; c <= n; ++c) {
          for (size_t V : {size_t{1}, size_t{2}, size_t{4}}) {
            TEST_CHECK(kernel_pattern(x, c, V).bad(), "bad=%g n=%zu pos=%zu chunks=%zu V=%zu",
                       bad_value, n, p, c, V);
            ++cases;
          }
        }
      }
    }
    // Bad first, then many finite values (large, small, zero): still bad.
    std::vector<double> x = {bad_value};
    for (int i = 0; i < 1000; ++i) x.push_back(i % 3 == 0 ? 0.0 : (i % 3 == 1 ? 1e-300 : -1e300));
    TEST_CHECK(welford(x, 0, x.size()).bad(), "bad=%g then 1000 finite values", bad_value);
    // Both sides bad.
    Moments a = welford({bad_value, 1.0}, 0, 2);
    merge(a, welford({2.0, -bad_value}, 0, 2));
    TEST_CHECK(a.bad(), "both sides bad: %g", bad_value);
  }
  // An inf and a -inf in one stream; two infs of the same sign.
  TEST_CHECK(welford({kInf, -kInf}, 0, 2).bad());
  TEST_CHECK(welford({kInf, kInf, kInf}, 0, 3).bad());
  // Merging an empty stream changes nothing, good or bad (bit for bit).
  for (const std::vector<double>& x :
       {std::vector<double>{1.0, 5.0}, std::vector<double>{1.0, kInf}, std::vector<double>{kNaN}}) {
    Moments a = welford(x, 0, x.size());
    const Moments before = a;
    merge(a, Moments{});
    TEST_CHECK_SAME(a.mean, before.mean);
    TEST_CHECK_SAME(a.m2, before.m2);
    TEST_CHECK(a.n == before.n && a.bad() == before.bad());
    // And an empty stream merged with it becomes it (bad included).
    Moments e;
    merge(e, before);
    TEST_CHECK(e.n == before.n && e.bad() == before.bad());
    if (!before.bad()) {
      TEST_CHECK_SAME(e.mean, before.mean);
      TEST_CHECK_SAME(e.m2, before.m2);
    }
  }
  std::printf("  non-finite samples: %d stream/merge cases bad, variance +inf\n", cases);
}

void test_overflow() {
  // Finite float64 inputs whose moments overflow double are bad too: their
  // variance is not representable (+inf), not 0 as the old code returned.
  int cases = 0;
  for (double big : {1e308, DBL_MAX, 1e200, 2e154}) {
    for (size_t n = 2; n <= 12; ++n) {
      std::vector<double> x(n);
      for (size_t i = 0; i < n; ++i) x[i] = i % 2 == 0 ? big : -big;  // +big, -big, +big, ...
      const Moments m = welford(x, 0, n);
      TEST_CHECK(tpx::moments_bad(m.mean, m.m2), "+-%g n=%zu: mean=%g m2=%g", big, n, m.mean, m.m2);
      TEST_CHECK(tpx::batch_variance(m.m2, m.n, m.bad()) == kInf, "+-%g n=%zu", big, n);
      for (size_t s = 0; s <= n; ++s) {
        Moments a = welford(x, 0, s);
        merge(a, welford(x, s, n));
        TEST_CHECK(a.bad() && a.variance() == kInf, "+-%g n=%zu split=%zu", big, n, s);
        ++cases;
      }
      for (size_t c = 1; c <= n; ++c) {
        for (size_t V : {size_t{1}, size_t{2}, size_t{3}}) {
          TEST_CHECK(kernel_pattern(x, c, V).variance() == kInf, "+-%g n=%zu chunks=%zu V=%zu", big,
                     n, c, V);
          ++cases;
        }
      }
    }
  }
  // Same-sign values whose spread overflows: 1e308 and 1.7e308.
  TEST_CHECK(welford({1e308, 1.7e308, 1e308}, 0, 3).variance() == kInf);
  // One huge sample alone carries no spread: not bad, variance 0.
  const Moments one = welford({1e308}, 0, 1);
  TEST_CHECK(!one.bad() && one.variance() == 0.0);
  // A spread just inside the range is not bad: +-1e153 has variance ~1e306.
  std::vector<double> x(10);
  for (size_t i = 0; i < x.size(); ++i) x[i] = (i % 2 == 0 ? 1e153 : -1e153) * (1.0 + 0.1 * i);
  double ref_mean, ref_m2;
  two_pass(x, &ref_mean, &ref_m2);
  const Moments m = welford(x, 0, x.size());
  TEST_CHECK(!m.bad() && std::isfinite(ref_m2));
  TEST_CHECK_NEAR(m.m2, ref_m2, 1e-13);
  TEST_CHECK_NEAR(kernel_pattern(x, 3, 2).m2, ref_m2, 1e-13);
  std::printf("  overflow: %d cases of +-1e154..DBL_MAX alternating -> bad, variance +inf\n", cases);
}

// Merging a stream into an empty one must give that stream. The CPU kernel
// does this for every column (its lane accumulator starts empty), so a
// failure here is a failure of the op on the CPU.
void test_merge_into_empty() {
  for (const std::vector<double>& x :
       {std::vector<double>{1.0, 2.0, 4.0}, std::vector<double>{-7.5},
        std::vector<double>{1e150, -3e150, 2e150}, std::vector<double>{1e154, 1e154}}) {
    const Moments b = welford(x, 0, x.size());
    Moments a;
    merge(a, b);
    TEST_CHECK(a.n == b.n && !a.bad());
    TEST_CHECK_SAME(a.mean, b.mean);
    TEST_CHECK_SAME(a.m2, b.m2);
  }
  // |mean| beyond sqrt(DBL_MAX) ~ 1.34e154, spread small or none: the stream
  // is fine (Welford's mean and m2 are finite), but chan_merge with n_a = 0
  // computes delta * delta * (n_a * n_b / n) = inf * 0 = NaN, so the merged
  // stream turns bad and its variance +inf. The CUDA kernels never merge into
  // an empty stream; the CPU kernel always does.
  for (const std::vector<double>& x :
       {std::vector<double>{1e200, 1e200, 1e200}, std::vector<double>{-1e300},
        std::vector<double>{1e160, 1e160 + 1e150, 1e160 - 2e150}}) {
    const Moments b = welford(x, 0, x.size());
    TEST_CHECK(!b.bad(), "x[0]=%g: a single Welford stream stays finite", x[0]);
    Moments a;
    merge(a, b);
    TEST_CHECK(!a.bad() && a.m2 == b.m2,
                     "chan_merge into an empty stream: x[0]=%g, m2 %g -> %g (variance %g, should be %g)",
                     x[0], b.m2, a.m2, a.variance(), b.variance());
  }
  std::printf("  chan_merge into an empty stream\n");
}

void test_constant_column() {
  for (double c : {0.0, 0.1, -3.7, 1e-300, 1e10, 1e150, -1e300}) {
    for (size_t n : {2u, 3u, 7u, 50u}) {
      const std::vector<double> x(n, c);
      const Moments m = welford(x, 0, n);
      TEST_CHECK(m.m2 == 0.0 && !m.bad(), "c=%g n=%zu m2=%g", c, n, m.m2);
      TEST_CHECK(m.variance() == 0.0, "c=%g n=%zu", c, n);
      for (size_t s = 0; s <= n; ++s) {
        Moments a = welford(x, 0, s);
        merge(a, welford(x, s, n));
        // s = 0 merges into an empty stream: see test_merge_into_empty.
        if (s == 0 && std::fabs(c) > 1e154) {
          TEST_CHECK(a.variance() == 0.0, "c=%g n=%zu split=0: variance %g", c, n, a.variance());
        } else {
          TEST_CHECK(a.variance() == 0.0, "c=%g n=%zu split=%zu", c, n, s);
        }
      }
      for (size_t V : {size_t{1}, size_t{4}}) {
        const double var = kernel_pattern(x, 2, V).variance();
        if (std::fabs(c) > 1e154) {
          TEST_CHECK(var == 0.0, "c=%g n=%zu, CPU kernel pattern V=%zu: variance %g", c, n, V, var);
        } else {
          TEST_CHECK(var == 0.0, "c=%g n=%zu V=%zu", c, n, V);
        }
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

// combine() as it was written with branches: the definition.
double combine_reference(double k, double g_lr, double g_rp) {
  if (k != k) return 0.0;
  if (k == 0.0) return g_rp;
  if (k == 1.0) return g_lr;
  return k * g_lr + (1.0 - k) * g_rp;
}

void test_combine() {
  // k = 0 and k = 1 give one estimator exactly: the other's inf/NaN must not leak.
  TEST_CHECK_SAME(tpx::combine(0.0, kInf, 2.5), 2.5);
  TEST_CHECK_SAME(tpx::combine(0.0, -kInf, 2.5), 2.5);
  TEST_CHECK_SAME(tpx::combine(0.0, kNaN, 2.5), 2.5);
  TEST_CHECK_SAME(tpx::combine(0.0, -kInf, -kInf), -kInf);
  TEST_CHECK_SAME(tpx::combine(0.0, 1.0, kInf), kInf);  // the kept estimator's inf/NaN stays
  TEST_CHECK(std::isnan(tpx::combine(0.0, 1.0, kNaN)));
  TEST_CHECK_SAME(tpx::combine(1.0, 3.0, kInf), 3.0);
  TEST_CHECK_SAME(tpx::combine(1.0, 3.0, -kInf), 3.0);
  TEST_CHECK_SAME(tpx::combine(1.0, 3.0, kNaN), 3.0);
  TEST_CHECK_SAME(tpx::combine(1.0, -kInf, 0.0), -kInf);
  TEST_CHECK(std::isnan(tpx::combine(1.0, kNaN, 0.0)));
  // Exact: no (1 - 0) * x or 0 * y rounding path, down to subnormals and up to DBL_MAX.
  TEST_CHECK_SAME(tpx::combine(0.0, 1.0, 0.1), 0.1);
  TEST_CHECK_SAME(tpx::combine(1.0, 0.1, 7.0), 0.1);
  TEST_CHECK_SAME(tpx::combine(0.0, 1.0, 5e-324), 5e-324);
  TEST_CHECK_SAME(tpx::combine(1.0, -5e-324, 1.0), -5e-324);
  TEST_CHECK_SAME(tpx::combine(0.0, kInf, -DBL_MAX), -DBL_MAX);
  TEST_CHECK_SAME(tpx::combine(1.0, DBL_MAX, kNaN), DBL_MAX);
  // Zeros are value-equal; the sign of a zero may be lost (0.0 + -0.0 = +0.0).
  TEST_CHECK(tpx::combine(0.0, 1.0, -0.0) == 0.0);
  TEST_CHECK(tpx::combine(1.0, -0.0, 1.0) == 0.0);
  // k = -0.0 (fixed_weight=-0.0 passes the [0, 1] check) is k = 0.
  TEST_CHECK_SAME(tpx::combine(-0.0, kInf, 2.5), 2.5);
  TEST_CHECK_SAME(tpx::combine(-0.0, kNaN, -1.0), -1.0);
  // NaN k: the coordinate is zeroed (+0), whatever the gradients.
  for (double a : {1.0, kInf, -kInf, kNaN, -0.0})
    for (double b : {2.0, kInf, -kInf, kNaN, -0.0}) {
      const double g = tpx::combine(kNaN, a, b);
      TEST_CHECK(g == 0.0 && !std::signbit(g), "combine(NaN, %g, %g) = %g", a, b, g);
      TEST_CHECK(tpx::combine(-kNaN, a, b) == 0.0);
    }
  // 0 < k < 1: the convex combination; an inf passes through, inf - inf is NaN.
  TEST_CHECK_SAME(tpx::combine(0.25, 4.0, 8.0), 7.0);
  TEST_CHECK_SAME(tpx::combine(0.5, -2.0, 2.0), 0.0);
  TEST_CHECK_SAME(tpx::combine(0.3, kInf, 1.0), kInf);
  TEST_CHECK_SAME(tpx::combine(0.3, 1.0, -kInf), -kInf);
  TEST_CHECK(std::isnan(tpx::combine(0.3, kInf, -kInf)));
  TEST_CHECK(std::isnan(tpx::combine(0.3, 1.0, kNaN)));

  // Sweep against the branchy definition: equal in value for k = 0, 1, NaN
  // (zeros may differ in sign); within rounding otherwise (FMA contraction
  // may differ between the two functions).
  const double ks[] = {0.0, -0.0, 1.0, kNaN, 0.5, 0.25, 1e-300, 1.0 - DBL_EPSILON / 2, 0.7};
  const double gs[] = {0.0, -0.0, 1.0, -2.5, 0.1, 5e-324, DBL_MAX, -DBL_MAX, 1e300, kInf, -kInf, kNaN};
  int cases = 0;
  for (double k : ks)
    for (double a : gs)
      for (double b : gs) {
        const double got = tpx::combine(k, a, b), want = combine_reference(k, a, b);
        if (k == 0.0 || k == 1.0 || std::isnan(k)) {
          TEST_CHECK_SAME(got, want, "k=%g g_lr=%g g_rp=%g", k, a, b);
        } else {
          TEST_CHECK_NEAR(got, want, 4 * DBL_EPSILON, "k=%g g_lr=%g g_rp=%g", k, a, b);
        }
        ++cases;
      }
  std::printf("  combine: k=0/1 exact, NaN k -> +0, %d sweep cases equal the branchy form\n", cases);
}

// Moments of one coordinate: m2, bad, pass 1b's sum (unused at ucb = 0).
tpx::CoordinateMoments cm(double m2, bool bad = false, double sum_z2 = 0.0) {
  return {m2, bad, sum_z2};
}

void test_coordinate_weight() {
  double run_lr = kNaN, run_rp = kNaN;
  // n = 3, m2_lr = 4 -> var 2; m2_rp = 12 -> var 6; k = 6 / 8.
  tpx::CoordinateResult r =
      tpx::coordinate_weight(3.0, cm(4.0), cm(12.0), 0.0, false, run_lr, run_rp, 0.5, -1.0);
  TEST_CHECK(r.var_lr == 2.0 && r.var_rp == 6.0 && r.k == 0.75 && !r.both_bad);
  TEST_CHECK(std::isnan(run_lr) && std::isnan(run_rp));  // no running stats: untouched
  // With running stats: first call takes the batch values, second averages.
  r = tpx::coordinate_weight(3.0, cm(4.0), cm(12.0), 0.0, true, run_lr, run_rp, 0.5, -1.0);
  TEST_CHECK(run_lr == 2.0 && run_rp == 6.0 && r.k == 0.75);
  r = tpx::coordinate_weight(3.0, cm(12.0), cm(4.0), 0.0, true, run_lr, run_rp, 0.5, -1.0);
  TEST_CHECK(r.var_lr == 6.0 && r.var_rp == 2.0);  // batch variances are reported unsmoothed
  TEST_CHECK(run_lr == 4.0 && run_rp == 4.0 && r.k == 0.5);
  // Both bad: k NaN (coordinate zeroed), running values kept.
  r = tpx::coordinate_weight(3.0, cm(0.0, true), cm(0.0, true), 0.0, true, run_lr, run_rp, 0.5, -1.0);
  TEST_CHECK(r.both_bad && std::isnan(r.k) && r.var_lr == kInf && r.var_rp == kInf);
  TEST_CHECK(run_lr == 4.0 && run_rp == 4.0);
  // One bad: all weight on the other.
  r = tpx::coordinate_weight(3.0, cm(0.0, true), cm(12.0), 0.0, false, run_lr, run_rp, 0.5, -1.0);
  TEST_CHECK(r.k == 0.0 && !r.both_bad);
  // Fixed weight bypasses the weighting, even for bad streams.
  r = tpx::coordinate_weight(3.0, cm(0.0, true), cm(0.0, true), 0.0, false, run_lr, run_rp, 0.5, 0.3);
  TEST_CHECK(r.k == 0.3 && r.both_bad);
  // ucb = 1, n = 4: var_lr = 2 with sum z^2 = 4 * 3 (m4 / s^4 = 3, excess 2):
  // bound 2 (1 + sqrt(2 / 4)); var_rp = 6 with sum z^2 = 4 (excess 0): bound
  // 6. The weight uses the bounds, the reported variances stay plain, and
  // with running stats the bounds are averaged.
  const double bound_lr = 2.0 * (1.0 + std::sqrt(0.5));
  r = tpx::coordinate_weight(4.0, cm(6.0, false, 12.0), cm(18.0, false, 4.0), 1.0, false, run_lr,
                             run_rp, 0.5, -1.0);
  TEST_CHECK(r.var_lr == 2.0 && r.var_rp == 6.0);
  TEST_CHECK_NEAR(r.k, 6.0 / (bound_lr + 6.0), 1e-15);
  double ucb_lr = kNaN, ucb_rp = 1.0;
  r = tpx::coordinate_weight(4.0, cm(6.0, false, 12.0), cm(18.0, false, 4.0), 1.0, true, ucb_lr,
                             ucb_rp, 0.5, -1.0);
  TEST_CHECK_NEAR(ucb_lr, bound_lr, 1e-15);
  TEST_CHECK(ucb_rp == 3.5);
  TEST_CHECK_NEAR(r.k, 3.5 / (bound_lr + 3.5), 1e-15);
  std::printf("  coordinate_weight: running stats, both-bad, fixed weight, ucb bounds\n");
}

// The variance bound's pieces: the standardised 4th-power sums against
// their definition, the cases that return s^2 itself, and magnitudes whose
// 4th powers are beyond double.
void test_variance_bound() {
  TEST_CHECK(tpx::inverse_variance_or_zero(4.0) == 0.25);
  for (double v : {0.0, -1.0, kInf, kNaN, 1e-320}) TEST_CHECK(tpx::inverse_variance_or_zero(v) == 0.0, "%g", v);
  for (double scale : {1.0, 1e-150, 1e150}) {
    const double x[] = {1.0, -2.0, 0.5, 7.0, -3.0};
    double mean = 0.0, m2 = 0.0, m4 = 0.0;
    for (double v : x) mean += v / 5.0;
    for (double v : x) m2 += (v - mean) * (v - mean), m4 += std::pow(v - mean, 4) / 5.0;
    const double var = m2 / 4.0, iv = tpx::inverse_variance_or_zero(var * scale * scale);
    double sum = 0.0;
    for (double v : x) tpx::standardized_fourth_add(v * scale, mean * scale, iv, sum);
    TEST_CHECK_NEAR(sum / 5.0, m4 / (var * var), 1e-12, "scale %g", scale);
    const double bound = tpx::variance_bound(var, sum, 5.0, 2.0);
    TEST_CHECK_NEAR(bound, var * (1.0 + 2.0 * std::sqrt((m4 / (var * var) - 1.0) / 5.0)), 1e-12);
  }
  // s^2 itself: ucb 0, one sample, s^2 = 0 or not finite, and an excess below 0.
  TEST_CHECK(tpx::variance_bound(3.0, 100.0, 5.0, 0.0) == 3.0);
  TEST_CHECK(tpx::variance_bound(0.0, 0.0, 1.0, 2.0) == 0.0);
  TEST_CHECK(tpx::variance_bound(0.0, kNaN, 5.0, 2.0) == 0.0);
  TEST_CHECK(tpx::variance_bound(kInf, kNaN, 5.0, 2.0) == kInf);
  TEST_CHECK(tpx::variance_bound(3.0, 4.0, 5.0, 2.0) == 3.0);  // sum z^2 / n < 1
  std::printf("  variance_bound: 4th-moment sums, edge cases, no overflow at 1e150 (4th powers 1e600)\n");
}

void test_sources() {
  // GaussianSource, B = 2 rows, C = 2 columns (all values exact in binary);
  // element (i, j) is e = i * 2 + j.
  const double d[] = {4.0, -1.0, 0.5, 2.0};
  const double eps[] = {0.5, 2.0, -1.0, 0.0};
  const double sigma[] = {2.0, 0.25, 1.0, 4.0};
  const double adv[] = {3.0, -2.0};
  double gmu[4] = {}, gsig[4] = {};
  const tpx::GaussianSource<double> src{d, eps, sigma, adv, gmu, gsig};
  static_assert(tpx::GaussianSource<double>::G == 2);
  TEST_CHECK(src.row_value(0) == 3.0 && src.row_value(1) == -2.0);  // the advantage of row i
  double lr[2], rp[2];
  // (0, 0): A/s = 1.5 -> LR mu 1.5 * 0.5, LR sigma 1.5 * (0.25 - 1); RP d, d * eps.
  src.read(0, src.row_value(0), lr, rp);
  TEST_CHECK(lr[0] == 0.75 && lr[1] == -1.125 && rp[0] == 4.0 && rp[1] == 2.0);
  // (0, 1): A/s = 12 -> 24, 12 * 3 = 36; RP -1, -2.
  src.read(1, src.row_value(0), lr, rp);
  TEST_CHECK(lr[0] == 24.0 && lr[1] == 36.0 && rp[0] == -1.0 && rp[1] == -2.0);
  // (1, 0): A/s = -2 -> 2, -2 * 0 = 0; RP 0.5, -0.5.
  src.read(2, src.row_value(1), lr, rp);
  TEST_CHECK(lr[0] == 2.0 && lr[1] == 0.0 && rp[0] == 0.5 && rp[1] == -0.5);
  // (1, 1): A/s = -0.5 -> 0 (eps 0), -0.5 * -1 = 0.5; RP 2, 0.
  src.read(3, src.row_value(1), lr, rp);
  TEST_CHECK(lr[0] == 0.0 && lr[1] == 0.5 && rp[0] == 2.0 && rp[1] == 0.0);
  // read() uses the row value it is given (the kernels hoist it), not adv[]:
  // (0, 0) with A = 6: A/s = 3 -> 1.5, -2.25; RP unchanged.
  src.read(0, 6.0, lr, rp);
  TEST_CHECK(lr[0] == 1.5 && lr[1] == -2.25 && rp[0] == 4.0 && rp[1] == 2.0);
  for (int e = 0; e < 4; ++e) TEST_CHECK(src.valid(e), "e=%d", e);
  const double g[2] = {7.0, -8.0};
  src.write(2, g);  // (1, 0)
  TEST_CHECK(gmu[2] == 7.0 && gsig[2] == -8.0);
  TEST_CHECK(gmu[0] == 0.0 && gmu[1] == 0.0 && gmu[3] == 0.0);
  TEST_CHECK(gsig[0] == 0.0 && gsig[1] == 0.0 && gsig[3] == 0.0);

  // valid(): sigma must be finite and > 0; checked per element.
  for (double bad_sigma : {0.0, -0.0, -1.0, -5e-324, kInf, -kInf, kNaN}) {
    const double s2[] = {1.0, bad_sigma};
    const double d2[] = {1.0, 1.0}, e2[] = {1.0, 1.0}, a2[] = {1.0};
    double o1[2], o2[2];
    const tpx::GaussianSource<double> two{d2, e2, s2, a2, o1, o2};
    TEST_CHECK(two.valid(0) && !two.valid(1), "sigma=%g", bad_sigma);
    two.read(1, 1.0, lr, rp);  // still readable (the op raises afterwards)
    TEST_CHECK(rp[0] == 1.0 && rp[1] == 1.0, "sigma=%g", bad_sigma);
  }
  for (double ok_sigma : {5e-324, DBL_MIN, 1e-300, 1.0, 1e300, DBL_MAX}) {
    const double s1[] = {ok_sigma};
    const tpx::GaussianSource<double> one{d, eps, s1, adv, gmu, gsig};
    TEST_CHECK(one.valid(0), "sigma=%g", ok_sigma);
  }
  // Float sigma: the smallest subnormal float is valid, float inf/NaN and 0 are not.
  {
    const float fs[] = {1e-45f, std::numeric_limits<float>::infinity(),
                        std::numeric_limits<float>::quiet_NaN(), 0.0f, -1e-45f, 3.0f};
    const float fz[6] = {};
    float o1[6], o2[6];
    const tpx::GaussianSource<float> f6{fz, fz, fs, adv, o1, o2};
    TEST_CHECK(f6.valid(0) && !f6.valid(1) && !f6.valid(2) && !f6.valid(3) && !f6.valid(4) &&
               f6.valid(5));
  }

  // Float inputs are widened exactly; outputs rounded to float.
  const float fd[] = {0.1f}, fe[] = {3.0f}, fs[] = {0.5f};
  const double fa[] = {1.0};
  float fmu[1], fsig[1];
  const tpx::GaussianSource<float> fsrc{fd, fe, fs, fa, fmu, fsig};
  TEST_CHECK(fsrc.valid(0));
  fsrc.read(0, fsrc.row_value(0), lr, rp);
  TEST_CHECK(rp[0] == static_cast<double>(0.1f) && rp[1] == static_cast<double>(0.1f) * 3.0);
  TEST_CHECK(lr[0] == 6.0 && lr[1] == 16.0);
  const double gw[2] = {0.1, 1e40};
  fsrc.write(0, gw);
  TEST_CHECK(fmu[0] == 0.1f && std::isinf(fsig[0]));

  // IvwSource: G = 1, reads the two given gradients at flat index e; no row
  // input (row_value 0), every element valid.
  static_assert(tpx::IvwSource<float>::G == 1);
  const float glr[] = {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f};
  const float grp[] = {-1.0f, -2.0f, -3.0f, -4.0f, -5.0f, -6.0f};
  float out[6] = {};
  const tpx::IvwSource<float> ivw{glr, grp, out};
  TEST_CHECK(ivw.row_value(0) == 0.0 && ivw.row_value(1) == 0.0);
  for (int e = 0; e < 6; ++e) {
    ivw.read(e, 123.0, lr, rp);  // the row value is ignored
    TEST_CHECK(lr[0] == e + 1.0 && rp[0] == -(e + 1.0), "e=%d", e);
    TEST_CHECK(ivw.valid(e));
  }
  const double g1[1] = {2.5};
  ivw.write(3, g1);  // (1, 0) of a [2, 3] tensor
  TEST_CHECK(out[3] == 2.5f && out[0] == 0.0f && out[2] == 0.0f && out[4] == 0.0f);
  // Non-finite gradients are read as they are (the moments then turn bad).
  const double dlr[] = {kInf}, drp[] = {kNaN};
  double dout[1];
  const tpx::IvwSource<double> ivw_d{dlr, drp, dout};
  ivw_d.read(0, 0.0, lr, rp);
  TEST_CHECK(lr[0] == kInf && std::isnan(rp[0]));
  std::printf("  GaussianSource/IvwSource: flat-index read/write formulas, row_value, valid\n");
}

// Shifted block sums (the CPU kernel's accumulation) on long streams, also
// where the mean is far from zero relative to the spread (a plain sum of
// squares loses every digit there): within Welford's bound, a few ulps times
// n times the condition number 1 + |mean| / sd, of the two-pass reference.
void test_shifted_sums() {
  std::mt19937_64 rng(777);
  std::normal_distribution<double> normal;
  int cases = 0;
  for (double scale : {1e-30, 1.0, 1e30, 1e150}) {
    for (double offset : {0.0, 0.5, 1e6, -1e9}) {
      for (size_t n : {size_t{17}, size_t{1000}, size_t{4099}}) {
        std::vector<double> x(n);
        for (double& v : x) v = (offset + normal(rng)) * scale;
        double ref_mean, ref_m2;
        two_pass(x, &ref_mean, &ref_m2);
        const double sd = std::sqrt(ref_m2 / static_cast<double>(n));
        const double cond = 1.0 + std::fabs(ref_mean) / sd;
        const double m2_tol = 8.0 * DBL_EPSILON * static_cast<double>(n) * cond;
        for (size_t P : {size_t{1}, size_t{7}, size_t{16}}) {
          for (size_t V : {size_t{1}, size_t{12}, size_t{64}}) {
            const Moments m = kernel_pattern(x, 2, V, P);
            TEST_CHECK(!m.bad() && m.n == static_cast<double>(n));
            TEST_CHECK_NEAR(m.m2, ref_m2, m2_tol, "scale=%g offset=%g n=%zu P=%zu V=%zu", scale,
                            offset, n, P, V);
            TEST_CHECK_NEAR(m.mean, ref_mean, 1e-13, "scale=%g offset=%g n=%zu P=%zu V=%zu", scale,
                            offset, n, P, V);
            ++cases;
          }
        }
      }
    }
  }
  // Constant streams of any magnitude: exactly zero spread, the mean exact.
  for (double c : {0.0, -2.5, 1e-300, 1e200, -1.7e308}) {
    const std::vector<double> x(100, c);
    for (size_t P : {size_t{1}, size_t{16}}) {
      const Moments m = kernel_pattern(x, 2, 12, P);
      TEST_CHECK(m.m2 == 0.0 && m.mean == c && m.variance() == 0.0, "c=%g P=%zu", c, P);
    }
  }
  // A mean beyond sqrt(DBL_MAX) with a representable spread stays finite
  // (condition number 1e10: the same bound as above, ~1e-3).
  std::vector<double> x(500);
  for (double& v : x) v = 1e160 + 1e150 * normal(rng);
  double ref_mean, ref_m2;
  two_pass(x, &ref_mean, &ref_m2);
  const Moments big = kernel_pattern(x, 2, 4, 16);
  TEST_CHECK(!big.bad());
  TEST_CHECK_NEAR(big.m2, ref_m2, 8.0 * DBL_EPSILON * 500 * 1e10);
  // A non-finite sample anywhere, in the first panel, a later one or the
  // leftover rows, makes the stream bad; so does a spread beyond the range.
  for (double bad : {kInf, -kInf, kNaN}) {
    for (size_t pos : {size_t{0}, size_t{5}, size_t{250}, size_t{499}}) {
      std::vector<double> y(500, 1.0);
      y[pos] = bad;
      TEST_CHECK(kernel_pattern(y, 2, 12, 16).variance() == kInf, "bad=%g pos=%zu", bad, pos);
    }
  }
  std::vector<double> wide(64);
  for (size_t i = 0; i < wide.size(); ++i) wide[i] = i % 2 ? 1e308 : -1e308;
  TEST_CHECK(kernel_pattern(wide, 1, 4, 16).variance() == kInf);
  std::printf("  shifted sums: %d long-stream cases match the two-pass reference\n", cases);
}

// merge_equal_streams is k - 1 Chan merges of equal-count streams, in one go.
void test_merge_equal_streams() {
  std::mt19937_64 rng(5);
  std::normal_distribution<double> normal;
  for (double offset : {0.0, 1e5, -1e160}) {
    for (int64_t k : {1, 2, 5, 64}) {
      for (double n : {1.0, 3.0, 16.0}) {
        std::vector<double> mean(2 * k), m2(2 * k);
        for (int64_t i = 0; i < k; ++i) {
          mean[2 * i] = offset + normal(rng) * (offset == 0.0 ? 1.0 : 1e-3 * std::fabs(offset));
          m2[2 * i] = std::fabs(normal(rng)) * n;
        }
        Moments seq;
        for (int64_t i = 0; i < k; ++i) merge(seq, Moments{n, mean[2 * i], m2[2 * i]});
        double got_mean, got_m2;
        tpx::merge_equal_streams(mean.data(), m2.data(), 2, k, n, got_mean, got_m2);
        TEST_CHECK_NEAR(got_mean, seq.mean, 1e-14, "offset=%g k=%lld n=%g", offset, (long long)k, n);
        TEST_CHECK_NEAR(got_m2, seq.m2, 1e-12, "offset=%g k=%lld n=%g", offset, (long long)k, n);
      }
    }
  }
  // Equal means: exactly the sum of the m2 (a constant column stays 0).
  const double same[] = {-1.7e308, -1.7e308, -1.7e308}, zeros[] = {0.0, 0.0, 0.0};
  double m, q;
  tpx::merge_equal_streams(same, zeros, 1, 3, 10.0, m, q);
  TEST_CHECK(m == -1.7e308 && q == 0.0);
  // A non-finite lane makes the result bad.
  for (double bad : {kInf, -kInf, kNaN}) {
    const double means[] = {1.0, bad, 2.0}, m2s[] = {0.5, 0.5, 0.5};
    tpx::merge_equal_streams(means, m2s, 1, 3, 4.0, m, q);
    TEST_CHECK(tpx::moments_bad(m, q), "bad=%g", bad);
    const double m2bad[] = {0.5, bad == -kInf ? kInf : bad, 0.5}, ok[] = {1.0, 1.5, 2.0};
    tpx::merge_equal_streams(ok, m2bad, 1, 3, 4.0, m, q);
    TEST_CHECK(tpx::moments_bad(m, q), "m2 bad=%g", bad);
  }
  std::printf("  merge_equal_streams: equals sequential Chan merges\n");
}

// The float reciprocal refined in double: relative error <= 2^-48 + 2^-53
// over the whole range where the float reciprocal is normal, for float
// values of sigma (every magnitude, both signs, mantissas at random and at
// the extremes).
void test_refine_reciprocal() {
  std::mt19937_64 rng(99);
  std::uniform_int_distribution<uint32_t> mant(0, (1u << 23) - 1);
  const double bound = std::ldexp(1.0, -48) + std::ldexp(1.0, -53);
  double worst = 0.0;
  int cases = 0;
  for (int e = -126; e < 126; ++e) {
    for (int k = 0; k < 40; ++k) {
      const uint32_t m = k == 0 ? 0u : k == 1 ? (1u << 23) - 1 : mant(rng);
      for (float sign : {1.0f, -1.0f}) {
        const float s = sign * std::ldexp(1.0f + static_cast<float>(m) * 0x1p-23f, e);
        const double sd = s;
        TEST_CHECK(sd >= tpx::kFastRecipMin || sd <= -tpx::kFastRecipMin);
        TEST_CHECK(std::fabs(sd) < tpx::kFastRecipMax);
        const double r = tpx::refine_reciprocal(sd, static_cast<double>(1.0f / s));
        const long double exact = 1.0L / static_cast<long double>(sd);
        const double rel = static_cast<double>(std::fabs((r - exact) / exact));
        worst = std::fmax(worst, rel);
        TEST_CHECK(rel <= bound, "s=%a: 1/s=%a, got %a (relative error %g)", sd, (double)exact, r, rel);
        ++cases;
      }
    }
  }
  // The range limits are exactly where the float reciprocal stops being a
  // normal float; powers of two are exact.
  TEST_CHECK(tpx::kFastRecipMin == std::ldexp(1.0, -126) && tpx::kFastRecipMax == std::ldexp(1.0, 126));
  TEST_CHECK(tpx::refine_reciprocal(4.0, 0.25) == 0.25 && tpx::refine_reciprocal(1.0, 1.0) == 1.0);
  std::printf("  refine_reciprocal: %d float sigmas, worst relative error %.3g (bound %.3g)\n", cases,
              worst, bound);
}

// mix (the combine of a weight inside (0, 1)) is combine there; the per-sample
// gradients of a Gaussian node are the TPX.md formulas.
void test_mix_and_gaussian_per_sample() {
  for (double k : {1e-300, 0.25, 0.5, 0.999999, 1.0 - DBL_EPSILON / 2}) {
    for (double lr : {-3.0, 0.0, 1e30, kInf, kNaN}) {
      for (double rp : {2.0, -1e-30, -kInf}) {
        TEST_CHECK_SAME(tpx::mix(k, 1.0 - k, lr, rp), tpx::combine(k, lr, rp));
      }
    }
  }
  double lr[2], rp[2];
  tpx::gaussian_per_sample(2.0 / 0.5, 1.5, -0.25, lr, rp);
  TEST_CHECK(lr[0] == 6.0 && lr[1] == 4.0 * (1.5 * 1.5 - 1.0) && rp[0] == -0.25 && rp[1] == -0.375);
  std::printf("  mix = combine inside (0, 1); gaussian_per_sample\n");
}

}  // namespace

// Co-moments (gaussian_tpx_comoments): comoment_add over panels of a stream
// and comoment_merge of streams agree with the two-pass co-moment, away from
// the origin (means +-1e3 with spreads 1 and 0.6: to 8 eps n cond of the
// scale, as test_shifted_sums); a constant column's co-moments are
// exactly 0; a non-finite sample spoils only its own column; the covariance
// and bound of a bad column; ComomentSource's columns.
void test_comoments() {
  const size_t n = 1001;
  std::mt19937_64 rng(11);
  std::normal_distribution<double> normal;
  std::vector<double> x(n), y(n), c(n, -3.25);
  for (size_t i = 0; i < n; ++i) {
    x[i] = 1e3 + normal(rng);
    y[i] = -1e3 + 0.5 * normal(rng) + 0.3 * (x[i] - 1e3);
  }
  auto two_pass = [&](const std::vector<double>& u, const std::vector<double>& v) {
    long double mu = 0.0L, mv = 0.0L, q = 0.0L;
    for (size_t i = 0; i < n; ++i) mu += u[i], mv += v[i];
    mu /= n, mv /= n;
    for (size_t i = 0; i < n; ++i) q += (u[i] - mu) * (v[i] - mv);
    return static_cast<double>(q);
  };
  // One stream, panels of P samples shifted by the running means (the kernels' pattern).
  auto panels = [&](const std::vector<double>& u, const std::vector<double>& v, size_t P, double& mu,
                    double& mv) {
    double m = 0.0, k = 0.0;
    mu = u[0], mv = v[0];
    for (size_t i0 = 0; i0 < n; i0 += P) {
      const size_t nb = std::min(P, n - i0);
      double su = 0.0, sv = 0.0, s2 = 0.0;
      for (size_t i = i0; i < i0 + nb; ++i) su += u[i] - mu, sv += v[i] - mv, s2 += (u[i] - mu) * (v[i] - mv);
      tpx::comoment_add(k, static_cast<double>(nb), su, sv, s2, m);
      mu += su / (k + nb), mv += sv / (k + nb);
      k += nb;
    }
    return m;
  };
  const double want = two_pass(x, y), scale = std::sqrt(two_pass(x, x) * two_pass(y, y));
  const double cond = 1.0 + 1e3 / std::sqrt(two_pass(y, y) / n);
  const double tol = 8.0 * DBL_EPSILON * static_cast<double>(n) * cond;
  for (size_t P : {size_t{1}, size_t{7}, size_t{32}, n}) {
    double mu, mv;
    const double got = panels(x, y, P, mu, mv);
    TEST_CHECK(std::fabs(got - want) <= tol * scale, "panels of %zu: %.17g vs %.17g", P, got, want);
    TEST_CHECK(panels(c, x, P, mu, mv) == 0.0 && mu == -3.25, "constant column, panels of %zu", P);
    TEST_CHECK(panels(x, c, P, mu, mv) == 0.0 && mv == -3.25, "constant column, panels of %zu", P);
    TEST_CHECK(panels(c, c, P, mu, mv) == 0.0, "constant column, panels of %zu", P);
  }
  // Streams of blocks (one sample, 10, 333: the last one shorter), each
  // summed about its first sample, merged by Chan's formula in order; and a
  // constant column (-3.25) with itself.
  for (size_t blk : {size_t{1}, size_t{10}, size_t{333}}) {
    double N = 0.0, mx = 0.0, my = 0.0, m = 0.0, cx = -3.25, cy = -3.25, cm = 0.0;
    for (size_t i0 = 0; i0 < n; i0 += blk) {
      const double nb = static_cast<double>(std::min(blk, n - i0));
      double bx = x[i0], by = y[i0], su = 0.0, sv = 0.0, s2 = 0.0, mb = 0.0;
      for (size_t i = i0; i < i0 + static_cast<size_t>(nb); ++i)
        su += x[i] - bx, sv += y[i] - by, s2 += (x[i] - bx) * (y[i] - by);
      tpx::comoment_add(0.0, nb, su, sv, s2, mb);
      bx += su / nb, by += sv / nb;
      if (i0 == 0) {
        mx = bx, my = by, m = mb;
      } else {
        tpx::comoment_merge(N, mx, my, m, nb, bx, by, mb);
        tpx::comoment_merge(N, cx, cy, cm, nb, -3.25, -3.25, 0.0);
      }
      N += nb;
    }
    TEST_CHECK(std::fabs(m - want) <= tol * scale, "merged blocks of %zu: %.17g vs %.17g", blk, m, want);
    TEST_CHECK(cm == 0.0 && cx == -3.25 && cy == -3.25, "merged constant blocks of %zu", blk);
  }
  // Merging with a = b is chan_merge.
  double ma = 1.0, mb = 1.0, m = 2.0, cm = 1.0, c2 = 2.0;
  tpx::comoment_merge(3.0, ma, mb, m, 2.0, 4.0, 4.0, 1.5);
  tpx::chan_merge(3.0, cm, c2, 2.0, 4.0, 1.5);
  TEST_CHECK(ma == cm && mb == cm && m == c2, "comoment_merge(a, a) = chan_merge");
  // A non-finite sample: its column is bad, the other keeps its moments.
  {
    std::vector<double> u = x;
    u[500] = kInf;
    double mu, mv;
    const double muu = panels(u, u, 32, mu, mv);
    double mv2, mx2;
    const double myy = panels(y, y, 32, mv2, mx2);
    TEST_CHECK(tpx::moments_bad(mu, muu) && !tpx::moments_bad(mv2, myy), "one bad column");
  }
  // Covariance entries and bounds.
  TEST_CHECK(tpx::comoment_covariance(8.0, 5.0, false, false, false) == 2.0);
  TEST_CHECK(tpx::comoment_covariance(-8.0, 5.0, false, false, false) == -2.0);
  TEST_CHECK(tpx::comoment_covariance(-8.0, 5.0, false, false, true) == 0.0);  // clamped diagonal
  TEST_CHECK(tpx::comoment_covariance(8.0, 1.0, false, false, false) == 0.0);
  TEST_CHECK(tpx::comoment_covariance(kNaN, 5.0, true, false, false) == 0.0);
  TEST_CHECK(tpx::comoment_covariance(kNaN, 5.0, false, true, false) == 0.0);
  TEST_CHECK(tpx::comoment_covariance(kNaN, 5.0, true, true, true) == kInf);
  TEST_CHECK(tpx::comoment_bound(3.0, true, 1.0, 5.0, 2.0) == kInf);
  TEST_CHECK(tpx::comoment_bound(3.0, false, 0.0, 5.0, 0.0) == 3.0);
  TEST_CHECK(tpx::comoment_bound(3.0, false, 10.0, 5.0, 2.0) == tpx::variance_bound(3.0, 10.0, 5.0, 2.0));

  // ComomentSource: B = 2, D = 2; groups 2: [LR mu, LR sigma, RP mu, RP sigma].
  const double d[] = {4.0, -1.0, 0.5, 2.0};
  const double eps[] = {0.5, 2.0, -1.0, 0.0};
  const double sigma[] = {2.0, 0.25, 1.0, 4.0};
  const double adv[] = {2.0, -4.0};
  for (int64_t groups : {int64_t{1}, int64_t{2}}) {
    const tpx::ComomentSource<double> src{d, eps, sigma, adv, 2, groups};
    const int64_t K = src.columns();
    TEST_CHECK(K == 4 * groups, "columns");
    for (int64_t i = 0; i < 2; ++i) {
      double z[8];
      src.row(i, z);
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t e = i * 2 + j, gc = groups * 2;
        const double a_s = adv[i] / sigma[e];
        TEST_CHECK(z[j] == a_s * eps[e] && z[gc + j] == d[e], "groups %lld row %lld", (long long)groups, (long long)i);
        if (groups == 2)
          TEST_CHECK(z[2 + j] == a_s * (eps[e] * eps[e] - 1.0) && z[gc + 2 + j] == d[e] * eps[e], "sigma columns");
      }
      for (int64_t col = 0; col < K; ++col) TEST_CHECK(src.value(i, col) == z[col], "value(%lld, %lld)", (long long)i, (long long)col);
    }
  }
  std::printf("  comoments: panels and Chan merges vs two-pass, constant and bad columns, sources\n");
}

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // keep progress and failures in order
  std::printf("test_tpx_math\n");
  test_moments_bad();
  test_welford_chan();
  test_nonfinite_streams();
  test_overflow();
  test_merge_into_empty();
  test_constant_column();
  test_batch_variance();
  test_lr_weight();
  test_smoothed_variance();
  test_combine();
  test_coordinate_weight();
  test_variance_bound();
  test_sources();
  test_shifted_sums();
  test_merge_equal_streams();
  test_refine_reciprocal();
  test_mix_and_gaussian_per_sample();
  test_comoments();
  std::printf("test_tpx_math: all checks passed\n");
  return 0;
}
