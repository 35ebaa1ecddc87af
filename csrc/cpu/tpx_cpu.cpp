// The CPU kernels of the ops: the runner (row chunks on torch's thread
// pool, pass 1, pass 1b, weights, pass 2), the output cache, and the dispatcher
// registration for CPU tensors.
//
// Pass 1 takes per-coordinate moments of the per-sample LR and RP gradients
// (shifted block sums within a chunk of rows, Chan merge across lanes and
// chunks); pass 2 writes the combined gradient. The hot loops are in
// tpx_cpu_kernels.inc, compiled twice (baseline x86-64 and AVX2+FMA) and
// picked at run time; the layout they share is tpx_cpu_layout.h; all the
// math is in tpx_math.h, shared with the CUDA kernels.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/BFloat16.h>
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

#include "build_info.h"
#include "tpx_cpu_layout.h"
#include "tpx_math.h"
#include "tpx_ops.h"

// The hot code, once per ISA.
#define TPX_ISA base
#define TPX_ISA_AVX2 0
#include "tpx_cpu_kernels.inc"
#include "tpx_cpu_comoments.inc"
#undef TPX_ISA
#undef TPX_ISA_AVX2

#if defined(__x86_64__) && defined(__GNUC__)
#define TPX_MULTIVERSION 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TPX_ISA avx2
#define TPX_ISA_AVX2 1
#include "tpx_cpu_kernels.inc"
#include "tpx_cpu_comoments.inc"
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

template <typename Source>
void chunk_fourth(const Source& src, int64_t C, int64_t r0, int64_t r1, const double* centre,
                  double* out) {
  constexpr bool Fast = kFastRecipSource<Source>;
#if TPX_MULTIVERSION
  if (kHaveAvx2) return avx2::chunk_fourth_isa<Fast>(src, C, r0, r1, centre, out);
#endif
  base::chunk_fourth_isa<Fast>(src, C, r0, r1, centre, out);
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

template <typename T>
void chunk_comoments(const ComomentSource<T>& src, int64_t r0, int64_t r1, CoAccumulator& acc) {
#if TPX_MULTIVERSION
  if (kHaveAvx2) return avx2::chunk_comoments_isa(src, r0, r1, acc);
#endif
  base::chunk_comoments_isa(src, r0, r1, acc);
}

template <typename T>
void chunk_comoment_fourth(const ComomentSource<T>& src, int64_t r0, int64_t r1,
                           const double* centre, double* sum) {
#if TPX_MULTIVERSION
  if (kHaveAvx2) return avx2::chunk_comoment_fourth_isa(src, r0, r1, centre, sum);
#endif
  base::chunk_comoment_fourth_isa(src, r0, r1, centre, sum);
}

// Below this many elements one thread is faster than waking the pool.
constexpr int64_t kParallelGrain = 4096;

// The whole node on the CPU: pass 1 (moments, one chunk of rows per thread,
// Chan merge), pass 1b where ucb > 0 (same chunks), weights, pass 2
// (combined gradients, same chunks). See tpx_math.h.
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
  const auto lr_of = [&](int64_t q) { return moments_bad(all.mean_lr[q], all.m2_lr[q]); };
  const auto rp_of = [&](int64_t q) { return moments_bad(all.mean_rp[q], all.m2_rp[q]); };

  // Pass 1b (ucb > 0): per chunk, the sums of z^2 given the batch means and
  // variances; added in chunk order, so the result does not depend on timing.
  // Empty, and so no allocation on the two-pass path, where ucb = 0 ignores the sums.
  std::vector<double> sum_z2;  // LR, then RP
  if (buf.ucb > 0.0) {
    sum_z2.assign(2 * GC, 0.0);
    std::vector<double> centre(4 * GC);  // mean_lr, iv_lr, mean_rp, iv_rp
    for (int64_t q = 0; q < GC; ++q) {
      centre[q] = all.mean_lr[q];
      centre[GC + q] = inverse_variance_or_zero(batch_variance(all.m2_lr[q], all.n, lr_of(q)));
      centre[2 * GC + q] = all.mean_rp[q];
      centre[3 * GC + q] = inverse_variance_or_zero(batch_variance(all.m2_rp[q], all.n, rp_of(q)));
    }
    std::vector<std::vector<double>> parts(nchunks, std::vector<double>(2 * GC, 0.0));
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        chunk_fourth(src, C, bound(c), bound(c + 1), centre.data(), parts[c].data());
    });
    for (const auto& part : parts)
      for (int64_t q = 0; q < 2 * GC; ++q) sum_z2[q] += part[q];
  }

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
    const double z2_lr = sum_z2.empty() ? 0.0 : sum_z2[q];
    const double z2_rp = sum_z2.empty() ? 0.0 : sum_z2[GC + q];
    const CoordinateResult r = coordinate_weight(
        all.n, {all.m2_lr[q], lr_of(q), z2_lr}, {all.m2_rp[q], rp_of(q), z2_rp},
        buf.ucb, has_running, has_running ? run_lr[q] : unused_lr,
        has_running ? run_rp[q] : unused_rp, momentum, buf.fixed_k);
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

