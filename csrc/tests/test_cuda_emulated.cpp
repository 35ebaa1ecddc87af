// The CUDA kernels (csrc/cuda/tpx_cuda_kernels.cuh, and those of
// gaussian_tpx_comoments in csrc/cuda/tpx_cuda_comoments.cuh), executed on
// the CPU through the emulation shim (cuda_emulation.h), against the float64
// reference (reference.h). No GPU and no torch library are needed (only
// c10's header-only Half and BFloat16), so the device code runs in every CI
// run. Run by ctest (test_cuda_emulated).
//
// Each case does what the CUDA runner (csrc/cuda/tpx_cuda.cu) does with
// ATen's buffers, on std::vectors: plan_node for an SM count, the workspace
// and per-coordinate outputs left as garbage (poisoned with signalling
// NaNs, as at::empty may leave NaNs), the counters zeroed, launch_node.
// Launches fail on divergent __syncthreads() and on grids CUDA rejects.
//
// Usage: test_cuda_emulated [--full] [-v]   (--full: the whole grid, see
// main; -v: one line per shape with its blocks and time)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cuda_emulation.h"
#include "reference.h"
// The shim must come first: the kernels header uses its built-ins.
#include "cuda/tpx_cuda_kernels.cuh"
#include "cuda/tpx_cuda_comoments.cuh"

namespace {

using namespace tpx_test;

// ---- dtypes ----------------------------------------------------------------------

template <typename T>
struct DType;
template <>
struct DType<double> {
  static constexpr const char* name = "float64";
  static constexpr double tol = 1e-12;  // relative tolerance of the combined gradient
  static double snan() { return std::numeric_limits<double>::signaling_NaN(); }
};
template <>
struct DType<float> {
  static constexpr const char* name = "float32";
  static constexpr double tol = 1e-6;
  static float snan() { return std::numeric_limits<float>::signaling_NaN(); }
};
template <>
struct DType<c10::Half> {
  static constexpr const char* name = "float16";
  static constexpr double tol = 2e-3;
  static c10::Half snan() { return c10::Half(0x7C01, c10::Half::from_bits()); }
};
template <>
struct DType<c10::BFloat16> {
  static constexpr const char* name = "bfloat16";
  static constexpr double tol = 1e-2;
  static c10::BFloat16 snan() { return c10::BFloat16(0x7F81, c10::BFloat16::from_bits()); }
};

const double kSNaN = std::numeric_limits<double>::signaling_NaN();

// The value the kernels read (tpx::load), as a double.
template <typename T>
double value(T x) {
  return tpx::load(&x, 0);
}

// v in dtype T, rounded as torch's .to(dtype) rounds it (via float).
template <typename T>
std::vector<T> to_dtype(const std::vector<double>& v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    std::vector<T> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<T>(static_cast<float>(v[i]));
    return out;
  }
}

template <typename T>
std::vector<double> values(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = value(v[i]);
  return out;
}

// v rounded to T, as the kernels store it (tpx::store_cast).
template <typename T>
std::vector<double> rounded(const std::vector<double>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = value(tpx::store_cast<T>(v[i]));
  return out;
}

// ---- The emulated CUDA runner ------------------------------------------------------

// launch_node's launch helper: the blocks on the CPU. A grid CUDA would
// reject (no blocks, grid.y > 65535) or a divergent __syncthreads() fails.
struct EmuLaunch {
  const std::string* what;
  int64_t* blocks;  // counts the blocks run

  template <typename... Params>
  void operator()(void (*kernel)(Params...), tpx::Grid grid,
                  std::type_identity_t<Params>... args) const {
    TEST_CHECK(grid.x >= 1 && grid.x <= 0x7FFFFFFF && grid.y >= 1 && grid.y <= 65535,
               "%s: grid (%lld, %lld) is not launchable", what->c_str(), (long long)grid.x,
               (long long)grid.y);
    const cuda_emu::Failure f = cuda_emu::launch(kernel, grid.x, grid.y, tpx::kThreads, args...);
    TEST_CHECK(!f, "%s: %s", what->c_str(), f.message.c_str());
    *blocks += grid.x * grid.y;
  }
};

