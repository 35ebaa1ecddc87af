// CUDA kernels of the ops. Same two-pass structure and the same math
// (tpx_math.h) as the CPU path in tpx_ops.cpp:
//   moments_kernel   one block per (column tile, row chunk): per-thread
//                    Welford over its rows, block-level Chan merge in shared
//                    memory, one partial per (chunk, coordinate);
//   finalize_kernel  one thread per coordinate: merge the chunk partials,
//                    weight, variances, running statistics, non-finite count;
//   apply_kernel     the combined gradient, same thread layout as pass 1.
// Threads map to consecutive elements of the row-major [B, C] inputs for any
// C (several rows per block when C < 256), so loads are coalesced.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "build_info.h"
#include "tpx_math.h"
#include "tpx_ops.h"

namespace tpx {
namespace {

constexpr int kThreads = 256;

struct Tiling {
  int cols_per_block;  // columns covered by one block (<= kThreads)
  int rows_per_step;   // rows a block advances per step (kThreads / cols_per_block)
  int merge_span;      // rows_per_step rounded up to a power of two
  int64_t col_tiles;   // grid.x
  int64_t row_chunks;  // grid.y
  int64_t rows_per_chunk;
};

Tiling make_tiling(int64_t B, int64_t C, int64_t blocks_per_sm) {
  Tiling t;
  t.cols_per_block = static_cast<int>(std::min<int64_t>(C, kThreads));
  t.rows_per_step = kThreads / t.cols_per_block;
  t.merge_span = 1;
  while (t.merge_span < t.rows_per_step) t.merge_span *= 2;
  t.col_tiles = (C + t.cols_per_block - 1) / t.cols_per_block;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = std::max<int64_t>(1, blocks_per_sm * sms / t.col_tiles);
  const int64_t most = (B + t.rows_per_step - 1) / t.rows_per_step;  // >= one step each
  const int64_t chunks = std::min<int64_t>({want, most, 65535});
  t.rows_per_chunk = (B + chunks - 1) / chunks;
  t.row_chunks = (B + t.rows_per_chunk - 1) / t.rows_per_chunk;  // no empty chunk
  return t;
}

template <typename Source>
__global__ void __launch_bounds__(kThreads)
    moments_kernel(Source src, int64_t B, int64_t C, Tiling t, double* ws_mean_lr,
                   double* ws_m2_lr, double* ws_mean_rp, double* ws_m2_rp, int* invalid) {
  constexpr int G = Source::G;
  constexpr int S = 2 * G;  // streams: LR then RP for each group
  __shared__ double sh_n[kThreads];
  __shared__ double sh_mean[S][kThreads];
  __shared__ double sh_m2[S][kThreads];

  const int tid = threadIdx.x;
  const int lrow = tid / t.cols_per_block;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * t.cols_per_block + tid % t.cols_per_block;
  const bool active = lrow < t.rows_per_step && col < C;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * t.rows_per_chunk;
  const int64_t r1 = min(B, r0 + t.rows_per_chunk);

  double n = 0.0, mean[S], m2[S];
#pragma unroll
  for (int s = 0; s < S; ++s) mean[s] = m2[s] = 0.0;
  bool ok = true;
  if (active) {
    for (int64_t i = r0 + lrow; i < r1; i += t.rows_per_step) {
      n += 1.0;
      const double inv_n = 1.0 / n;
      const int64_t e = i * C + col;
      double lr[G], rp[G];
      src.read(e, src.row_value(i), lr, rp);
      if (invalid != nullptr) ok &= src.valid(e);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        welford_add(lr[g], inv_n, mean[g], m2[g]);
        welford_add(rp[g], inv_n, mean[G + g], m2[G + g]);
      }
    }
  }
  if (!ok) atomicOr(invalid, 1);

  sh_n[tid] = n;
#pragma unroll
  for (int s = 0; s < S; ++s) sh_mean[s][tid] = mean[s], sh_m2[s][tid] = m2[s];
  __syncthreads();
  // Tree merge over the rows_per_step threads that share a column.
  for (int stride = t.merge_span / 2; stride > 0; stride /= 2) {
    if (active && lrow < stride && lrow + stride < t.rows_per_step) {
      const int other = tid + stride * t.cols_per_block;
      const double n_a = sh_n[tid], n_b = sh_n[other];
#pragma unroll
      for (int s = 0; s < S; ++s)
        chan_merge(n_a, sh_mean[s][tid], sh_m2[s][tid], n_b, sh_mean[s][other], sh_m2[s][other]);
      sh_n[tid] = n_a + n_b;
    }
    __syncthreads();
  }
  if (active && lrow == 0) {
    const int64_t base = static_cast<int64_t>(blockIdx.y) * G * C + col;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int64_t q = base + g * C;
      ws_mean_lr[q] = sh_mean[g][tid];
      ws_m2_lr[q] = sh_m2[g][tid];
      ws_mean_rp[q] = sh_mean[G + g][tid];
      ws_m2_rp[q] = sh_m2[G + g][tid];
    }
  }
}

