// The CPU kernels' layout and lane types, shared by their runner
// (tpx_cpu.cpp) and both copies of their hot code (tpx_cpu_kernels.inc):
// rows per block, panels, the moments accumulator, the GCC vector types of
// W lanes, and the range checks of the fast paths. Internal to the CPU
// kernels' one translation unit (hence the unnamed namespace).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

// The CPU kernel passes GCC vector types between always-inlined functions
// only (TPX_HOT, TPX_HD), so the ABI note on vector arguments does not apply.
// Before tpx_math.h: the note is reported where its templates are defined.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "tpx_math.h"

namespace tpx {
namespace {

// ---- Layout -------------------------------------------------------------------
// Rows are processed in blocks of V consecutive rows read as one flat run of
// L = V * C "lanes" (flat indices e0 .. e0 + L), so the inner loops are long and
// contiguous, and vectorise, even for C = 1 (Dreamer's action nodes have C of
// 1 to 40). V makes L >= 64 and, where C allows, a multiple of the vector
// width W; leftover lanes (L % W) take the same code one lane at a time.
// Pass 1 keeps the moments (mean, m2) of every lane and stream and, per tile
// of W lanes, sums kPanel blocks at a time in registers (shifted sums,
// tpx_math.h) before merging them in; the lanes of a column are Chan-merged
// at the end of the chunk. Pass 2 walks the same blocks in the same order.
// The hot code is in tpx_cpu_kernels.inc.
constexpr int64_t kMinLanes = 64;
constexpr int W = 4;        // lanes per vector: 4 doubles, one AVX2 register
constexpr int kPanel = 16;  // blocks summed in registers between two merges

int64_t rows_per_block(int64_t C) {
  if (C >= 256) return 1;  // long rows: no need to pad L to a multiple of W
  const int64_t v = (kMinLanes + C - 1) / C;
  const int64_t m = W / std::gcd<int64_t>(C, W);  // V a multiple of m: L a multiple of W
  return (v + m - 1) / m * m;
}

// Moments of G*C coordinates, four streams (mean/m2 of LR and RP).
struct Moments {
  explicit Moments(int64_t coords) : mean_lr(coords, 0.0), m2_lr(coords, 0.0), mean_rp(coords, 0.0), m2_rp(coords, 0.0) {}
  std::vector<double> mean_lr, m2_lr, mean_rp, m2_rp;
  double n = 0.0;

  void merge(const Moments& o) {
    for (size_t q = 0; q < mean_lr.size(); ++q) {
      chan_merge(n, mean_lr[q], m2_lr[q], o.n, o.mean_lr[q], o.m2_lr[q]);
      chan_merge(n, mean_rp[q], m2_rp[q], o.n, o.mean_rp[q], o.m2_rp[q]);
    }
    n += o.n;
  }
};

// ---- Co-moments (gaussian_tpx_comoments) ------------------------------------------
// One stream of K columns: n samples, the column means and the co-moments
// M_ab = sum (z_a - mean_a)(z_b - mean_b) of the upper triangle, in rows of
// Kp (K padded to whole blocks of kCoBlock columns, the CPU kernel's unit;
// tpx_cpu_comoments.inc). Entries below the diagonal are not maintained.
constexpr int64_t kCoBlock = 16;

struct CoAccumulator {
  explicit CoAccumulator(int64_t K)
      : K(K), Kp((K + kCoBlock - 1) / kCoBlock * kCoBlock), mean(Kp, 0.0), m(Kp * Kp, 0.0) {}
  int64_t K, Kp;
  double n = 0.0;
  std::vector<double> mean;
  std::vector<double> m;