struct Options {
  int64_t sms = 1;
  bool running = false;
  std::vector<double> run_lr, run_rp;  // initial running variances (NaN: no data yet)
  double momentum = 0.0;
  double fixed_k = -1.0;
  double ucb = 0.0;
  bool check_valid = false;
};

struct NodeOut {
  std::vector<double> k, var_lr, var_rp, run_lr, run_rp;
  int64_t nonfinite = 0;
  int invalid = 0;
};

int64_t g_blocks = 0;  // blocks run, all cases

template <typename Source>
NodeOut run_node(const std::string& what, const Source& src, int64_t B, int64_t C,
                 const Options& o) {
  const int64_t GC = Source::G * C;
  NodeOut r;
  r.k.assign(GC, kSNaN);
  r.var_lr.assign(GC, kSNaN);
  r.var_rp.assign(GC, kSNaN);
  if (o.running) r.run_lr = o.run_lr, r.run_rp = o.run_rp;
  unsigned long long nonfinite = 0;
  const tpx::NodeArgs args{r.k.data(),
                           r.var_lr.data(),
                           r.var_rp.data(),
                           &nonfinite,
                           o.check_valid ? &r.invalid : nullptr,
                           o.running ? r.run_lr.data() : nullptr,
                           o.running ? r.run_rp.data() : nullptr,
                           o.momentum,
                           o.fixed_k,
                           o.ucb};
  const tpx::NodePlan plan = tpx::plan_node(B, C, Source::G, o.sms, tpx::needs_fourth(args));
  std::vector<double> ws(plan.workspace_size(), kSNaN);
  tpx::launch_node(EmuLaunch{&what, &g_blocks}, src, B, C, plan, ws.data(), args);
  r.nonfinite = static_cast<int64_t>(nonfinite);
  return r;
}

// ---- Cases -------------------------------------------------------------------------

// kUcb: weights from the variances' upper bounds (pass 1b); kRunning and
// kSpecial use them too on every other shape, kFixed must ignore them.
enum class Mode { kPlain, kRunning, kFixed, kSpecial, kUcb };

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::kPlain: return "plain";
    case Mode::kRunning: return "running";
    case Mode::kFixed: return "fixed";
    case Mode::kSpecial: return "special";
    default: return "ucb";
  }
}

Options options_for(Mode mode, int64_t coords, int64_t sms, std::mt19937_64& rng) {
  Options o;
  o.sms = sms;
  if (mode == Mode::kRunning) {
    // Half the coordinates have no data yet (NaN), the others a previous value.
    std::uniform_real_distribution<double> u(0.5, 2.0);
    o.running = true;
    o.momentum = 0.9;
    o.run_lr.resize(coords), o.run_rp.resize(coords);
    for (int64_t q = 0; q < coords; ++q) {
      o.run_lr[q] = q % 2 ? kNaN : u(rng);
      o.run_rp[q] = q % 3 ? u(rng) : kNaN;
    }
  } else if (mode == Mode::kFixed) {
    const double ks[] = {0.0, 0.3, 1.0};
    o.fixed_k = ks[rng() % 3];
  }
  if (mode == Mode::kUcb || mode == Mode::kFixed || (mode != Mode::kPlain && rng() % 2)) o.ucb = 2.0;
  return o;
}

std::string describe(const char* op, const char* dtype, int64_t B, int64_t C, int64_t sms,
                     Mode mode) {
  return std::string(op) + " " + dtype + " [" + std::to_string(B) + ", " + std::to_string(C) +
         "] sms=" + std::to_string(sms) + " " + mode_name(mode);
}

