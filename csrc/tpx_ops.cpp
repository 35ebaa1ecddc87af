// Op schemas, argument validation and the CPU kernels.
//
// Each op is two passes over the batch: (1) per-coordinate moments of the
// per-sample LR and RP gradients (Welford within a chunk of rows, Chan merge
// across chunks), then per-coordinate weights; (2) the combined gradient.
// The per-sample gradients are formed in registers in both passes and never
// stored. All the math lives in tpx_math.h, shared with the CUDA kernels.
#ifndef TPX_NO_PYTHON_MODULE
#include <Python.h>
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "tpx_math.h"
#include "tpx_ops.h"

// `import tpx_ext._C` loads this library (and registers the ops). WITH_CUDA
// tells Python whether the CUDA kernels were compiled in. The CMake build (a
// plain C++ library, no Python) defines TPX_NO_PYTHON_MODULE to leave it out.
#ifndef TPX_NO_PYTHON_MODULE
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
#ifdef TPX_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
#endif  // TPX_NO_PYTHON_MODULE

namespace tpx {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_running(const char* op, const char* name, const at::Tensor& run, const at::Tensor& like,
                   int64_t coords) {
  TORCH_CHECK_VALUE(run.dim() == 1 && run.numel() == coords, op, ": ", name,
                    " must be a 1-D tensor of ", coords, " elements (one per coordinate), got shape ",
                    run.sizes());
  TORCH_CHECK_TYPE(run.scalar_type() == at::kFloat || run.scalar_type() == at::kDouble, op, ": ",
                   name, " must be float32 or float64, got ", run.scalar_type());
  TORCH_CHECK_VALUE(run.device() == like.device(), op, ": ", name, " is on ", run.device(),
                    " but the gradients are on ", like.device());
}

// Below this many elements one thread is faster than waking the pool.
constexpr int64_t kParallelGrain = 8192;

}  // namespace

void check_pair(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.dim() == 2, op, ": ", name_a, " must be a 2-D tensor [B, C], got shape ",
                    a.sizes());
  TORCH_CHECK_VALUE(a.size(0) >= 1 && a.size(1) >= 1, op, ": ", name_a,
                    " must have B >= 1 rows and C >= 1 columns, got shape ", a.sizes());
  TORCH_CHECK_VALUE(b.sizes() == a.sizes(), op, ": ", name_b, " must have the shape of ", name_a,
                    " ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK_VALUE(b.device() == a.device(), op, ": ", name_b, " is on ", b.device(), " but ",
                    name_a, " is on ", a.device());
  TORCH_CHECK_TYPE(supported_dtype(a.scalar_type()), op, ": ", name_a,
                   " must be float32, float64, float16 or bfloat16, got ", a.scalar_type());
  TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type(), op, ": ", name_b, " has dtype ",
                   b.scalar_type(), " but ", name_a, " has dtype ", a.scalar_type());
}

void check_options(const char* op, const at::Tensor& like, int64_t coords,
                   const std::optional<at::Tensor>& running_var_lr,
                   const std::optional<at::Tensor>& running_var_rp, double momentum,
                   std::optional<double> fixed_weight) {
  TORCH_CHECK_VALUE(running_var_lr.has_value() == running_var_rp.has_value(), op,
                    ": give both running_var_lr and running_var_rp, or neither");
  if (running_var_lr.has_value()) {
    check_running(op, "running_var_lr", *running_var_lr, like, coords);
    check_running(op, "running_var_rp", *running_var_rp, like, coords);
  }
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum < 1.0, op, ": momentum must be in [0, 1), got ",
                    momentum);
  if (fixed_weight.has_value()) {
    const double w = *fixed_weight;
    TORCH_CHECK_VALUE(w >= 0.0 && w <= 1.0, op, ": fixed_weight must be in [0, 1], got ", w);
  }
}

void check_gaussian(const at::Tensor& d, const at::Tensor& eps, const at::Tensor& sigma,
                    const at::Tensor& adv) {
  const char* op = "gaussian_tpx_backward";
  check_pair(op, "d", d, "eps", eps);
  check_pair(op, "d", d, "sigma", sigma);
  TORCH_CHECK_VALUE(adv.dim() == 1 && adv.size(0) == d.size(0), op,
                    ": adv must be a 1-D tensor of B = ", d.size(0), " elements, got shape ",
                    adv.sizes());
  TORCH_CHECK_VALUE(adv.device() == d.device(), op, ": adv is on ", adv.device(), " but d is on ",
                    d.device());
  TORCH_CHECK_TYPE(supported_dtype(adv.scalar_type()), op,
                   ": adv must be a floating tensor, got ", adv.scalar_type());
}

