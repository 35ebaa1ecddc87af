// The CUDA kernels of gaussian_tpx_comoments and their plan, as device code
// only (no ATen, no CUDA runtime), like tpx_cuda_kernels.cuh, whose launch
// conventions (kThreads threads per block, a launch helper, Grid) and
// TPX_DEVICE they use: the CUDA runner (tpx_cuda.cu) launches them on its
// stream, the emulation tests (tests/test_cuda_emulated*.cpp) on CPU threads.
// Include it after tpx_cuda_kernels.cuh. The math is tpx_math.h's
// (comoment_add, comoment_merge, comoment_covariance, variance_bound),
// shared with the CPU kernel (cpu/tpx_cpu_comoments.inc).
//
// The K x K co-moment matrix of z = [g_LR, g_RP] (K = 2 G D columns) is cut
// into tiles of kCoTile x kCoTile entries; only the tile pairs (ta <= tb) of
// the upper triangle are computed. Kernels, in launch order:
//   comoments_kernel  one block per (tile pair, row chunk). The block walks
//                     its chunk in panels of kCoPanel rows: it forms the
//                     panel's values of its 2 x kCoTile columns in shared
//                     memory, shifted by the block's running column means,
//                     then every thread adds the panel to its kCoEntries
//                     co-moments (shifted sums folded in by Chan's formula,
//                     comoment_add) and the means move on. One partial
//                     per (chunk, entry), and the chunk's column means (from
//                     the diagonal tiles, which cover every column once).
//   comoment_columns_kernel  one thread per column: the chunk partials of
//                     its diagonal entry merged in chunk order (comoment_merge):
//                     mean, variance, non-finite flag, and the bound where ucb = 0;
//   comoment_cov_kernel  one thread per entry of the upper triangle: the
//                     partials merged in chunk order, written to (a, b) and (b, a);
//   comoment_fourth_kernel,  (ucb > 0 only) pass 1b: per (column tile, chunk)
//   comoment_bound_kernel    the sums of z^2 (standardized_fourth_add), then one
//                     thread per column adds them in chunk order: the bound.
// Partials are merged in chunk order, so results do not depend on timing.
// Workspace: O(chunks x tile pairs x kCoTile^2) doubles, never O(B K^2).
#pragma once

#include <algorithm>
#include <cstdint>

#include "tpx_math.h"

namespace tpx {
namespace {

constexpr int kCoTile = 32;   // columns per tile
constexpr int kCoPanel = 32;  // rows per panel
constexpr int kCoLanes = kThreads / kCoTile;                // 8: threads per tile column
constexpr int kCoEntries = kCoTile * kCoTile / kThreads;    // 4: entries per thread
static_assert(kCoEntries * kThreads == kCoTile * kCoTile, "entries split evenly");
static_assert(2 * kCoTile <= kThreads, "one thread per panel column");

struct ComomentPlan {
  int64_t K;               // columns of z
  int64_t tiles;           // column tiles, ceil(K / kCoTile)
  int64_t pairs;           // tile pairs (ta <= tb): grid.x of comoments_kernel
  int64_t chunks;          // row chunks: grid.y
  int64_t rows_per_chunk;  // chunk c holds rows [c rows_per_chunk, min(B, (c + 1) rows_per_chunk))
  bool fourth;             // pass 1b runs (ucb > 0)