// Special columns (kSpecial, where C allows): an inf in both estimators
// (k NaN, nonfinite; two such columns, so that two threads count them), a
// NaN in LR only (k 0), a constant RP (k 0).
void plant_specials(std::vector<double>& lr, std::vector<double>& rp, int64_t B, int64_t C) {
  if (C < 4) return;
  const int64_t i = B / 2;
  for (int64_t j : {int64_t{1}, C > 4 ? C - 1 : 1}) {
    lr[i * C + j] = kInf;
    rp[i * C + j] = -kInf;
  }
  lr[(B - 1) * C + 2] = kNaN;
  for (int64_t r = 0; r < B; ++r) rp[r * C + 3] = 1.5;
}

template <typename T>
void case_ivw(int64_t B, int64_t C, int64_t sms, Mode mode) {
  const std::string what = describe("ivw_combine", DType<T>::name, B, C, sms, mode);
  std::mt19937_64 rng(1000003 * B + 1009 * C + sms);
  std::vector<double> lr, rp;
  fill(lr, B, C, rng, 1.0);
  fill(rp, B, C, rng, 0.8);
  if (mode == Mode::kSpecial) plant_specials(lr, rp, B, C);
  const std::vector<T> t_lr = to_dtype<T>(lr), t_rp = to_dtype<T>(rp);
  const std::vector<double> lr_r = values(t_lr), rp_r = values(t_rp);
  std::vector<T> out(B * C, DType<T>::snan());

  const Options o = options_for(mode, C, sms, rng);
  const NodeOut r =
      run_node(what, tpx::IvwSource<T>{t_lr.data(), t_rp.data(), out.data()}, B, C, o);

  std::vector<double> ref_lr = o.run_lr, ref_rp = o.run_rp;
  const Reference ref = reference(lr_r, rp_r, B, C, o.running ? &ref_lr : nullptr,
                                  o.running ? &ref_rp : nullptr, o.momentum, o.fixed_k, o.ucb);
  compare_values(what.c_str(), values(out), r.k, r.var_lr, r.var_rp, r.nonfinite, ref, lr_r,
                 rp_r, C, DType<T>::tol);
  if (o.running) check_running_values(what, r.run_lr, r.run_rp, ref_lr, ref_rp, 1e-10);
}

// Special columns of a Gaussian node (kSpecial, where D allows): an inf d
// (RP of mu_1 and sigma_1 bad: k 1), a NaN eps (LR of mu_2 and sigma_2 bad,
// and RP of sigma_2 too: k 0, and NaN with nonfinite), a constant d (RP of
// mu_3: variance 0, k 0).
void plant_specials_node(std::vector<double>& d, std::vector<double>& eps, int64_t B, int64_t D) {
  if (D < 4) return;
  d[(B / 2) * D + 1] = kInf;
  eps[(B - 1) * D + 2] = kNaN;
  for (int64_t r = 0; r < B; ++r) d[r * D + 3] = -0.75;
}

