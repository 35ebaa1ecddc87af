// Op schemas, argument validation and the CPU kernels.
//
// Each op is two passes over the batch: (1) per-coordinate moments of the
// per-sample LR and RP gradients (shifted block sums within a chunk of rows,
// Chan merge across lanes and chunks), then per-coordinate weights; (2) the
// combined gradient.
// The per-sample gradients are formed in registers in both passes and never
// stored. All the math lives in tpx_math.h, shared with the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

// The CPU kernel passes GCC vector types between always-inlined functions
// only (TPX_HOT, TPX_HD), so the ABI note on vector arguments does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "build_info.h"
#include "tpx_math.h"
#include "tpx_ops.h"

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
constexpr int64_t kParallelGrain = 4096;

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
  if (like.is_cpu()) {  // at::zeros would dispatch a fill for one element
    buf.nonfinite = at::empty({}, like.options().dtype(at::kLong));
    buf.invalid = at::empty({}, like.options().dtype(at::kInt));
    *buf.nonfinite.data_ptr<int64_t>() = 0;
    *buf.invalid.data_ptr<int>() = 0;
  } else {
    buf.nonfinite = at::zeros({}, like.options().dtype(at::kLong));
    buf.invalid = at::zeros({}, like.options().dtype(at::kInt));
  }
  if (running_var_lr.has_value()) {
    // A float64 contiguous buffer is updated in place; others via a copy.
    buf.run_lr = running_var_lr->to(at::kDouble).contiguous();
    buf.run_rp = running_var_rp->to(at::kDouble).contiguous();
  }
  if (fixed_weight.has_value()) buf.fixed_k = *fixed_weight;
  return buf;
}

at::Tensor advantages_as_double(const at::Tensor& adv) {
  if (adv.scalar_type() == at::kDouble || !adv.is_cpu()) return adv.to(at::kDouble).contiguous();
  // On the CPU a plain loop: a conversion op costs more than the op's small cases.
  at::Tensor out = at::empty({adv.size(0)}, adv.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  const int64_t n = adv.size(0), stride = adv.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, adv.scalar_type(), "advantages", [&] {
    const scalar_t* a = adv.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<double>(a[i * stride]);
  });
  return out;
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

// The hot code, once per ISA (tpx_cpu_kernels.inc).
#define TPX_ISA base
#define TPX_ISA_AVX2 0
#include "tpx_cpu_kernels.inc"
#undef TPX_ISA
#undef TPX_ISA_AVX2

#if defined(__x86_64__) && defined(__GNUC__)
#define TPX_MULTIVERSION 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TPX_ISA avx2
#define TPX_ISA_AVX2 1
#include "tpx_cpu_kernels.inc"
#undef TPX_ISA
#undef TPX_ISA_AVX2
#pragma GCC pop_options
#else
#define TPX_MULTIVERSION 0
#endif

namespace tpx {
namespace {

#if TPX_MULTIVERSION
const bool kHaveAvx2 = [] {
  __builtin_cpu_init();  // static initialisers may run before libgcc's
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}();
#endif

// Both passes divide float-valued sigma through the float reciprocal where
// it is in range (kFastRecipSource), by division otherwise.
template <bool Check, typename Source>
bool chunk_moments(const Source& src, int64_t C, int64_t r0, int64_t r1, Moments& out) {
  constexpr bool Fast = kFastRecipSource<Source>;
#if TPX_MULTIVERSION
  if (kHaveAvx2) return avx2::chunk_moments_isa<Fast, Check>(src, C, r0, r1, out);
#endif
  return base::chunk_moments_isa<Fast, Check>(src, C, r0, r1, out);
}

// mix: every weight inside (0, 1).
template <bool Mix, typename Source>
void chunk_combine_mode(const Source& src, int64_t C, int64_t r0, int64_t r1, const double* k) {
  constexpr bool Fast = kFastRecipSource<Source>;
#if TPX_MULTIVERSION
  if (kHaveAvx2) return avx2::chunk_combine_isa<Fast, Mix>(src, C, r0, r1, k);
#endif
  base::chunk_combine_isa<Fast, Mix>(src, C, r0, r1, k);
}

template <typename Source>
void chunk_combine(const Source& src, int64_t C, int64_t r0, int64_t r1, const double* k,
                   bool mix) {
  return mix ? chunk_combine_mode<true>(src, C, r0, r1, k)
             : chunk_combine_mode<false>(src, C, r0, r1, k);
}

// The whole node on the CPU: pass 1 (moments, one chunk of rows per thread,
// Chan merge), weights, pass 2 (combined gradients, same chunks). See tpx_math.h.
template <typename Source>
void run_node_cpu(const Source& src, int64_t B, int64_t C, CoordinateBuffers& buf,
                  double momentum, bool check_valid) {
  constexpr int G = Source::G;
  const int64_t GC = G * C;

  // Chunk boundaries on whole blocks of V rows, so that only the last chunk
  // has leftover rows.
  const int64_t V = rows_per_block(C);
  const int64_t nchunks =
      B * C < kParallelGrain ? 1 : std::max<int64_t>(1, std::min<int64_t>(B / V, at::get_num_threads()));
  const auto bound = [&](int64_t c) { return c == nchunks ? B : B * c / nchunks / V * V; };
  std::vector<Moments> chunks(nchunks, Moments(GC));
  std::vector<char> valid(nchunks, 1);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      valid[c] = check_valid ? chunk_moments<true>(src, C, bound(c), bound(c + 1), chunks[c])
                             : chunk_moments<false>(src, C, bound(c), bound(c + 1), chunks[c]);
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
  bool mix = true;  // every weight inside (0, 1)
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
    mix &= r.k > 0.0 && r.k < 1.0;
  }
  *buf.nonfinite.data_ptr<int64_t>() = both_bad;

  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) chunk_combine(src, C, bound(c), bound(c + 1), k, mix);
  });
}