CoordinateBuffers make_buffers(const at::Tensor& like, int64_t coords,
                               const std::optional<at::Tensor>& running_var_lr,
                               const std::optional<at::Tensor>& running_var_rp,
                               std::optional<double> fixed_weight) {
  CoordinateBuffers buf;
  const auto f64 = like.options().dtype(at::kDouble);
  buf.k = at::empty({coords}, f64);
  buf.var_lr = at::empty({coords}, f64);
  buf.var_rp = at::empty({coords}, f64);
  buf.nonfinite = at::zeros({}, like.options().dtype(at::kLong));
  buf.invalid = at::zeros({}, like.options().dtype(at::kInt));
  if (running_var_lr.has_value()) {
    // A float64 contiguous buffer is updated in place; others via a copy.
    buf.run_lr = running_var_lr->to(at::kDouble).contiguous();
    buf.run_rp = running_var_rp->to(at::kDouble).contiguous();
  }
  if (fixed_weight.has_value()) buf.fixed_k = *fixed_weight;
  return buf;
}

void finish_running(CoordinateBuffers& buf, const std::optional<at::Tensor>& running_var_lr,
                    const std::optional<at::Tensor>& running_var_rp) {
  if (!running_var_lr.has_value()) return;
  if (!buf.run_lr.is_same(*running_var_lr)) running_var_lr->copy_(buf.run_lr);
  if (!buf.run_rp.is_same(*running_var_rp)) running_var_rp->copy_(buf.run_rp);
}

void raise_if_invalid_sigma(const CoordinateBuffers& buf) {
  // On CUDA, item() waits for the kernels: the one synchronisation of the op.
  const int invalid = buf.invalid.is_cpu() ? *buf.invalid.data_ptr<int>() : buf.invalid.item<int>();
  TORCH_CHECK_VALUE(invalid == 0,
                    "gaussian_tpx_backward: sigma must be finite and > 0 everywhere (found an "
                    "entry <= 0, inf or NaN); pass check_sigma=False to skip this check");
}