// invalid_at >= 0: that sigma is invalid (cycling through 0, -1, inf, NaN)
// and checked; the node must flag it and leave the running statistics alone.
template <typename T>
void case_gaussian(int64_t B, int64_t D, int64_t sms, Mode mode, int64_t invalid_at = -1) {
  if (invalid_at >= 0) mode = Mode::kRunning;
  std::string what = describe("gaussian_tpx_backward", DType<T>::name, B, D, sms, mode);
  std::mt19937_64 rng(2000003 * B + 2003 * D + sms);
  std::normal_distribution<double> normal;
  std::vector<double> d, eps, sigma, adv(B);
  fill_node(d, eps, sigma, B, D, rng, 0.3);
  // Per-row advantages: a row read at the wrong index shows in the LR gradients.
  for (int64_t i = 0; i < B; ++i) adv[i] = 0.5 + static_cast<double>(i % 7) + normal(rng);
  if (mode == Mode::kSpecial) plant_specials_node(d, eps, B, D);
  if (invalid_at >= 0) {
    const double bad[] = {0.0, -1.0, kInf, kNaN};
    sigma[invalid_at] = bad[invalid_at % 4];
    what += " sigma[" + std::to_string(invalid_at) + "] = " + std::to_string(sigma[invalid_at]);
  }
  const std::vector<T> t_d = to_dtype<T>(d), t_eps = to_dtype<T>(eps), t_sigma = to_dtype<T>(sigma);
  std::vector<T> grad_mu(B * D, DType<T>::snan()), grad_sigma(B * D, DType<T>::snan());

  Options o = options_for(mode, 2 * D, sms, rng);
  o.check_valid = true;
  const NodeOut r = run_node(what,
                             tpx::GaussianSource<T>{t_d.data(), t_eps.data(), t_sigma.data(),
                                                    adv.data(), grad_mu.data(), grad_sigma.data()},
                             B, D, o);
  if (invalid_at >= 0) {
    TEST_CHECK(r.invalid == 1, "%s: the invalid sigma was not flagged", what.c_str());
    for (int64_t q = 0; q < 2 * D; ++q) {
      TEST_CHECK_SAME(r.run_lr[q], o.run_lr[q], "%s: running_var_lr[%lld] changed", what.c_str(),
                      (long long)q);
      TEST_CHECK_SAME(r.run_rp[q], o.run_rp[q], "%s: running_var_rp[%lld] changed", what.c_str(),
                      (long long)q);
    }
    return;
  }
  TEST_CHECK(r.invalid == 0, "%s: valid sigma flagged invalid", what.c_str());

  std::vector<double> lr, rp;
  gaussian_grads(values(t_d), values(t_eps), values(t_sigma), adv, B, D, &lr, &rp);
  std::vector<double> ref_lr = o.run_lr, ref_rp = o.run_rp;
  const Reference ref = reference(lr, rp, B, 2 * D, o.running ? &ref_lr : nullptr,
                                  o.running ? &ref_rp : nullptr, o.momentum, o.fixed_k, o.ucb);
  // [B, 2D]: grad_mu's columns, then grad_sigma's, as the reference's coordinates.
  const std::vector<double> gm = values(grad_mu), gs = values(grad_sigma);
  std::vector<double> g(B * 2 * D);
  for (int64_t i = 0; i < B; ++i) {
    std::memcpy(&g[i * 2 * D], &gm[i * D], D * sizeof(double));
    std::memcpy(&g[i * 2 * D + D], &gs[i * D], D * sizeof(double));
  }
  // Where k is 0 or 1 the output is one estimator's gradient rounded to T.
  compare_values(what.c_str(), g, r.k, r.var_lr, r.var_rp, r.nonfinite, ref, rounded<T>(lr),
                 rounded<T>(rp), 2 * D, DType<T>::tol);
  if (o.running) check_running_values(what, r.run_lr, r.run_rp, ref_lr, ref_rp, 1e-10);
}

// ---- gaussian_tpx_comoments ----------------------------------------------------------

// kSpecial: non-finite and constant columns (where D allows), and ucb = 2;
// kScaled: columns of d and sigma scaled by 1e30 and 1e-30 (not float16,
// whose range ends at 65504); kUcb: the bounds (pass 1b).
enum class CoMode { kPlain, kSpecial, kScaled, kUcb };

const char* co_mode_name(CoMode m) {
  switch (m) {
    case CoMode::kPlain: return "plain";
    case CoMode::kSpecial: return "special";
    case CoMode::kScaled: return "scaled";
    default: return "ucb";
  }
}

// The plan's invariants: every row in one chunk, no empty chunk, a
// launchable grid, and the tile pairs enumerated one to one.
void check_comoment_plan(const tpx::ComomentPlan& p, int64_t B, const std::string& what) {
  TEST_CHECK(p.tiles * tpx::kCoTile >= p.K && (p.tiles - 1) * tpx::kCoTile < p.K, "%s", what.c_str());
  TEST_CHECK(p.chunks >= 1 && p.chunks <= 65535 && p.chunks * p.rows_per_chunk >= B &&
                 (p.chunks - 1) * p.rows_per_chunk < B,
             "%s: %lld chunks of %lld rows", what.c_str(), (long long)p.chunks,
             (long long)p.rows_per_chunk);
  int64_t pair = 0;
  for (int64_t ta = 0; ta < p.tiles; ++ta) {
    for (int64_t tb = ta; tb < p.tiles; ++tb, ++pair) {
      int64_t a = -1, b = -1;
      tpx::tile_pair(pair, p.tiles, a, b);
      TEST_CHECK(a == ta && b == tb && tpx::pair_index(ta, tb, p.tiles) == pair,
                 "%s: tile pair %lld", what.c_str(), (long long)pair);
    }
  }
  TEST_CHECK(pair == p.pairs, "%s: %lld pairs", what.c_str(), (long long)p.pairs);
}

