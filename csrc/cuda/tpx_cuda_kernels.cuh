// The CUDA kernels of the ops and the tiling they are launched with, as
// device code only: no ATen, no CUDA runtime, nothing but tpx_math.h. The
// CUDA runner (tpx_cuda.cu) includes it for nvcc; the emulation test
// (tests/test_cuda_emulated.cpp) compiles it for the CPU through a shim of
// the CUDA built-ins it uses (threadIdx, blockIdx, blockDim, __shared__,
// __syncthreads, atomicOr, atomicAdd, min). So device facts such as the SM
// count are parameters, and kernels are launched only through launch_node,
// which takes the launch as a helper: the runner's launches on its stream,
// the test's runs the blocks on CPU threads.
//
// Same two-pass structure and the same math (tpx_math.h) as the CPU path:
//   moments_kernel   one block per (column tile, row chunk): per-thread
//                    Welford over its rows, block-level Chan merge in shared
//                    memory, one partial per (chunk, coordinate);
//   finalize_kernel  one thread per coordinate: merge the chunk partials,
//                    weight, variances, running statistics, non-finite count;
//   apply_kernel     the combined gradient, same thread layout as pass 1.
// Threads map to consecutive elements of the row-major [B, C] inputs for any
// C (several rows per block when C < 256), so loads are coalesced.
#pragma once

#include <algorithm>
#include <cstdint>

#include "tpx_math.h"

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

// sms: the device's multiprocessor count; blocks_per_sm * sms blocks are
// wanted in all, so that every SM has work.
inline Tiling make_tiling(int64_t B, int64_t C, int64_t blocks_per_sm, int64_t sms) {
  Tiling t;
  t.cols_per_block = static_cast<int>(std::min<int64_t>(C, kThreads));
  t.rows_per_step = kThreads / t.cols_per_block;
  t.merge_span = 1;
  while (t.merge_span < t.rows_per_step) t.merge_span *= 2;
  t.col_tiles = (C + t.cols_per_block - 1) / t.cols_per_block;
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

// ---- Launching a node --------------------------------------------------------
// A launch helper is called as launch(kernel, grid, args...) and runs
// `kernel` on grid.x * grid.y blocks of kThreads threads with those
// arguments; launches run in order, each after the previous one finished
// (one stream).

struct Grid {  // dim3, without the CUDA headers
  int64_t x, y;
};

// The tilings of a node's two row passes, and its workspace: pass 1's
// partials, four arrays (mean and m2 of LR and RP) of ws_stride doubles.
struct NodePlan {
  Tiling moments;
  Tiling apply;
  int64_t ws_stride;  // moments.row_chunks * G * C
  int64_t workspace_size() const { return 4 * ws_stride; }
};

inline NodePlan plan_node(int64_t B, int64_t C, int G, int64_t sms) {
  NodePlan p;
  p.moments = make_tiling(B, C, /*blocks_per_sm=*/4, sms);
  p.apply = make_tiling(B, C, /*blocks_per_sm=*/8, sms);
  p.ws_stride = p.moments.row_chunks * G * C;
  return p;
}

// Per-coordinate outputs and options of a node, all device pointers.
struct NodeArgs {
  double* k;                      // [G*C] weights on LR
  double* var_lr;                 // [G*C] batch variances
  double* var_rp;
  unsigned long long* nonfinite;  // [1] zero on entry: coordinates with both estimators bad
  int* invalid;                   // [1] zero on entry, set on an invalid input; null: unchecked
  double* run_lr;                 // [G*C] running variances, updated; null: none
  double* run_rp;
  double momentum;
  double fixed_k;  // < 0: inverse-variance weighting
};

// The whole node: moments, weights, combined gradient. ws: plan.workspace_size() doubles.
template <typename Launch, typename Source>
void launch_node(const Launch& launch, const Source& src, int64_t B, int64_t C,
                 const NodePlan& plan, double* ws, const NodeArgs& a) {
  constexpr int G = Source::G;
  const int64_t GC = G * C;
  const int64_t stride = plan.ws_stride;
  const Tiling& t = plan.moments;
  launch(moments_kernel<Source>, Grid{t.col_tiles, t.row_chunks}, src, B, C, t, ws, ws + stride,
         ws + 2 * stride, ws + 3 * stride, a.invalid);
  launch(finalize_kernel, Grid{(GC + kThreads - 1) / kThreads, 1}, GC, B, t, ws, ws + stride,
         ws + 2 * stride, ws + 3 * stride, a.invalid, a.run_lr, a.run_rp, a.momentum, a.fixed_k,
         a.k, a.var_lr, a.var_rp, a.nonfinite);
  const Tiling& ta = plan.apply;
  launch(apply_kernel<Source>, Grid{ta.col_tiles, ta.row_chunks}, src, B, C, ta, a.k);
}

}  // namespace
}  // namespace tpx