namespace {

// Rows are processed in blocks of V consecutive rows read as one flat run of
// L = V * C "lanes" (flat indices e0 .. e0 + L), so the inner loop is long and
// contiguous, and vectorises, even for C = 1 (Dreamer's action nodes have
// C of 1 to 40). Each lane keeps its own Welford moments; the V lanes of a
// column are Chan-merged at the end of the chunk.
constexpr int64_t kMinLanes = 64;

int64_t rows_per_block(int64_t C) { return std::max<int64_t>(1, kMinLanes / C); }

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

// The two hot loops are compiled twice: for the baseline x86-64 ISA and for
// AVX2+FMA (4 doubles per instruction instead of 2), picked at run time, so
// the wheel stays portable. TPX_HOT marks the shared bodies (always inlined
// into each variant, which is then compiled for that variant's ISA).
#if defined(__x86_64__) && defined(__GNUC__)
#define TPX_MULTIVERSION 1
#define TPX_HOT inline __attribute__((always_inline))
const bool kHaveAvx2 = [] {
  __builtin_cpu_init();  // static initialisers may run before libgcc's
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}();
#else
#define TPX_MULTIVERSION 0
#define TPX_HOT inline
#endif

// Pass 1's hot loop over R consecutive blocks of L lanes (R = 2: both blocks'
// values are paired and merged in one step, welford_add_pair). Every
// accumulator array has its own __restrict__ pointer (group g's arrays start
// at g * L), so the compiler vectorises without aliasing checks. row_val
// holds R * L per-lane row values; n is the count before these blocks.
template <bool Check, int R, typename Source>
TPX_HOT void accumulate_block_body(const Source& src, int64_t e0, int64_t L,
                                   const double* __restrict__ row_val, double n,
                                   double* __restrict__ ml0, double* __restrict__ vl0,
                                   double* __restrict__ mr0, double* __restrict__ vr0,
                                   double* __restrict__ ml1, double* __restrict__ vl1,
                                   double* __restrict__ mr1, double* __restrict__ vr1,
                                   double* __restrict__ invalid) {
  constexpr int G = Source::G;
  static_assert(G == 1 || G == 2, "sources have one or two groups");
  static_assert(R == 1 || R == 2, "one or two blocks at a time");
  const double inv_n = 1.0 / (n + 1.0);                        // R = 1
  const double w_mean = 2.0 / (n + 2.0), w_m2 = n * w_mean;  // R = 2
  for (int64_t l = 0; l < L; ++l) {
    double lr[R][G], rp[R][G];
    for (int r = 0; r < R; ++r) src.read(e0 + r * L + l, row_val[r * L + l], lr[r], rp[r]);
    if constexpr (R == 1) {
      welford_add(lr[0][0], inv_n, ml0[l], vl0[l]);
      welford_add(rp[0][0], inv_n, mr0[l], vr0[l]);
      if constexpr (G == 2) {
        welford_add(lr[0][1], inv_n, ml1[l], vl1[l]);
        welford_add(rp[0][1], inv_n, mr1[l], vr1[l]);
      }
    } else {
      welford_add_pair(lr[0][0], lr[1][0], w_mean, w_m2, ml0[l], vl0[l]);
      welford_add_pair(rp[0][0], rp[1][0], w_mean, w_m2, mr0[l], vr0[l]);
      if constexpr (G == 2) {
        welford_add_pair(lr[0][1], lr[1][1], w_mean, w_m2, ml1[l], vl1[l]);
        welford_add_pair(rp[0][1], rp[1][1], w_mean, w_m2, mr1[l], vr1[l]);
      }
    }
    if (Check) {
      double bad = 0.0;
      for (int r = 0; r < R; ++r) bad += src.valid(e0 + r * L + l) ? 0.0 : 1.0;
      invalid[l] += bad;
    }
  }
}

#if TPX_MULTIVERSION
template <bool Check, int R, typename Source>
__attribute__((target("avx2,fma"))) void accumulate_block_avx2(
    const Source& src, int64_t e0, int64_t L, const double* __restrict__ row_val, double n,
    double* __restrict__ ml0, double* __restrict__ vl0, double* __restrict__ mr0,
    double* __restrict__ vr0, double* __restrict__ ml1, double* __restrict__ vl1,
    double* __restrict__ mr1, double* __restrict__ vr1, double* __restrict__ invalid) {
  accumulate_block_body<Check, R>(src, e0, L, row_val, n, ml0, vl0, mr0, vr0, ml1, vl1, mr1, vr1,
                                  invalid);
}
#endif

// Adds blocks b (and b + 1 when R = 2) of L lanes, flat indices from e0 on.
template <bool Check, int R, typename Source>
void accumulate_block(const Source& src, int64_t e0, int64_t L, const double* row_val, int64_t b,
                      Moments& lanes, double* invalid) {
  const int64_t g1 = Source::G == 2 ? L : 0;  // offset of group 1's lanes
  const double n = static_cast<double>(b);
  double* ml = lanes.mean_lr.data();
  double* vl = lanes.m2_lr.data();
  double* mr = lanes.mean_rp.data();
  double* vr = lanes.m2_rp.data();
#if TPX_MULTIVERSION
  if (kHaveAvx2)
    return accumulate_block_avx2<Check, R>(src, e0, L, row_val, n, ml, vl, mr, vr, ml + g1,
                                           vl + g1, mr + g1, vr + g1, invalid);
#endif
  accumulate_block_body<Check, R>(src, e0, L, row_val, n, ml, vl, mr, vr, ml + g1, vl + g1,
                                  mr + g1, vr + g1, invalid);
}

// Moments of `blocks` blocks of V rows from row r0 on; false if an input was
// invalid (only looked at when Check).
template <bool Check, typename Source>
bool block_moments(const Source& src, int64_t C, int64_t r0, int64_t blocks, int64_t V,
                   Moments& out) {
  constexpr int G = Source::G;
  const int64_t L = V * C;
  Moments lanes(G * L);
  std::vector<double> row_val(2 * L), invalid(L, 0.0);
  for (int64_t b = 0; b < blocks; b += 2) {
    const int64_t row0 = r0 + b * V, rows = std::min<int64_t>(2, blocks - b) * V;
    for (int64_t v = 0; v < rows; ++v) std::fill_n(row_val.data() + v * C, C, src.row_value(row0 + v));
    if (b + 1 < blocks)
      accumulate_block<Check, 2>(src, row0 * C, L, row_val.data(), b, lanes, invalid.data());
    else
      accumulate_block<Check, 1>(src, row0 * C, L, row_val.data(), b, lanes, invalid.data());
  }
  // Fold the V lanes of each column (each saw `blocks` samples) into out.
  out = Moments(G * C);
  const double n_lane = static_cast<double>(blocks);
  for (int64_t v = 0; v < V; ++v) {
    for (int g = 0; g < G; ++g) {
      for (int64_t j = 0; j < C; ++j) {
        const int64_t lane = g * L + v * C + j, q = g * C + j;
        chan_merge(out.n, out.mean_lr[q], out.m2_lr[q], n_lane, lanes.mean_lr[lane], lanes.m2_lr[lane]);
        chan_merge(out.n, out.mean_rp[q], out.m2_rp[q], n_lane, lanes.mean_rp[lane], lanes.m2_rp[lane]);
      }
    }
    out.n += n_lane;
  }
  return !Check || std::all_of(invalid.begin(), invalid.end(), [](double x) { return x == 0.0; });
}

// Moments of rows [r0, r1): whole blocks of V rows, then the leftover rows.
template <bool Check, typename Source>
bool chunk_moments(const Source& src, int64_t C, int64_t r0, int64_t r1, Moments& out) {
  const int64_t V = rows_per_block(C);
  const int64_t blocks = (r1 - r0) / V;
  bool ok = block_moments<Check>(src, C, r0, blocks, V, out);
  if (r0 + blocks * V < r1) {
    Moments tail(Source::G * C);
    ok &= block_moments<Check>(src, C, r0 + blocks * V, r1 - r0 - blocks * V, 1, tail);
    out.merge(tail);
  }
  return ok;
}

// Pass 2's hot loop over `lanes` lanes of one block; k0/k1 are the per-lane
// weights of groups 0 and 1.
template <typename Source>
TPX_HOT void combine_block_body(const Source& src, int64_t e0, int64_t lanes,
                                const double* __restrict__ row_val,
                                const double* __restrict__ k0, const double* __restrict__ k1) {
  constexpr int G = Source::G;
  for (int64_t l = 0; l < lanes; ++l) {
    double lr[G], rp[G], out[G];
    src.read(e0 + l, row_val[l], lr, rp);
    out[0] = combine(k0[l], lr[0], rp[0]);
    if constexpr (G == 2) out[1] = combine(k1[l], lr[1], rp[1]);
    src.write(e0 + l, out);
  }
}

#if TPX_MULTIVERSION
template <typename Source>
__attribute__((target("avx2,fma"))) void combine_block_avx2(const Source& src, int64_t e0,
                                                            int64_t lanes, const double* row_val,
                                                            const double* k0, const double* k1) {
  combine_block_body(src, e0, lanes, row_val, k0, k1);
}
#endif

template <typename Source>
void combine_block(const Source& src, int64_t e0, int64_t lanes, int64_t L,
                   const double* row_val, const double* k_lane) {
  const double* k1 = k_lane + (Source::G == 2 ? L : 0);
#if TPX_MULTIVERSION
  if (kHaveAvx2) return combine_block_avx2(src, e0, lanes, row_val, k_lane, k1);
#endif
  combine_block_body(src, e0, lanes, row_val, k_lane, k1);
}

// Combined gradients of rows [r0, r1), in blocks of V rows as in pass 1.
template <typename Source>
void combine_rows(const Source& src, int64_t C, int64_t r0, int64_t r1, const double* k) {
  constexpr int G = Source::G;
  const int64_t V = rows_per_block(C), L = V * C;
  std::vector<double> k_lane(G * L), row_val(L);
  for (int g = 0; g < G; ++g)
    for (int64_t l = 0; l < L; ++l) k_lane[g * L + l] = k[g * C + l % C];
  for (int64_t row0 = r0; row0 < r1; row0 += V) {
    const int64_t v_here = std::min(V, r1 - row0);
    for (int64_t v = 0; v < v_here; ++v) std::fill_n(row_val.data() + v * C, C, src.row_value(row0 + v));
    combine_block(src, row0 * C, v_here * C, L, row_val.data(), k_lane.data());
  }
}

// The whole node on the CPU: pass 1 (moments, one chunk of rows per thread,
// Chan merge), weights, pass 2 (combined gradients). See tpx_math.h.
template <typename Source>
void run_node_cpu(const Source& src, int64_t B, int64_t C, CoordinateBuffers& buf,
                  double momentum, bool check_valid) {
  constexpr int G = Source::G;
  const int64_t GC = G * C;

  const int64_t nchunks =
      B * C < kParallelGrain ? 1 : std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads()));
  std::vector<Moments> chunks(nchunks, Moments(GC));
  std::vector<char> valid(nchunks, 1);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = B * c / nchunks, r1 = B * (c + 1) / nchunks;
      valid[c] = check_valid ? chunk_moments<true>(src, C, r0, r1, chunks[c])
                             : chunk_moments<false>(src, C, r0, r1, chunks[c]);
    }
  });
  if (std::any_of(valid.begin(), valid.end(), [](char v) { return v == 0; })) {
    *buf.invalid.data_ptr<int>() = 1;
    return;
  }
  Moments& all = chunks[0];
  for (int64_t c = 1; c < nchunks; ++c) all.merge(chunks[c]);

  const bool has_running = buf.run_lr.defined();
  double* run_lr = has_running ? buf.run_lr.data_ptr<double>() : nullptr;
  double* run_rp = has_running ? buf.run_rp.data_ptr<double>() : nullptr;
  double* k = buf.k.data_ptr<double>();
  double* var_lr = buf.var_lr.data_ptr<double>();
  double* var_rp = buf.var_rp.data_ptr<double>();
  int64_t both_bad = 0;
  for (int64_t q = 0; q < GC; ++q) {
    double unused_lr = kNaN, unused_rp = kNaN;
    const CoordinateResult r = coordinate_weight(
        all.n, all.m2_lr[q], moments_bad(all.mean_lr[q], all.m2_lr[q]), all.m2_rp[q],
        moments_bad(all.mean_rp[q], all.m2_rp[q]), has_running,
        has_running ? run_lr[q] : unused_lr, has_running ? run_rp[q] : unused_rp, momentum,
        buf.fixed_k);
    k[q] = r.k;
    var_lr[q] = r.var_lr;
    var_rp[q] = r.var_rp;
    both_bad += r.both_bad;
  }
  *buf.nonfinite.data_ptr<int64_t>() = both_bad;

  at::parallel_for(0, B, std::max<int64_t>(1, kParallelGrain / C),
                   [&](int64_t r0, int64_t r1) { combine_rows(src, C, r0, r1, k); });
}