template <typename T>
void case_comoments(int64_t B, int64_t D, int64_t groups, int64_t sms, CoMode mode) {
  if (mode == CoMode::kScaled && std::is_same_v<T, c10::Half>) mode = CoMode::kPlain;
  const std::string what = "gaussian_tpx_comoments " + std::string(DType<T>::name) + " [" +
                           std::to_string(B) + ", " + std::to_string(D) + "] groups=" +
                           std::to_string(groups) + " sms=" + std::to_string(sms) + " " +
                           co_mode_name(mode);
  std::mt19937_64 rng(3000017 * B + 3011 * D + 17 * groups + sms);
  std::normal_distribution<double> normal;
  std::vector<double> d, eps, sigma, adv(B);
  fill_node(d, eps, sigma, B, D, rng, 0.3);
  for (int64_t i = 0; i < B; ++i) adv[i] = 0.5 + static_cast<double>(i % 7) + normal(rng);
  const int64_t GC = groups * D, K = 2 * GC;
  std::vector<int64_t> constant;  // columns of z that are constant
  if (mode == CoMode::kSpecial && D >= 4) {
    d[(B / 2) * D + 1] = kInf;      // RP of mu_1 (and sigma_1): not finite
    eps[(B - 1) * D + 2] = kNaN;    // LR of mu_2 (and sigma_2, RP of sigma_2): not finite
    for (int64_t i = 0; i < B; ++i) {
      d[i * D + 3] = -0.75;  // RP of mu_3: constant
      eps[i * D] = 0.0;      // LR of mu_0 and RP of sigma_0: constant 0
    }
    constant = {0, GC + 3};
    if (groups == 2) constant.push_back(GC + D);
  }
  if (mode == CoMode::kScaled) {
    const double scales[] = {1e30, 1e-30, 1.0};
    for (int64_t i = 0; i < B; ++i) {
      for (int64_t j = 0; j < D; ++j) {
        d[i * D + j] *= scales[j % 3];
        sigma[i * D + j] *= scales[(j + 1) % 3];
      }
    }
  }
  const double ucb = mode == CoMode::kSpecial || mode == CoMode::kUcb ? 2.0 : 0.0;
  const std::vector<T> t_d = to_dtype<T>(d), t_eps = to_dtype<T>(eps), t_sigma = to_dtype<T>(sigma);
  const tpx_test::ComomentReference ref = tpx_test::comoment_reference(
      tpx_test::comoment_columns(values(t_d), values(t_eps), values(t_sigma), adv, B, D, groups), B,
      K, ucb);

  // Outputs poisoned: signalling NaNs, and each finite flag the opposite of the expected one.
  std::vector<double> cov(K * K, kSNaN), bound(K, kSNaN);
  std::unique_ptr<bool[]> finite(new bool[K]);
  for (int64_t a = 0; a < K; ++a) finite[a] = !ref.finite[a];
  const tpx::ComomentPlan plan = tpx::plan_comoments(B, K, sms, ucb > 0.0);
  check_comoment_plan(plan, B, what);
  std::vector<double> ws(plan.workspace_size(), kSNaN);
  const tpx::ComomentSource<T> src{t_d.data(), t_eps.data(), t_sigma.data(), adv.data(), D, groups};
  tpx::launch_comoments(EmuLaunch{&what, &g_blocks}, src, B, plan, ws.data(),
                        tpx::ComomentArgs{cov.data(), bound.data(), finite.get(), ucb});
  std::vector<char> fin(finite.get(), finite.get() + K);
  tpx_test::compare_comoments(what.c_str(), cov, bound, fin, ref, K, 1e-12, constant);
  if (mode == CoMode::kScaled) {
    for (int64_t a = 0; a < K; ++a)
      TEST_CHECK(fin[a] && (B == 1 || cov[a * K + a] > 0.0),
                 "%s: column %lld not finite and positive", what.c_str(), (long long)a);
  }
  if (mode == CoMode::kSpecial && D >= 4) {
    TEST_CHECK(!fin[GC + 1] && !fin[2] && fin[0] && fin[GC + 3], "%s: special columns",
               what.c_str());
  }
}