// gaussian_tpx_comoments on the CPU: co-moments of one chunk of rows per
// thread (tpx_cpu_comoments.inc), merged in chunk order by Chan's formula;
// then the covariance, the non-finite columns, and the bounds (pass 1b over
// the same chunks where ucb > 0).
constexpr int64_t kComomentGrain = 1 << 16;  // multiply-adds below which one thread runs

template <typename T>
void run_comoments_cpu(const ComomentSource<T>& src, int64_t B, double* cov, double* bound,
                       bool* finite, double ucb) {
  const int64_t K = src.columns();
  const int64_t nchunks =
      B * K * K / 2 < kComomentGrain
          ? 1
          : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / kCoBlock));
  const auto bound_of = [&](int64_t c) { return B * c / nchunks; };
  std::vector<CoAccumulator> parts(nchunks, CoAccumulator(K));
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) chunk_comoments(src, bound_of(c), bound_of(c + 1), parts[c]);
  });
  CoAccumulator& all = parts[0];
  for (int64_t c = 1; c < nchunks; ++c) all.merge(parts[c]);

  const int64_t Kp = all.Kp;
  std::vector<char> bad(K);
  std::vector<double> var(K), centre(2 * K);
  for (int64_t a = 0; a < K; ++a) {
    bad[a] = moments_bad(all.mean[a], all.m[a * Kp + a]);
    var[a] = batch_variance(all.m[a * Kp + a], all.n, bad[a]);
    centre[a] = all.mean[a];
    centre[K + a] = inverse_variance_or_zero(var[a]);
    finite[a] = !bad[a];
  }
  for (int64_t a = 0; a < K; ++a) {
    for (int64_t b = a; b < K; ++b) {
      const double v = comoment_covariance(all.m[a * Kp + b], all.n, bad[a], bad[b], a == b);
      cov[a * K + b] = v;
      cov[b * K + a] = v;
    }
  }

  std::vector<double> sum_z2(K, 0.0);
  if (ucb > 0.0 && B > 1) {
    std::vector<std::vector<double>> sums(nchunks, std::vector<double>(K, 0.0));
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        chunk_comoment_fourth(src, bound_of(c), bound_of(c + 1), centre.data(), sums[c].data());
    });
    for (const auto& part : sums)
      for (int64_t a = 0; a < K; ++a) sum_z2[a] += part[a];
  }
  for (int64_t a = 0; a < K; ++a) bound[a] = comoment_bound(var[a], bad[a], sum_z2[a], all.n, ucb);
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

  template <typename T>
  void comoments(const ComomentSource<T>& src, int64_t B, at::Tensor& cov, at::Tensor& bound,
                 at::Tensor& finite, double ucb) const {
    run_comoments_cpu(src, B, cov.data_ptr<double>(), bound.data_ptr<double>(),
                      finite.data_ptr<bool>(), ucb);
  }
};

IvwResult ivw_combine_cpu(const at::Tensor& g_lr, const at::Tensor& g_rp,
                          const std::optional<at::Tensor>& running_var_lr,
                          const std::optional<at::Tensor>& running_var_rp, double momentum,
                          std::optional<double> fixed_weight, double ucb) {
  return ivw_combine_impl(CpuRunner{}, g_lr, g_rp, running_var_lr, running_var_rp, momentum,
                          fixed_weight, ucb);
}

GaussianResult gaussian_tpx_backward_cpu(const at::Tensor& d, const at::Tensor& eps,
                                         const at::Tensor& sigma, const at::Tensor& adv,
                                         const std::optional<at::Tensor>& running_var_lr,
                                         const std::optional<at::Tensor>& running_var_rp,
                                         double momentum, std::optional<double> fixed_weight,
                                         bool check_sigma, double ucb) {
  return gaussian_tpx_backward_impl(CpuRunner{}, d, eps, sigma, adv, running_var_lr,
                                    running_var_rp, momentum, fixed_weight, check_sigma, ucb);
}

ComomentsResult gaussian_tpx_comoments_cpu(const at::Tensor& d, const at::Tensor& eps,
                                           const at::Tensor& sigma, const at::Tensor& adv,
                                           int64_t groups, double ucb) {
  return gaussian_tpx_comoments_impl(CpuRunner{}, d, eps, sigma, adv, groups, ucb);
}

}  // namespace

std::string cpu_kernel_isa() {
#if TPX_MULTIVERSION
  if (kHaveAvx2) return "avx2+fma";
#endif
  return "baseline";
}

int cpu_threads() { return at::get_num_threads(); }

TORCH_LIBRARY_IMPL(tpx_ext, CPU, m) {
  m.impl("ivw_combine", &ivw_combine_cpu);
  m.impl("gaussian_tpx_backward", &gaussian_tpx_backward_cpu);
  m.impl("gaussian_tpx_comoments", &gaussian_tpx_comoments_cpu);
}

}  // namespace tpx