__global__ void finalize_kernel(int64_t GC, int64_t B, Tiling t, const double* ws_mean_lr,
                                const double* ws_m2_lr, const double* ws_mean_rp,
                                const double* ws_m2_rp, const int* invalid, double* run_lr,
                                double* run_rp, double momentum, double fixed_k, double* k,
                                double* var_lr, double* var_rp,
                                unsigned long long* nonfinite) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= GC) return;
  double n = static_cast<double>(min(B, t.rows_per_chunk));
  double mean_l = ws_mean_lr[q], m2_l = ws_m2_lr[q], mean_r = ws_mean_rp[q], m2_r = ws_m2_rp[q];
  for (int64_t c = 1; c < t.row_chunks; ++c) {
    const int64_t s = c * GC + q;
    const double n_b = static_cast<double>(min(B, (c + 1) * t.rows_per_chunk) - c * t.rows_per_chunk);
    chan_merge(n, mean_l, m2_l, n_b, ws_mean_lr[s], ws_m2_lr[s]);
    chan_merge(n, mean_r, m2_r, n_b, ws_mean_rp[s], ws_m2_rp[s]);
    n += n_b;
  }
  // An invalid input raises on the host; leave the running stats untouched.
  const bool has_running = run_lr != nullptr && (invalid == nullptr || *invalid == 0);
  double rl = has_running ? run_lr[q] : kNaN, rr = has_running ? run_rp[q] : kNaN;
  const CoordinateResult r =
      coordinate_weight(n, m2_l, moments_bad(mean_l, m2_l), m2_r, moments_bad(mean_r, m2_r),
                        has_running, rl, rr, momentum, fixed_k);
  if (has_running) run_lr[q] = rl, run_rp[q] = rr;
  k[q] = r.k;
  var_lr[q] = r.var_lr;
  var_rp[q] = r.var_rp;
  if (r.both_bad) atomicAdd(nonfinite, 1ull);
}

template <typename Source>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(Source src, int64_t B, int64_t C, Tiling t, const double* k) {
  constexpr int G = Source::G;
  const int tid = threadIdx.x;
  const int lrow = tid / t.cols_per_block;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * t.cols_per_block + tid % t.cols_per_block;
  if (lrow >= t.rows_per_step || col >= C) return;
  double kg[G];
#pragma unroll
  for (int g = 0; g < G; ++g) kg[g] = k[g * C + col];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * t.rows_per_chunk;
  const int64_t r1 = min(B, r0 + t.rows_per_chunk);
  for (int64_t i = r0 + lrow; i < r1; i += t.rows_per_step) {
    const int64_t e = i * C + col;
    double lr[G], rp[G], out[G];
    src.read(e, src.row_value(i), lr, rp);
#pragma unroll
    for (int g = 0; g < G; ++g) out[g] = combine(kg[g], lr[g], rp[g]);
    src.write(e, out);
  }
}

struct CudaRunner {
  at::Tensor new_output(at::IntArrayRef sizes, const at::Tensor& like) const {
    return at::empty(sizes, like.options());  // the caching allocator's
  }

  template <typename Source>
  void operator()(const Source& src, int64_t B, int64_t C, CoordinateBuffers& buf,
                  double momentum, bool check_valid) const {
    constexpr int G = Source::G;
    const int64_t GC = G * C;
    const c10::cuda::CUDAGuard guard(buf.k.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

    const Tiling t = make_tiling(B, C, /*blocks_per_sm=*/4);
    const auto f64 = buf.k.options();
    const at::Tensor ws = at::empty({4, t.row_chunks * GC}, f64);
    double* w = ws.data_ptr<double>();
    const int64_t stride = t.row_chunks * GC;
    int* invalid = buf.invalid.data_ptr<int>();

    moments_kernel<<<dim3(t.col_tiles, t.row_chunks), kThreads, 0, stream>>>(
        src, B, C, t, w, w + stride, w + 2 * stride, w + 3 * stride, check_valid ? invalid : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const bool has_running = buf.run_lr.defined();
    finalize_kernel<<<(GC + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        GC, B, t, w, w + stride, w + 2 * stride, w + 3 * stride, check_valid ? invalid : nullptr,
        has_running ? buf.run_lr.data_ptr<double>() : nullptr,
        has_running ? buf.run_rp.data_ptr<double>() : nullptr, momentum, buf.fixed_k,
        buf.k.data_ptr<double>(), buf.var_lr.data_ptr<double>(), buf.var_rp.data_ptr<double>(),
        reinterpret_cast<unsigned long long*>(buf.nonfinite.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const Tiling ta = make_tiling(B, C, /*blocks_per_sm=*/8);
    apply_kernel<<<dim3(ta.col_tiles, ta.row_chunks), kThreads, 0, stream>>>(src, B, C, ta,
                                                                          buf.k.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

IvwResult ivw_combine_cuda(const at::Tensor& g_lr, const at::Tensor& g_rp,
                           const std::optional<at::Tensor>& running_var_lr,
                           const std::optional<at::Tensor>& running_var_rp, double momentum,
                           std::optional<double> fixed_weight) {
  return ivw_combine_impl(CudaRunner{}, g_lr, g_rp, running_var_lr, running_var_rp, momentum,
                          fixed_weight);
}

GaussianResult gaussian_tpx_backward_cuda(const at::Tensor& d, const at::Tensor& eps,
                                          const at::Tensor& sigma, const at::Tensor& adv,
                                          const std::optional<at::Tensor>& running_var_lr,
                                          const std::optional<at::Tensor>& running_var_rp,
                                          double momentum, std::optional<double> fixed_weight,
                                          bool check_sigma) {
  return gaussian_tpx_backward_impl(CudaRunner{}, d, eps, sigma, adv, running_var_lr,
                                    running_var_rp, momentum, fixed_weight, check_sigma);
}

}  // namespace

int cuda_compiled_version() { return CUDART_VERSION; }

int cuda_runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int cuda_driver_version() {
  int v = 0;  // 0 when no driver is installed
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

TORCH_LIBRARY_IMPL(tpx_ext, CUDA, m) {
  m.impl("ivw_combine", &ivw_combine_cuda);
  m.impl("gaussian_tpx_backward", &gaussian_tpx_backward_cuda);
}

}  // namespace tpx
