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
// Same passes and the same math (tpx_math.h) as the CPU path:
//   moments_kernel   one block per (column tile, row chunk): per-thread
//                    Welford over its rows, block-level Chan merge in shared
//                    memory, one partial per (chunk, coordinate);
//   centre_kernel,   (ucb > 0 only) one thread per coordinate: the batch mean
//   fourth_kernel    and 1 / variance; then pass 1b, the sums of z^2 in pass
//                    1's layout, one partial per (chunk, coordinate);
//   finalize_kernel  one thread per coordinate: merge the chunk partials,
//                    weight, variances, running statistics, non-finite count;
//   apply_kernel     the combined gradient, same thread layout as pass 1.
// Partials are merged in chunk order, so results do not depend on timing.
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
  double ucb;      // > 0: weights from the variances' upper bounds (pass 1b)
};

// The workspace: the passes' partials, [row_chunks][G*C] each (index
// chunk * G*C + coordinate), and pass 1b's centres.
struct Partials {
  double* mean_lr;  // pass 1
  double* m2_lr;
  double* mean_rp;
  double* m2_rp;
  double* z2_lr;    // pass 1b's sums of z^2; null without it
  double* z2_rp;
  double* centre;   // [4][G*C]: mean_lr, 1 / var_lr, mean_rp, 1 / var_rp; null without it
};

// The moments of coordinate q, merged over the row chunks in order.
struct MergedMoments {
  double n, mean_lr, m2_lr, mean_rp, m2_rp;
};

TPX_HD MergedMoments merge_chunks(const Partials& p, int64_t q, int64_t GC, int64_t B,
                                  const Tiling& t) {
  // Chunk c holds rows [c * rows_per_chunk, min(B, (c + 1) * rows_per_chunk)).
  const auto rows_of = [&](int64_t c) {
    const int64_t end = (c + 1) * t.rows_per_chunk;
    return static_cast<double>((end < B ? end : B) - c * t.rows_per_chunk);
  };
  MergedMoments m{rows_of(0), p.mean_lr[q], p.m2_lr[q], p.mean_rp[q], p.m2_rp[q]};
  for (int64_t c = 1; c < t.row_chunks; ++c) {
    const int64_t s = c * GC + q;
    const double n_b = rows_of(c);
    chan_merge(m.n, m.mean_lr, m.m2_lr, n_b, p.mean_lr[s], p.m2_lr[s]);
    chan_merge(m.n, m.mean_rp, m.m2_rp, n_b, p.mean_rp[s], p.m2_rp[s]);
    m.n += n_b;
  }
  return m;
}

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TPX_DEVICE __device__ __forceinline__
#else
#define TPX_DEVICE inline
#endif

// Where a thread of a row pass works (moments, fourth and apply kernels share
// the layout): threads map to consecutive elements of the row-major [B, C]
// inputs, lrow-th row of each step of rows_per_step rows, column col; the
// block's row chunk is [r0, r1). Inactive threads (past C, or beyond the
// step's rows) take part in the barriers only.
struct RowSlot {
  int tid;
  int lrow;
  int64_t col;
  bool active;
  int64_t r0, r1;
};

TPX_DEVICE RowSlot row_slot(const Tiling& t, int64_t B, int64_t C) {
  RowSlot s;
  s.tid = static_cast<int>(threadIdx.x);
  s.lrow = s.tid / t.cols_per_block;
  s.col = static_cast<int64_t>(blockIdx.x) * t.cols_per_block + s.tid % t.cols_per_block;
  s.active = s.lrow < t.rows_per_step && s.col < C;
  s.r0 = static_cast<int64_t>(blockIdx.y) * t.rows_per_chunk;
  s.r1 = min(B, s.r0 + t.rows_per_chunk);
  return s;
}