  // Chan's merge of stream o into this one, entry by entry (comoment_merge),
  // the means from the diagonal entries' merges.
  void merge(const CoAccumulator& o) {
    if (o.n == 0.0) return;
    if (n == 0.0) {
      *this = o;
      return;
    }
    std::vector<double> merged(K);
    for (int64_t a = 0; a < K; ++a) {
      for (int64_t b = a; b < K; ++b) {
        double mx = mean[a], my = mean[b];
        comoment_merge(n, mx, my, m[a * Kp + b], o.n, o.mean[a], o.mean[b], o.m[a * Kp + b]);
        if (a == b) merged[a] = mx;
      }
    }
    std::copy(merged.begin(), merged.end(), mean.begin());
    n += o.n;
  }
};

// ---- Lanes: W at a time (vd) or one (double) -------------------------------------
// GCC vector extensions: the same source compiles to SSE2 for the baseline
// ISA and to AVX2 in the second copy of tpx_cpu_kernels.inc.
typedef double vd __attribute__((vector_size(8 * W)));
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));

// Pass 2 of bfloat16 inputs runs on floats, W2 per vector (see
// tpx_cpu_kernels.inc, "Pass 2 in float").
constexpr int W2 = 8;
typedef float vf2 __attribute__((vector_size(4 * W2)));
typedef int32_t vi2 __attribute__((vector_size(4 * W2)));
typedef uint32_t vu2 __attribute__((vector_size(4 * W2)));
typedef uint16_t vh2 __attribute__((vector_size(2 * W2)));

#define TPX_HOT inline __attribute__((always_inline))

template <typename VT>
struct Lane;
template <>
struct Lane<double> {
  using F = float;    // the lanes' float values
  using I = int32_t;  // their bit patterns
};
template <>
struct Lane<vd> {
  using F = vf;
  using I = vi;
};

// Sources whose sigma holds float values (float32, bfloat16, float16): they
// divide through the float reciprocal refined in double (tpx_math.h).
template <typename Source>
constexpr bool kFastRecipSource = false;
template <typename T>
constexpr bool kFastRecipSource<GaussianSource<T>> = !std::is_same_v<T, double>;

// Float bit patterns of [kFastRecipMin, kFastRecipMax): 2^-126 and 2^126.
// As signed integers every other value (0, subnormal, negative, huge, inf,
// NaN) lies outside [kRecipLoBits, kRecipHiBits).
constexpr int32_t kRecipLoBits = 0x00800000;
constexpr int32_t kRecipHiBits = 0x7E800000;

// Per-lane weights of L = V * C lanes: k and 1 - k of each group, [2G][L].
template <typename F = double>
std::vector<F> lane_weights(const double* k, int G, int64_t C, int64_t V) {
  const int64_t L = V * C;
  std::vector<F> out(2 * G * L);
  for (int g = 0; g < G; ++g) {
    for (int64_t l = 0; l < L; ++l) {
      out[2 * g * L + l] = static_cast<F>(k[g * C + l % C]);
      out[(2 * g + 1) * L + l] = static_cast<F>(1.0 - k[g * C + l % C]);
    }
  }
  return out;
}

// The float path's range (pass 2 in float): weights and their complements
// are 0 or normal floats, advantages 0 or in [2^-60, 2^60], and sigma in
// [2^-60, 2^60] (checked per panel, on its float bits), so that A / sigma
// is a normal float. Outside it the double path runs.
constexpr double kFloatPathMin = 0x1p-60, kFloatPathMax = 0x1p60;
constexpr int32_t kFloatPathLoBits = 0x21800000;  // 2^-60
constexpr int32_t kFloatPathHiBits = 0x5D800000;  // 2^60

bool weights_in_float_range(const double* k, int64_t n) {
  for (int64_t q = 0; q < n; ++q) {
    const double a = k[q], b = 1.0 - k[q], normal = std::numeric_limits<float>::min();
    if (!(a != a || a == 0.0 || b == 0.0 || (a >= normal && b >= normal))) return false;
  }
  return true;
}

bool advantages_in_float_range(const double* adv, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    const double a = std::fabs(adv[i]);
    ok &= (a == 0.0) | ((a >= kFloatPathMin) & (a <= kFloatPathMax));
  }
  return ok;
}

}  // namespace
}  // namespace tpx