// Large CPU outputs, recycled. A CPU tensor of more than a few hundred KiB
// from the default allocator is typically a fresh mmap, so each call
// page-faults and zeroes its outputs anew: for 1e7-element outputs that took
// longer than both passes of the kernel (1e5 x 50 float32, one thread: 15 ms
// of kernel, 25 ms more of page faults). Blocks of kMinCachedBytes and more
// are kept when their tensor dies, up to TPX_CPU_CACHE_MB MiB in all
// (default 256; 0 turns the cache off) and kMaxCachedBlocks blocks, and
// reused for the next output of exactly that size, as the CUDA caching
// allocator does for the CUDA path. The tensors are ordinary resizable CPU
// tensors; only their storage comes from here.
class OutputCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinCachedBytes = size_t{1} << 20;
  static constexpr size_t kMaxCachedBlocks = 16;

  // Never destroyed: tensors may be freed during interpreter shutdown.
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  size_t capacity() const { return capacity_; }

  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = free_.size(); i-- > 0;) {  // the most recently freed first
        if (free_[i].second == n) {
          p = free_[i].first;
          cached_ -= n;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          break;
        }
      }
    }
    if (p == nullptr && n > 0) p = c10::alloc_cpu(n);
    if (p != nullptr) {
      const std::lock_guard<std::mutex> lock(mutex_);
      live_[p] = n;
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  OutputCache() {
    const char* env = std::getenv("TPX_CPU_CACHE_MB");
    capacity_ = (env != nullptr ? std::strtoull(env, nullptr, 10) : 256) << 20;
  }

  static void release(void* p) { get().put(p); }

  void put(void* p) {
    std::vector<void*> drop;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto it = live_.find(p);
      const size_t n = it->second;
      live_.erase(it);
      if (n < kMinCachedBytes || n > capacity_) {
        drop.push_back(p);
      } else {
        free_.emplace_back(p, n);
        cached_ += n;
      }
      while (cached_ > capacity_ || free_.size() > kMaxCachedBlocks) {  // the oldest go
        drop.push_back(free_.front().first);
        cached_ -= free_.front().second;
        free_.erase(free_.begin());
      }
    }
    for (void* q : drop) c10::free_cpu(q);
  }

  std::mutex mutex_;
  std::unordered_map<void*, size_t> live_;
  std::vector<std::pair<void*, size_t>> free_;  // oldest first
  size_t cached_ = 0;
  size_t capacity_ = 0;
};

struct CpuRunner {
  at::Tensor new_output(at::IntArrayRef sizes, const at::Tensor& like) const {
    OutputCache& cache = OutputCache::get();
    const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * like.element_size();
    if (nbytes < OutputCache::kMinCachedBytes || nbytes > cache.capacity()) {
      return at::empty(sizes, like.options());
    }
    return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     like.scalar_type(), std::nullopt);
  }

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

std::string cpu_kernel_isa() {
#if TPX_MULTIVERSION
  if (kHaveAvx2) return "avx2+fma";
#endif
  return "baseline";
}

int cpu_threads() { return at::get_num_threads(); }

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