// ---- The tiling, directly -----------------------------------------------------------

// make_tiling's invariants for a shape and SM count: every element is in
// exactly one (column tile, row chunk, step) slot, no chunk is empty, the
// grid is launchable, and the merge covers every row of a step.
void check_tiling(int64_t B, int64_t C, int64_t blocks_per_sm, int64_t sms) {
  const tpx::Tiling t = tpx::make_tiling(B, C, blocks_per_sm, sms);
  const std::string what = "tiling [" + std::to_string(B) + ", " + std::to_string(C) +
                           "] blocks_per_sm=" + std::to_string(blocks_per_sm) +
                           " sms=" + std::to_string(sms);
  TEST_CHECK(t.cols_per_block >= 1 && t.cols_per_block <= tpx::kThreads, "%s", what.c_str());
  TEST_CHECK(t.rows_per_step >= 1 && t.rows_per_step * t.cols_per_block <= tpx::kThreads, "%s",
             what.c_str());
  TEST_CHECK(t.merge_span >= t.rows_per_step && t.merge_span < 2 * t.rows_per_step &&
                 (t.merge_span & (t.merge_span - 1)) == 0,
             "%s: merge_span %d for %d rows per step", what.c_str(), t.merge_span, t.rows_per_step);
  TEST_CHECK(t.col_tiles * t.cols_per_block >= C && (t.col_tiles - 1) * t.cols_per_block < C,
             "%s", what.c_str());
  TEST_CHECK(t.row_chunks >= 1 && t.row_chunks <= 65535, "%s: %lld row chunks", what.c_str(),
             (long long)t.row_chunks);
  TEST_CHECK(t.row_chunks * t.rows_per_chunk >= B && (t.row_chunks - 1) * t.rows_per_chunk < B,
             "%s: %lld chunks of %lld rows for B = %lld", what.c_str(), (long long)t.row_chunks,
             (long long)t.rows_per_chunk, (long long)B);
}

// ---- The shim itself ------------------------------------------------------------------

__global__ void block_sum_kernel(const int* in, int* out, int n) {
  __shared__ int sh[tpx::kThreads];
  const int tid = threadIdx.x;
  const int i = static_cast<int>(blockIdx.x * blockDim.x) + tid;
  sh[tid] = i < n ? in[i] : 0;
  __syncthreads();
  for (int s = tpx::kThreads / 2; s > 0; s /= 2) {
    if (tid < s) sh[tid] += sh[tid + s];
    __syncthreads();
  }
  if (tid == 0) atomicOr(out + blockIdx.x, sh[0]);
}