  TPX_HD int64_t tile_entries() const { return int64_t{kCoTile} * kCoTile; }
  TPX_HD int64_t m_size() const { return chunks * pairs * tile_entries(); }
  // Workspace: co-moment partials, chunk means [chunks][K], the columns'
  // results [4][K] (mean, 1 / variance, variance, bad), pass 1b's partials.
  int64_t workspace_size() const { return m_size() + chunks * K + 4 * K + (fourth ? chunks * K : 0); }
};

// sms: the device's multiprocessor count; about 4 blocks per SM are wanted,
// and at least a panel of rows per chunk.
inline ComomentPlan plan_comoments(int64_t B, int64_t K, int64_t sms, bool fourth) {
  ComomentPlan p;
  p.K = K;
  p.tiles = (K + kCoTile - 1) / kCoTile;
  p.pairs = p.tiles * (p.tiles + 1) / 2;
  const int64_t want = std::max<int64_t>(1, 4 * sms / p.pairs);
  const int64_t most = (B + kCoPanel - 1) / kCoPanel;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({want, most, 65535}));
  p.rows_per_chunk = (B + chunks - 1) / chunks;
  p.chunks = (B + p.rows_per_chunk - 1) / p.rows_per_chunk;  // no empty chunk
  p.fourth = fourth;
  return p;
}

// The tile pair of index `pair`: row ta of the upper triangle of tiles holds
// pairs (ta, ta .. tiles - 1).
TPX_HD void tile_pair(int64_t pair, int64_t tiles, int64_t& ta, int64_t& tb) {
  ta = 0;
  while (pair >= tiles - ta) pair -= tiles - ta, ++ta;
  tb = ta + pair;
}

TPX_HD int64_t pair_index(int64_t ta, int64_t tb, int64_t tiles) {
  return ta * tiles - ta * (ta - 1) / 2 + (tb - ta);
}

// Where entry (a, b), a <= b, lives in chunk c's partials.
TPX_HD int64_t entry_offset(const ComomentPlan& p, int64_t c, int64_t a, int64_t b) {
  const int64_t pair = pair_index(a / kCoTile, b / kCoTile, p.tiles);
  return (c * p.pairs + pair) * p.tile_entries() + (a % kCoTile) * kCoTile + b % kCoTile;
}

TPX_HD double chunk_rows(const ComomentPlan& p, int64_t B, int64_t c) {
  const int64_t end = (c + 1) * p.rows_per_chunk;
  return static_cast<double>((end < B ? end : B) - c * p.rows_per_chunk);
}

struct ComomentWork {
  double* m;     // [chunks][pairs][kCoTile^2] co-moment partials
  double* mean;  // [chunks][K] chunk column means
  double* col;   // [4][K] merged: mean, 1 / variance (pass 1b), variance, bad (1 or 0)
  double* z2;    // [chunks][K] pass 1b's sums of z^2; null without it
};

struct ComomentArgs {
  double* cov;    // [K, K]
  double* bound;  // [K]
  bool* finite;   // [K]
  double ucb;
};

// The column of slot s of a block's panel: s < kCoTile is column s of tile
// ta, the others of tile tb; -1 past the last column.
TPX_DEVICE int64_t panel_column(int s, int64_t ta, int64_t tb, int64_t K) {
  const int64_t c = s < kCoTile ? ta * kCoTile + s : tb * kCoTile + (s - kCoTile);
  return c < K ? c : -1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    comoments_kernel(ComomentSource<T> src, int64_t B, ComomentPlan p, ComomentWork w) {
  __shared__ double sh_y[kCoPanel][2 * kCoTile];  // the panel, shifted
  __shared__ double sh_mean[2 * kCoTile];         // the block's running column means (shifts)
  __shared__ double sh_s1[2 * kCoTile];           // the panel's column sums

  const int tid = static_cast<int>(threadIdx.x);
  int64_t ta, tb;
  tile_pair(static_cast<int64_t>(blockIdx.x), p.tiles, ta, tb);
  const int64_t K = p.K;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * p.rows_per_chunk;
  const int64_t r1 = min(B, r0 + p.rows_per_chunk);

  // Entries (la0 + k kCoLanes, lb), k < kCoEntries: a warp shares la (a
  // broadcast read) and reads consecutive lb.
  const int lb = tid % kCoTile, la0 = tid / kCoTile;
  double m[kCoEntries];
#pragma unroll
  for (int k = 0; k < kCoEntries; ++k) m[k] = 0.0;

  // The stream starts with n = 0 and its first sample as the shift, so a
  // constant column sums exact zeros.
  if (tid < 2 * kCoTile) {
    const int64_t c = panel_column(tid, ta, tb, K);
    sh_mean[tid] = c >= 0 ? src.value(r0, c) : 0.0;
  }
  __syncthreads();

  double n = 0.0;
  for (int64_t r = r0; r < r1; r += kCoPanel) {
    const int nb = static_cast<int>(min(int64_t{kCoPanel}, r1 - r));
    for (int idx = tid; idx < kCoPanel * 2 * kCoTile; idx += kThreads) {
      const int row = idx / (2 * kCoTile), s = idx % (2 * kCoTile);
      const int64_t c = panel_column(s, ta, tb, K);
      sh_y[row][s] = row < nb && c >= 0 ? src.value(r + row, c) - sh_mean[s] : 0.0;
    }
    __syncthreads();
    if (tid < 2 * kCoTile) {
      double s1 = 0.0;
      for (int row = 0; row < nb; ++row) s1 += sh_y[row][tid];
      sh_s1[tid] = s1;
    }
    __syncthreads();
    const double dnb = static_cast<double>(nb);
    const double s1b = sh_s1[kCoTile + lb];
#pragma unroll
    for (int k = 0; k < kCoEntries; ++k) {
      const int la = la0 + k * kCoLanes;
      double s2 = 0.0;
      for (int row = 0; row < nb; ++row) s2 += sh_y[row][la] * sh_y[row][kCoTile + lb];
      comoment_add(n, dnb, sh_s1[la], s1b, s2, m[k]);
    }
    if (tid < 2 * kCoTile) sh_mean[tid] += sh_s1[tid] / (n + dnb);
    n += dnb;
    __syncthreads();
  }

  const int64_t base = (static_cast<int64_t>(blockIdx.y) * p.pairs + blockIdx.x) * p.tile_entries();
#pragma unroll
  for (int k = 0; k < kCoEntries; ++k) w.m[base + (la0 + k * kCoLanes) * kCoTile + lb] = m[k];
  if (ta == tb && tid < kCoTile) {
    const int64_t c = panel_column(tid, ta, tb, K);
    if (c >= 0) w.mean[static_cast<int64_t>(blockIdx.y) * K + c] = sh_mean[tid];
  }
}

// Entry (a, b), a <= b, merged over the chunks in order; mx, my: the merged means.
TPX_HD double merge_entry(const ComomentPlan& p, const ComomentWork& w, int64_t B, int64_t a,
                          int64_t b, double& n, double& mx, double& my) {
  const int64_t K = p.K;
  n = chunk_rows(p, B, 0);
  mx = w.mean[a];
  my = w.mean[b];
  double m = w.m[entry_offset(p, 0, a, b)];
  for (int64_t c = 1; c < p.chunks; ++c) {
    const double nc = chunk_rows(p, B, c);
    comoment_merge(n, mx, my, m, nc, w.mean[c * K + a], w.mean[c * K + b], w.m[entry_offset(p, c, a, b)]);
    n += nc;
  }
  return m;
}

__global__ void comoment_columns_kernel(int64_t B, ComomentPlan p, ComomentWork w, ComomentArgs out) {
  const int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t K = p.K;
  if (a >= K) return;
  double n, mean, mean_y;
  const double m = merge_entry(p, w, B, a, a, n, mean, mean_y);
  const bool bad = moments_bad(mean, m);
  const double var = batch_variance(m, n, bad);
  w.col[a] = mean;
  w.col[K + a] = inverse_variance_or_zero(var);
  w.col[2 * K + a] = var;
  w.col[3 * K + a] = bad ? 1.0 : 0.0;
  out.finite[a] = !bad;
  out.bound[a] = comoment_bound(var, bad, 0.0, n, 0.0);  // pass 1b refines it where ucb > 0
}

__global__ void comoment_cov_kernel(int64_t B, ComomentPlan p, ComomentWork w, ComomentArgs out) {
  const int64_t K = p.K;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= K * K) return;
  const int64_t a = e / K, b = e % K;
  if (a > b) return;  // the lower triangle is the mirror
  double n, mx, my;
  const double m = merge_entry(p, w, B, a, b, n, mx, my);
  const double v = comoment_covariance(m, n, w.col[3 * K + a] != 0.0, w.col[3 * K + b] != 0.0, a == b);
  out.cov[a * K + b] = v;
  out.cov[b * K + a] = v;
}

// Pass 1b: threads (lane, column) of a column tile; lane l takes rows
// r0 + l, r0 + l + kCoLanes, ...; a tree over the lanes; one partial per
// (chunk, column).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    comoment_fourth_kernel(ComomentSource<T> src, int64_t B, ComomentPlan p, ComomentWork w) {
  __shared__ double sh_sum[kThreads];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid / kCoTile;
  const int64_t K = p.K;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCoTile + tid % kCoTile;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * p.rows_per_chunk;
  const int64_t r1 = min(B, r0 + p.rows_per_chunk);
  double sum = 0.0;
  if (c < K && w.col[3 * K + c] == 0.0) {
    const double mean = w.col[c], iv = w.col[K + c];
    for (int64_t i = r0 + lane; i < r1; i += kCoLanes) standardized_fourth_add(src.value(i, c), mean, iv, sum);
  }
  sh_sum[tid] = sum;
  __syncthreads();
  for (int stride = kCoLanes / 2; stride > 0; stride /= 2) {
    if (lane < stride) sh_sum[tid] += sh_sum[tid + stride * kCoTile];
    __syncthreads();
  }
  if (lane == 0 && c < K) w.z2[static_cast<int64_t>(blockIdx.y) * K + c] = sh_sum[tid];
}

