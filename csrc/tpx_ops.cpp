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
constexpr int64_t kParallelGrain = 32768;

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
  TORCH_CHECK_VALUE(buf.invalid.item<int>() == 0,
                    "gaussian_tpx_backward: sigma must be finite and > 0 everywhere (found an "
                    "entry <= 0, inf or NaN); pass check_sigma=False to skip this check");
}

namespace {

// The whole node on the CPU. Source supplies per-sample (lr, rp) values per
// (row, column) and writes the combined result; see tpx_math.h.
template <typename Source>
void run_node_cpu(const Source& src, int64_t B, int64_t C, CoordinateBuffers& buf,
                  double momentum, bool check_valid) {
  constexpr int G = Source::G;
  const int64_t GC = G * C;

  // Pass 1: moments over chunks of rows, one chunk per thread.
  const int64_t nchunks =
      B * C < kParallelGrain ? 1 : std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads()));
  const int64_t n_acc = nchunks * GC;
  std::vector<double> mean_lr(n_acc, 0.0), m2_lr(n_acc, 0.0), mean_rp(n_acc, 0.0), m2_rp(n_acc, 0.0);
  std::unique_ptr<bool[]> bad_lr(new bool[n_acc]()), bad_rp(new bool[n_acc]());
  std::vector<char> invalid(nchunks, 0);
  auto chunk_begin = [&](int64_t c) { return B * c / nchunks; };

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* ml = mean_lr.data() + c * GC;
      double* vl = m2_lr.data() + c * GC;
      double* mr = mean_rp.data() + c * GC;
      double* vr = m2_rp.data() + c * GC;
      bool* bl = bad_lr.get() + c * GC;
      bool* br = bad_rp.get() + c * GC;
      bool ok = true;
      const int64_t r0 = chunk_begin(c), r1 = chunk_begin(c + 1);
      for (int64_t i = r0; i < r1; ++i) {
        const double inv_n = 1.0 / static_cast<double>(i - r0 + 1);
        for (int64_t j = 0; j < C; ++j) {
          double lr[G], rp[G];
          ok &= src.read(i, j, lr, rp);
          for (int g = 0; g < G; ++g) {
            const int64_t q = g * C + j;
            welford_add(lr[g], inv_n, ml[q], vl[q], bl[q]);
            welford_add(rp[g], inv_n, mr[q], vr[q], br[q]);
          }
        }
      }
      invalid[c] = !ok;
    }
  });
  if (check_valid && std::any_of(invalid.begin(), invalid.end(), [](char v) { return v != 0; })) {
    buf.invalid.fill_(1);
    return;
  }

  // Merge the chunks into chunk 0, then one weight per coordinate.
  for (int64_t c = 1; c < nchunks; ++c) {
    const double n_a = static_cast<double>(chunk_begin(c));
    const double n_b = static_cast<double>(chunk_begin(c + 1) - chunk_begin(c));
    for (int64_t q = 0; q < GC; ++q) {
      const int64_t s = c * GC + q;
      chan_merge(n_a, mean_lr[q], m2_lr[q], bad_lr[q], n_b, mean_lr[s], m2_lr[s], bad_lr[s]);
      chan_merge(n_a, mean_rp[q], m2_rp[q], bad_rp[q], n_b, mean_rp[s], m2_rp[s], bad_rp[s]);
    }
  }
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
        static_cast<double>(B), m2_lr[q], bad_lr[q], m2_rp[q], bad_rp[q], has_running,
        has_running ? run_lr[q] : unused_lr, has_running ? run_rp[q] : unused_rp, momentum,
        buf.fixed_k);
    k[q] = r.k;
    var_lr[q] = r.var_lr;
    var_rp[q] = r.var_rp;
    both_bad += r.both_bad;
  }
  buf.nonfinite.fill_(both_bad);

  // Pass 2: combined gradients, rows in parallel.
  at::parallel_for(0, B, std::max<int64_t>(1, kParallelGrain / C), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      for (int64_t j = 0; j < C; ++j) {
        double lr[G], rp[G], out[G];
        src.read(i, j, lr, rp);
        for (int g = 0; g < G; ++g) out[g] = combine(k[g * C + j], lr[g], rp[g]);
        src.write(i, j, out);
      }
    }
  });
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