__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x == 5) return;  // exits while the others wait below
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void two_barriers_kernel(int* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void exit_without_barrier_kernel(int* out) {
  if (threadIdx.x >= 100) return;  // as apply_kernel: no barrier after the exit
  out[threadIdx.x] = static_cast<int>(blockIdx.y);
}

// The shim runs blocks with real shared memory and barriers, and reports a
// divergent __syncthreads() instead of hanging on it.
void test_shim() {
  const int n = 1000;
  std::vector<int> in(n), out(4, 0);
  for (int i = 0; i < n; ++i) in[i] = 1;
  TEST_CHECK(!cuda_emu::launch(block_sum_kernel, 4, 1, tpx::kThreads, in.data(), out.data(), n));
  TEST_CHECK(out[0] == 256 && out[1] == 256 && out[2] == 256 && out[3] == 1000 - 768,
             "block sums %d %d %d %d", out[0], out[1], out[2], out[3]);

  std::vector<int> flags(tpx::kThreads, 0);
  const cuda_emu::Failure early = cuda_emu::launch(early_exit_kernel, 1, 1, tpx::kThreads, flags.data());
  TEST_CHECK(early && early.message.find("exited") != std::string::npos,
             "an exited thread at a barrier was not reported: '%s'", early.message.c_str());
  const cuda_emu::Failure two = cuda_emu::launch(two_barriers_kernel, 1, 1, tpx::kThreads, flags.data());
  TEST_CHECK(two && two.message.find("line") != std::string::npos,
             "threads at two different barriers were not reported: '%s'", two.message.c_str());
  TEST_CHECK(!cuda_emu::launch(exit_without_barrier_kernel, 2, 3, tpx::kThreads, flags.data()));
  TEST_CHECK(flags[0] == 2 && flags[99] == 2, "blockIdx.y of the last block: %d", flags[0]);
  std::printf("  shim: shared memory, barriers, atomics; divergent __syncthreads reported\n");
}

// ---- Grid ---------------------------------------------------------------------------

const int64_t kBs[] = {1, 2, 3, 17, 257, 2500, 10007};
const int64_t kCs[] = {1, 6, 60, 85, 256, 257, 300, 513, 1000};
const int64_t kSms[] = {1, 7, 132};

// Blocks the emulation of both ops on [B, C] runs (three launches each):
// the emulation's cost, at ~1-2 ms per block of 256 threads on 2 cores.
int64_t blocks_of(int64_t B, int64_t C, int64_t sms) {
  int64_t n = 0;
  for (int G : {1, 2}) {
    const tpx::NodePlan p = tpx::plan_node(B, C, G, sms, /*fourth=*/false);
    n += p.moments.col_tiles * p.moments.row_chunks + (G * C + tpx::kThreads - 1) / tpx::kThreads +
         p.apply.col_tiles * p.apply.row_chunks;
  }
  return n;
}

// The CI grid (see main): a sample of the full one that runs in ~20 s.
bool in_ci_grid(int64_t B, int64_t C, int64_t sms) {
  if (B * C > 1000000) return false;  // the emulated threads' strided reads of 1e7 elements take seconds
  return sms == 7 || blocks_of(B, C, sms) <= 300;
}

template <typename F>
void with_dtype(int which, F&& f) {
  switch (which % 4) {
    case 0: f(float{}); break;
    case 1: f(c10::Half{}); break;
    case 2: f(double{}); break;
    default: f(c10::BFloat16{}); break;
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

// The grid: B in kBs x C in kCs x SM counts 1, 7, 132 (SM counts that give
// one row chunk, a few, and hundreds). Each (B, C, sms) runs both ops: the
// dtype (float32, float16, float64, bfloat16) and the mode (plain, running
// statistics, fixed weight, special columns, ucb) rotate through the cases, so
// that every dtype meets every mode across the grid. Then invalid sigma,
// first, inside and last element, on a few shapes. Then gaussian_tpx_comoments
// (case_comoments: plain, special columns, 1e30 / 1e-30 scales, ucb) on its
// own grid, the same in CI and --full.
// CI runs every (B, C) with B * C <= 1e6 at 7 SMs (row chunks > 1 for most),
// and at 1 and 132 SMs those that need at most 300 blocks; --full runs all
// 189 (B, C, sms), a few minutes.
int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IONBF, 0);
  const bool full = argc > 1 && std::strcmp(argv[1], "--full") == 0;
  const bool verbose = argc > 1 && std::strcmp(argv[argc - 1], "-v") == 0;
  const auto t0 = std::chrono::steady_clock::now();
  std::printf("test_cuda_emulated%s\n", full ? " --full" : "");
  test_shim();

  for (int64_t B : kBs)
    for (int64_t C : kCs)
      for (int64_t sms : kSms)
        for (int64_t bps : {4, 8}) check_tiling(B, C, bps, sms);
  for (int64_t B : {int64_t{1} << 20, int64_t{123456789}})
    for (int64_t C : {int64_t{1}, int64_t{7}, int64_t{4097}}) check_tiling(B, C, 4, 132);
  std::printf("  tiling invariants: ok\n");

  const Mode modes[] = {Mode::kPlain, Mode::kRunning, Mode::kFixed, Mode::kSpecial, Mode::kUcb};
  int shapes = 0, cases = 0;
  for (int64_t B : kBs) {
    for (int64_t C : kCs) {
      for (int64_t sms : kSms) {
        if (!full && !in_ci_grid(B, C, sms)) continue;
        const auto tc = std::chrono::steady_clock::now();
        const int64_t b0 = g_blocks;
        const int i = shapes++;
        with_dtype(i, [&](auto t) { case_ivw<decltype(t)>(B, C, sms, modes[(i / 4) % 5]); });
        with_dtype(i + 2, [&](auto t) { case_gaussian<decltype(t)>(B, C, sms, modes[(i / 4 + 1) % 5]); });
        cases += 2;
        if (verbose)
          std::printf("  [%lld, %lld] sms=%lld: %lld blocks, %.3f s\n", (long long)B, (long long)C,
                      (long long)sms, (long long)(g_blocks - b0), seconds_since(tc));
      }
    }
  }
  std::printf("  %d shapes x 2 ops: ok (%.1f s)\n", shapes, seconds_since(t0));

  // An invalid sigma in the first, a middle and the last element, in a row
  // chunk of its own where there are several.
  const int64_t invalid_shapes[][3] = {{3, 1, 1}, {17, 300, 7}, {257, 60, 132}, {2500, 6, 7}};
  for (const auto& [B, D, sms] : invalid_shapes) {
    for (int64_t at : {int64_t{0}, B * D / 2 + 1, B * D - 1}) {
      with_dtype(cases, [&](auto t) { case_gaussian<decltype(t)>(B, D, sms, Mode::kRunning, at); });
      ++cases;
    }
  }
  std::printf("  invalid sigma: flagged, running statistics untouched\n");

  // gaussian_tpx_comoments: B (1, 2, and not a multiple of the 32-row panel)
  // x D x groups; the mode rotates so that each meets every D and both group
  // counts, the SM count (one row chunk, a few, many) and the dtype rotate
  // too. Then a Dreamer latent node (2C = 120) with a long chunk per block,
  // a matrix of more than 256 columns (2C = 280: 9 tiles) and 2C = 140 (5).
  const auto tco = std::chrono::steady_clock::now();
  const int64_t b0 = g_blocks;
  const CoMode co_modes[] = {CoMode::kPlain, CoMode::kSpecial, CoMode::kScaled, CoMode::kUcb};
  const int64_t co_Bs[] = {1, 2, 3, 33, 257, 1000};
  const int64_t co_Ds[] = {1, 5, 30};
  int co_cases = 0;
  for (int bi = 0; bi < 6; ++bi) {
    for (int di = 0; di < 3; ++di) {
      for (int64_t groups : {int64_t{1}, int64_t{2}}) {
        const int i = co_cases++;
        const CoMode mode = co_modes[(bi + di) % 4];
        with_dtype(i / 2 + i, [&](auto t) {
          case_comoments<decltype(t)>(co_Bs[bi], co_Ds[di], groups, kSms[i % 3], mode);
        });
      }
    }
  }
  case_comoments<float>(2500, 30, 2, 7, CoMode::kUcb);
  case_comoments<float>(40, 70, 2, 7, CoMode::kSpecial);
  case_comoments<double>(77, 70, 1, 1, CoMode::kScaled);
  co_cases += 3;
  cases += co_cases;
  std::printf("  gaussian_tpx_comoments: %d cases, %lld blocks: ok (%.1f s)\n", co_cases,
              (long long)(g_blocks - b0), seconds_since(tco));
  std::printf("test_cuda_emulated: %d cases, %lld blocks emulated, all passed (%.1f s)\n", cases,
              (long long)g_blocks, seconds_since(t0));
  return 0;
}