__global__ void comoment_bound_kernel(int64_t B, ComomentPlan p, ComomentWork w, ComomentArgs out) {
  const int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t K = p.K;
  if (a >= K) return;
  double sum = 0.0;
  for (int64_t c = 0; c < p.chunks; ++c) sum += w.z2[c * K + a];
  out.bound[a] = comoment_bound(w.col[2 * K + a], w.col[3 * K + a] != 0.0, sum,
                                static_cast<double>(B), out.ucb);
}

// The whole op: ws holds plan.workspace_size() doubles, plan from
// plan_comoments(B, K, sms, ucb > 0). Launches run in order (one stream).
template <typename Launch, typename T>
void launch_comoments(const Launch& launch, const ComomentSource<T>& src, int64_t B,
                      const ComomentPlan& p, double* ws, const ComomentArgs& out) {
  const int64_t K = p.K;
  ComomentWork w{ws, ws + p.m_size(), ws + p.m_size() + p.chunks * K, nullptr};
  const Grid columns{(K + kThreads - 1) / kThreads, 1};
  launch(comoments_kernel<T>, Grid{p.pairs, p.chunks}, src, B, p, w);
  launch(comoment_columns_kernel, columns, B, p, w, out);
  launch(comoment_cov_kernel, Grid{(K * K + kThreads - 1) / kThreads, 1}, B, p, w, out);
  if (p.fourth) {
    w.z2 = w.col + 4 * K;
    launch(comoment_fourth_kernel<T>, Grid{(K + kCoTile - 1) / kCoTile, p.chunks}, src, B, p, w);
    launch(comoment_bound_kernel, columns, B, p, w, out);
  }
}

}  // namespace
}  // namespace tpx
