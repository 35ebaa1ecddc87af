// A minimal check macro for the C++ tests (no test framework): on failure it
// prints file:line, the failed condition and an optional printf-style note,
// and exits with status 1. (Named TEST_CHECK*: c10 already defines CHECK.)

#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>

#define TEST_CHECK(cond, ...)                                                    \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: check failed: %s", __FILE__, __LINE__, #cond); \
      tpx_test::note(__VA_ARGS__);                                               \
      std::exit(1);                                                              \
    }                                                                            \
  } while (0)

// |a - b| <= tol * max(1, |b|), or a == b (same infinity), or both NaN.
#define TEST_CHECK_NEAR(a, b, tol, ...)                                                  \
  do {                                                                                   \
    const double tpx_a_ = (a), tpx_b_ = (b);                                             \
    if (!tpx_test::near(tpx_a_, tpx_b_, (tol))) {                                        \
      std::fprintf(stderr, "%s:%d: check failed: %s = %.17g vs %s = %.17g (tol %g)",     \
                   __FILE__, __LINE__, #a, tpx_a_, #b, tpx_b_, static_cast<double>(tol)); \
      tpx_test::note(__VA_ARGS__);                                                       \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

// a == b (so 0 == -0, inf == inf), or both NaN.
#define TEST_CHECK_SAME(a, b, ...)                                                              \
  do {                                                                                          \
    const double tpx_a_ = (a), tpx_b_ = (b);                                                    \
    if (!tpx_test::same(tpx_a_, tpx_b_)) {                                                      \
      std::fprintf(stderr, "%s:%d: check failed: %s = %.17g vs %s = %.17g (must be equal)",     \
                   __FILE__, __LINE__, #a, tpx_a_, #b, tpx_b_);                                 \
      tpx_test::note(__VA_ARGS__);                                                              \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

namespace tpx_test {

inline void note() { std::fprintf(stderr, "\n"); }

template <typename... Args>
void note(const char* fmt, Args... args) {
  std::fprintf(stderr, " [");
  std::fprintf(stderr, fmt, args...);
  std::fprintf(stderr, "]\n");
}

inline bool same(double a, double b) { return a == b || (std::isnan(a) && std::isnan(b)); }

inline bool near(double a, double b, double tol) {
  if (same(a, b)) return true;
  if (!std::isfinite(a) || !std::isfinite(b)) return false;
  return std::fabs(a - b) <= tol * std::fmax(1.0, std::fabs(b));
}

}  // namespace tpx_test