template <typename Source>
__global__ void __launch_bounds__(kThreads)
    moments_kernel(Source src, int64_t B, int64_t C, Tiling t, Partials p, int* invalid) {
  constexpr int G = Source::G;
  constexpr int S = 2 * G;  // streams: LR then RP for each group
  __shared__ double sh_n[kThreads];
  __shared__ double sh_mean[S][kThreads];
  __shared__ double sh_m2[S][kThreads];

  const RowSlot slot = row_slot(t, B, C);
  const int tid = slot.tid, lrow = slot.lrow;
  const int64_t col = slot.col, r0 = slot.r0, r1 = slot.r1;
  const bool active = slot.active;

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
      p.mean_lr[q] = sh_mean[g][tid];
      p.m2_lr[q] = sh_m2[g][tid];
      p.mean_rp[q] = sh_mean[G + g][tid];
      p.m2_rp[q] = sh_m2[G + g][tid];
    }
  }
}

__global__ void centre_kernel(int64_t GC, int64_t B, Tiling t, Partials p) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= GC) return;
  const MergedMoments m = merge_chunks(p, q, GC, B, t);
  p.centre[q] = m.mean_lr;
  p.centre[GC + q] =
      inverse_variance_or_zero(batch_variance(m.m2_lr, m.n, moments_bad(m.mean_lr, m.m2_lr)));
  p.centre[2 * GC + q] = m.mean_rp;
  p.centre[3 * GC + q] =
      inverse_variance_or_zero(batch_variance(m.m2_rp, m.n, moments_bad(m.mean_rp, m.m2_rp)));
}

// Pass 1b: moments_kernel's layout, sums instead of moments.
template <typename Source>
__global__ void __launch_bounds__(kThreads)
    fourth_kernel(Source src, int64_t B, int64_t C, Tiling t, Partials p) {
  constexpr int G = Source::G;
  constexpr int S = 2 * G;  // streams: LR then RP for each group
  __shared__ double sh_sum[S][kThreads];

  const RowSlot slot = row_slot(t, B, C);
  const int tid = slot.tid, lrow = slot.lrow;
  const int64_t col = slot.col, r0 = slot.r0, r1 = slot.r1;
  const bool active = slot.active;
  const int64_t GC = G * C;

  double sum[S], mean[S], iv[S];
#pragma unroll
  for (int s = 0; s < S; ++s) sum[s] = mean[s] = iv[s] = 0.0;
  if (active) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int64_t q = g * C + col;
      mean[g] = p.centre[q];
      iv[g] = p.centre[GC + q];
      mean[G + g] = p.centre[2 * GC + q];
      iv[G + g] = p.centre[3 * GC + q];
    }
    for (int64_t i = r0 + lrow; i < r1; i += t.rows_per_step) {
      double lr[G], rp[G];
      src.read(i * C + col, src.row_value(i), lr, rp);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        standardized_fourth_add(lr[g], mean[g], iv[g], sum[g]);
        standardized_fourth_add(rp[g], mean[G + g], iv[G + g], sum[G + g]);
      }
    }
  }
#pragma unroll
  for (int s = 0; s < S; ++s) sh_sum[s][tid] = sum[s];
  __syncthreads();
  for (int stride = t.merge_span / 2; stride > 0; stride /= 2) {
    if (active && lrow < stride && lrow + stride < t.rows_per_step) {
      const int other = tid + stride * t.cols_per_block;
#pragma unroll
      for (int s = 0; s < S; ++s) sh_sum[s][tid] += sh_sum[s][other];
    }
    __syncthreads();
  }
  if (active && lrow == 0) {
    const int64_t base = static_cast<int64_t>(blockIdx.y) * GC + col;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      p.z2_lr[base + g * C] = sh_sum[g][tid];
      p.z2_rp[base + g * C] = sh_sum[G + g][tid];
    }
  }
}