struct CpuRunner {
  template <typename Source>
  void operator()(const Source& src, int64_t B, int64_t C, CoordinateBuffers& buf,
                  double momentum, bool check_valid) const {
    run_node_cpu(src, B, C, buf, momentum, check_valid);
  }
};

IvwResult ivw_combine_cpu(const at::Tensor& g_lr, const at::Tensor& g_rp,
                          const std::optional<at::Tensor>& running_var_lr,
                          const std::optional<at::Tensor>& running_var_rp, double momentum,
                          std::optional<double> fixed_weight) {
  return ivw_combine_impl(CpuRunner{}, g_lr, g_rp, running_var_lr, running_var_rp, momentum,
                          fixed_weight);
}

GaussianResult gaussian_tpx_backward_cpu(const at::Tensor& d, const at::Tensor& eps,
                                         const at::Tensor& sigma, const at::Tensor& adv,
                                         const std::optional<at::Tensor>& running_var_lr,
                                         const std::optional<at::Tensor>& running_var_rp,
                                         double momentum, std::optional<double> fixed_weight,
                                         bool check_sigma) {
  return gaussian_tpx_backward_impl(CpuRunner{}, d, eps, sigma, adv, running_var_lr,
                                    running_var_rp, momentum, fixed_weight, check_sigma);
}

}  // namespace

TORCH_LIBRARY(tpx_ext, m) {
  m.def(
      "ivw_combine(Tensor g_lr, Tensor g_rp, Tensor(a!)? running_var_lr, "
      "Tensor(b!)? running_var_rp, float momentum, float? fixed_weight) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gaussian_tpx_backward(Tensor d, Tensor eps, Tensor sigma, Tensor adv, "
      "Tensor(a!)? running_var_lr, Tensor(b!)? running_var_rp, float momentum, "
      "float? fixed_weight, bool check_sigma) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tpx_ext, CPU, m) {
  m.impl("ivw_combine", &ivw_combine_cpu);
  m.impl("gaussian_tpx_backward", &gaussian_tpx_backward_cpu);
}

}  // namespace tpx