__global__ void finalize_kernel(int64_t GC, int64_t B, Tiling t, Partials p, NodeArgs a) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= GC) return;
  const MergedMoments m = merge_chunks(p, q, GC, B, t);
  double z2_lr = 0.0, z2_rp = 0.0;
  if (p.z2_lr != nullptr) {
    for (int64_t c = 0; c < t.row_chunks; ++c) z2_lr += p.z2_lr[c * GC + q], z2_rp += p.z2_rp[c * GC + q];
  }
  // An invalid input raises on the host; leave the running stats untouched.
  const bool has_running = a.run_lr != nullptr && (a.invalid == nullptr || *a.invalid == 0);
  double rl = has_running ? a.run_lr[q] : kNaN, rr = has_running ? a.run_rp[q] : kNaN;
  const CoordinateResult r = coordinate_weight(
      m.n, {m.m2_lr, moments_bad(m.mean_lr, m.m2_lr), z2_lr},
      {m.m2_rp, moments_bad(m.mean_rp, m.m2_rp), z2_rp}, p.z2_lr != nullptr ? a.ucb : 0.0,
      has_running, rl, rr, a.momentum, a.fixed_k);
  if (has_running) a.run_lr[q] = rl, a.run_rp[q] = rr;
  a.k[q] = r.k;
  a.var_lr[q] = r.var_lr;
  a.var_rp[q] = r.var_rp;
  if (r.both_bad) atomicAdd(a.nonfinite, 1ull);
}

template <typename Source>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(Source src, int64_t B, int64_t C, Tiling t, const double* k) {
  constexpr int G = Source::G;
  const RowSlot slot = row_slot(t, B, C);
  if (!slot.active) return;
  double kg[G];
#pragma unroll
  for (int g = 0; g < G; ++g) kg[g] = k[g * C + slot.col];
  for (int64_t i = slot.r0 + slot.lrow; i < slot.r1; i += t.rows_per_step) {
    const int64_t e = i * C + slot.col;
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

// The tilings of a node's row passes, and its workspace: pass 1's partials,
// four arrays (mean and m2 of LR and RP) of ws_stride doubles, and with
// pass 1b two more (the sums of z^2) and the 4 G*C centres.
struct NodePlan {
  Tiling moments;  // pass 1, and pass 1b
  Tiling apply;
  int64_t ws_stride;  // moments.row_chunks * G * C
  int64_t GC;
  bool fourth;  // pass 1b runs (ucb > 0 with inverse-variance weights)
  int64_t workspace_size() const { return (fourth ? 6 : 4) * ws_stride + (fourth ? 4 * GC : 0); }
};

// fourth: whether pass 1b runs (ucb > 0 and fixed_k < 0).
inline NodePlan plan_node(int64_t B, int64_t C, int G, int64_t sms, bool fourth) {
  NodePlan p;
  p.moments = make_tiling(B, C, /*blocks_per_sm=*/4, sms);
  p.apply = make_tiling(B, C, /*blocks_per_sm=*/8, sms);
  p.GC = G * C;
  p.ws_stride = p.moments.row_chunks * p.GC;
  p.fourth = fourth;
  return p;
}

// Whether a node with these options runs pass 1b.
inline bool needs_fourth(const NodeArgs& a) { return a.ucb > 0.0 && a.fixed_k < 0.0; }

// The whole node: moments, (pass 1b,) weights, combined gradient.
// ws: plan.workspace_size() doubles; plan from plan_node(..., needs_fourth(a)).
template <typename Launch, typename Source>
void launch_node(const Launch& launch, const Source& src, int64_t B, int64_t C,
                 const NodePlan& plan, double* ws, const NodeArgs& a) {
  const int64_t GC = plan.GC, stride = plan.ws_stride;
  const Tiling& t = plan.moments;
  Partials p{ws, ws + stride, ws + 2 * stride, ws + 3 * stride, nullptr, nullptr, nullptr};
  const Grid coords{(GC + kThreads - 1) / kThreads, 1};
  launch(moments_kernel<Source>, Grid{t.col_tiles, t.row_chunks}, src, B, C, t, p, a.invalid);
  if (plan.fourth) {
    p.z2_lr = ws + 4 * stride;
    p.z2_rp = ws + 5 * stride;
    p.centre = ws + 6 * stride;
    launch(centre_kernel, coords, GC, B, t, p);
    launch(fourth_kernel<Source>, Grid{t.col_tiles, t.row_chunks}, src, B, C, t, p);
  }
  launch(finalize_kernel, coords, GC, B, t, p, a);
  const Tiling& ta = plan.apply;
  launch(apply_kernel<Source>, Grid{ta.col_tiles, ta.row_chunks}, src, B, C, ta, a.k);
}

}  // namespace
}  // namespace tpx
