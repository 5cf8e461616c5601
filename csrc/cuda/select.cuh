// Exact selection of the k smallest |v| on the GPU in O(numel), the same selection as cpu/select.h:
// a three-level radix select on key = bits(|v|) (levels: key bits 31..20, 19..8, 7..0; for
// non-negative floats the unsigned bit pattern orders like the value, NaN above inf), then one pass
// that applies it. Ties at the threshold key are taken lowest flat index first, so exactly k entries
// are selected and the result is deterministic and identical to the CPU path.
//
// Every kernel splits [0, n) into the same contiguous per-block chunks, so block order is index order:
// the last histogram level also keeps each block's own counts, and an exclusive scan of those over
// blocks gives every block the number of threshold ties before it. The bin chosen at each level, the
// rank still wanted and the tie offsets stay in device memory, read by the next kernel: no host
// round trip between the levels.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace admm_sparse {
namespace gpu {

constexpr int kThreads = 256;       // streaming kernels (histograms, apply)
constexpr int kScanThreads = 1024;  // the single-block scan kernels
static_assert(kThreads % 32 == 0 && kScanThreads % 32 == 0, "whole warps");

__device__ __forceinline__ uint32_t abs_key(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// Level l counts key bits [kShift, kShift + kBits) of the entries whose bits above them equal the
// prefix picked so far. Level 0 has 11 effective bits: bit 31 of a key is always 0.
template <int kLevel>
struct Level;
// kHist: where its histogram starts in the workspace.
template <>
struct Level<0> {
  static constexpr int kShift = 20, kBins = 2048, kHigh = 31, kHist = 0;
};
template <>
struct Level<1> {
  static constexpr int kShift = 8, kBins = 4096, kHigh = 20, kHist = 2048;
};
template <>
struct Level<2> {
  static constexpr int kShift = 0, kBins = 256, kHigh = 8, kHist = 2048 + 4096;
};

// Layout of the int64 workspace (histograms zeroed once per selection; the rest written before read).
constexpr int64_t kStateOff = 2048 + 4096 + 256;  // per level: {rank still wanted, prefix}
constexpr int64_t kTieOff = kStateOff + 6;       // per block: threshold ties in the blocks before it
constexpr int64_t kZeroed = kStateOff;           // only the histograms need zeroing

enum class Mode : int { kNone = 0, kAll = 1, kThreshold = 2 };

// What the apply kernel needs; plain pointers into the workspace (see SelectBuffers).
struct DeviceSelection {
  const int64_t* state;        // level 2's {ties wanted, threshold key}
  const int64_t* tie_before;   // per block
  const uint32_t* block_hist;  // per block, level 2's 256 counts
  int64_t chunk;               // elements per block
  Mode mode;
};

// Host side: the launch shape and the workspace, which must stay alive until the apply kernel is
// enqueued (the caching allocator orders reuse on the stream, so dropping it after that is safe).
struct SelectBuffers {
  at::Tensor ws;
  at::Tensor block_hist;
  int grid = 0;
  DeviceSelection dev{};
};

// Sum over the block of one value per thread; returns the exclusive prefix for this thread and the
// block total in *total. Ends with a barrier, so it may be called again right away.
template <int kBlock>
__device__ __forceinline__ long long block_exclusive_sum(long long x, long long* total) {
  constexpr int kWarps = kBlock / 32;
  __shared__ long long warp_sums[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  long long incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const long long y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    long long s = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const long long y = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += y;
    }
    if (lane < kWarps) warp_sums[lane] = s;  // now inclusive over warps
  }
  __syncthreads();
  const long long before = (warp == 0 ? 0 : warp_sums[warp - 1]) + incl - x;
  *total = warp_sums[kWarps - 1];
  __syncthreads();
  return before;
}

// One histogram level over this block's chunk. Load: functor float(int64_t i).
template <int kLevel, class Load>
__global__ void __launch_bounds__(kThreads)
    radix_hist_kernel(Load load, int64_t n, int64_t chunk, int64_t* ws, uint32_t* block_hist) {
  using L = Level<kLevel>;
  __shared__ uint32_t sh[L::kBins];
  for (int b = threadIdx.x; b < L::kBins; b += kThreads) sh[b] = 0;
  // Level 0 has no prefix yet; later levels read the one the previous pick kernel wrote.
  uint32_t want = 0;
  if constexpr (kLevel > 0) want = static_cast<uint32_t>(ws[kStateOff + 2 * (kLevel - 1) + 1]) >> L::kHigh;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const uint32_t key = abs_key(load(i));
    if ((key >> L::kHigh) == want) atomicAdd(&sh[(key >> L::kShift) & (L::kBins - 1)], 1u);
  }
  __syncthreads();
  auto* hist = reinterpret_cast<unsigned long long*>(ws + L::kHist);
  for (int b = threadIdx.x; b < L::kBins; b += kThreads) {
    const uint32_t c = sh[b];
    if (c != 0) atomicAdd(&hist[b], static_cast<unsigned long long>(c));
    if constexpr (kLevel == 2) block_hist[static_cast<int64_t>(blockIdx.x) * L::kBins + b] = c;
  }
}

// Single block: finds the bin holding the wanted rank and narrows the prefix. Reads the previous
// level's state and writes this level's own slot, so nothing read here is overwritten here.
template <int kLevel>
__global__ void __launch_bounds__(kScanThreads) radix_pick_kernel(int64_t* ws, int64_t k) {
  using L = Level<kLevel>;
  constexpr int kPer = (L::kBins + kScanThreads - 1) / kScanThreads;
  long long wanted = k;
  uint32_t prefix = 0;
  if constexpr (kLevel > 0) {
    const int64_t* prev = ws + kStateOff + 2 * (kLevel - 1);
    wanted = prev[0];
    prefix = static_cast<uint32_t>(prev[1]);
  }
  const int64_t* hist = ws + L::kHist;
  const int first = threadIdx.x * kPer;
  long long c[kPer];
  long long sum = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    c[j] = first + j < L::kBins ? hist[first + j] : 0;
    sum += c[j];
  }
  long long total;
  long long before = block_exclusive_sum<kScanThreads>(sum, &total);
  // Exactly one bin satisfies this when 1 <= wanted <= total (empty bins never do).
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    if (before < wanted && wanted <= before + c[j]) {
      int64_t* out = ws + kStateOff + 2 * kLevel;
      out[0] = wanted - before;
      out[1] = static_cast<int64_t>(prefix | (static_cast<uint32_t>(first + j) << L::kShift));
    }
    before += c[j];
  }
}

// Single block: exclusive scan over blocks of each block's count of the threshold key.
// (static: a header-defined non-template kernel must not clash between translation units)
static __global__ void __launch_bounds__(kScanThreads)
    tie_scan_kernel(int64_t* ws, const uint32_t* block_hist, int grid) {
  const uint32_t low = static_cast<uint32_t>(ws[kStateOff + 2 * 2 + 1]) & 0xffu;
  const int per = (grid + kScanThreads - 1) / kScanThreads;
  const int first = threadIdx.x * per;
  const int last = first + per < grid ? first + per : grid;
  long long sum = 0;
  for (int g = first; g < last; ++g) sum += block_hist[static_cast<int64_t>(g) * 256 + low];
  long long total;
  long long before = block_exclusive_sum<kScanThreads>(sum, &total);
  int64_t* tie_before = ws + kTieOff;
  for (int g = first; g < last; ++g) {
    tie_before[g] = before;
    before += block_hist[static_cast<int64_t>(g) * 256 + low];
  }
}

// Device side of the final pass: calls apply(i, v, selected) once for every i of this block's chunk,
// v = load(i). Must be called by all threads of a kThreads block with the grid of SelectBuffers.
template <class Load, class Apply>
__device__ __forceinline__ void apply_selection(const Load& load, int64_t n, const DeviceSelection& sel,
                                                Apply&& apply) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * sel.chunk;
  const int64_t end = begin + sel.chunk < n ? begin + sel.chunk : n;
  if (sel.mode != Mode::kThreshold) {
    const bool all = sel.mode == Mode::kAll;
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) apply(i, load(i), all);
    return;
  }
  const int64_t wanted = sel.state[0];  // ties to select, lowest index first
  const uint32_t threshold = static_cast<uint32_t>(sel.state[1]);
  const int64_t before = sel.tie_before[blockIdx.x];
  const int64_t here = sel.block_hist[static_cast<int64_t>(blockIdx.x) * 256 + (threshold & 0xffu)];
  // Block-uniform: unless the cut falls inside this block, its ties are all in or all out.
  if (!(before < wanted && wanted < before + here)) {
    const bool ties_in = before + here <= wanted;
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      const float v = load(i);
      const uint32_t key = abs_key(v);
      apply(i, v, key < threshold || (key == threshold && ties_in));
    }
    return;
  }
  // The cut is in this block: rank its ties in index order, one tile of kThreads at a time.
  __shared__ int warp_ties[kThreads / 32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int64_t seen = before;  // ties at indices below the current tile
  for (int64_t base = begin; base < end; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const bool valid = i < end;
    const float v = valid ? load(i) : 0.0f;
    const uint32_t key = abs_key(v);
    const bool tie = valid && key == threshold;
    const unsigned ballot = __ballot_sync(0xffffffffu, tie);
    if (lane == 0) warp_ties[warp] = __popc(ballot);
    __syncthreads();
    int64_t rank = seen + __popc(ballot & ((1u << lane) - 1u));
    int tile_ties = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) {
      if (w < warp) rank += warp_ties[w];
      tile_ties += warp_ties[w];
    }
    __syncthreads();  // warp_ties is rewritten by the next tile
    if (valid) apply(i, v, key < threshold || (tie && rank < wanted));
    seen += tile_ties;
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs the histogram levels for the k smallest |load(i)|, i in [0, n), on `stream`, and returns what
// the apply pass needs. k == 0 and k == n launch nothing. n must be > 0.
template <class Load>
SelectBuffers select_k_smallest(const Load& load, int64_t n, int64_t k, const at::TensorOptions& options,
                                cudaStream_t stream) {
  TORCH_CHECK(n > 0 && k >= 0 && k <= n, "select_k_smallest: need 0 <= k <= n and n > 0, got k=", k, ", n=", n);
  SelectBuffers out;
  // A few resident blocks per SM: enough to saturate memory bandwidth, few enough that flushing the
  // block histograms and scanning the per-block tie counts stays cheap.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t max_grid = std::max<int64_t>(1, int64_t(sms) * 8);
  int64_t grid = std::min(max_grid, ceil_div(n, int64_t(kThreads) * 4));
  const int64_t chunk = ceil_div(ceil_div(n, grid), kThreads) * kThreads;
  grid = ceil_div(n, chunk);
  // Per-block shared counters are 32-bit.
  TORCH_CHECK(chunk < (int64_t(1) << 31), "select_k_smallest: tensor too large (", n, " elements)");
  out.grid = static_cast<int>(grid);
  out.dev.chunk = chunk;
  if (k == 0 || k == n) {
    out.dev.mode = k == 0 ? Mode::kNone : Mode::kAll;
    return out;
  }
  out.dev.mode = Mode::kThreshold;
  out.ws = at::empty({kTieOff + grid}, options.dtype(at::kLong));
  out.block_hist = at::empty({grid * 256}, options.dtype(at::kInt));
  int64_t* ws = out.ws.data_ptr<int64_t>();
  auto* block_hist = reinterpret_cast<uint32_t*>(out.block_hist.data_ptr<int32_t>());
  C10_CUDA_CHECK(cudaMemsetAsync(ws, 0, kZeroed * sizeof(int64_t), stream));

  const unsigned g = static_cast<unsigned>(grid);
  radix_hist_kernel<0><<<g, kThreads, 0, stream>>>(load, n, chunk, ws, block_hist);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  radix_pick_kernel<0><<<1, kScanThreads, 0, stream>>>(ws, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  radix_hist_kernel<1><<<g, kThreads, 0, stream>>>(load, n, chunk, ws, block_hist);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  radix_pick_kernel<1><<<1, kScanThreads, 0, stream>>>(ws, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  radix_hist_kernel<2><<<g, kThreads, 0, stream>>>(load, n, chunk, ws, block_hist);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  radix_pick_kernel<2><<<1, kScanThreads, 0, stream>>>(ws, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tie_scan_kernel<<<1, kScanThreads, 0, stream>>>(ws, block_hist, out.grid);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  out.dev.state = ws + kStateOff + 2 * 2;
  out.dev.tie_before = ws + kTieOff;
  out.dev.block_hist = block_hist;
  return out;
}


// ------------------------------------------------------------------ structured selections
// "Lines" as in cpu/select.h: line l holds the elements at l * line_stride + p * elem_stride, p < len
// (output rows of W: line_stride d_in, elem_stride 1; of the iterate Wn [d_in, d_out]: 1 and d_out).
// Order: (abs_key, position along the line), so ties go to the lower position, as on the CPU.
struct Lines {
  int64_t count, len, line_stride, elem_stride;
  __host__ __device__ __forceinline__ int64_t offset(int64_t l, int64_t p) const {
    return l * line_stride + p * elem_stride;
  }
};

constexpr int kMaxGroup = 64;

// The k smallest of one line, by the whole block (kThreads threads): a radix select on the key with
// the histograms in shared memory, then a pass in tiles of kThreads positions that ranks the ties at
// the threshold in position order. Calls apply(offset, v, selected) once per element of the line.
template <class Load, class Apply>
__device__ __forceinline__ void select_line_block(const Load& load, const Lines& ln, int64_t line, int64_t k,
                                                  Apply&& apply) {
  if (k <= 0 || k >= ln.len) {
    const bool all = k >= ln.len;
    for (int64_t p = threadIdx.x; p < ln.len; p += kThreads) {
      const int64_t off = ln.offset(line, p);
      apply(off, load(off), all);
    }
    return;
  }
  __shared__ uint32_t hist[4096];
  __shared__ long long state[2];  // {rank still wanted, prefix}
  long long wanted = k;
  uint32_t prefix = 0;
  constexpr int kShift[3] = {20, 8, 0};
  constexpr int kBins[3] = {2048, 4096, 256};
  constexpr int kHigh[3] = {31, 20, 8};
#pragma unroll
  for (int level = 0; level < 3; ++level) {
    const int shift = kShift[level], bins = kBins[level], high = kHigh[level];
    for (int b = threadIdx.x; b < bins; b += kThreads) hist[b] = 0;
    __syncthreads();
    const uint32_t want = high >= 32 ? 0u : (prefix >> high);
    for (int64_t p = threadIdx.x; p < ln.len; p += kThreads) {
      const uint32_t key = abs_key(load(ln.offset(line, p)));
      if ((key >> high) == want) atomicAdd(&hist[(key >> shift) & (bins - 1)], 1u);
    }
    __syncthreads();
    const int per = bins / kThreads;  // 8, 16 or 1 contiguous bins per thread
    const int first = threadIdx.x * per;
    long long c[16];
    long long sum = 0;
    for (int j = 0; j < 16; ++j) {
      c[j] = j < per ? hist[first + j] : 0;
      sum += c[j];
    }
    long long total;
    long long before = block_exclusive_sum<kThreads>(sum, &total);
    for (int j = 0; j < per; ++j) {
      if (before < wanted && wanted <= before + c[j]) {
        state[0] = wanted - before;
        state[1] = static_cast<long long>(prefix | (static_cast<uint32_t>(first + j) << shift));
      }
      before += c[j];
    }
    __syncthreads();
    wanted = state[0];
    prefix = static_cast<uint32_t>(state[1]);
    __syncthreads();  // everyone has read state (and hist) before the next level rewrites them
  }
  const uint32_t threshold = prefix;
  __shared__ int warp_ties[kThreads / 32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  long long seen = 0;  // ties at positions below the current tile
  for (int64_t base = 0; base < ln.len; base += kThreads) {
    const int64_t p = base + threadIdx.x;
    const bool valid = p < ln.len;
    const int64_t off = valid ? ln.offset(line, p) : 0;
    const float v = valid ? load(off) : 0.0f;
    const uint32_t key = abs_key(v);
    const bool tie = valid && key == threshold;
    const unsigned ballot = __ballot_sync(0xffffffffu, tie);
    if (lane == 0) warp_ties[warp] = __popc(ballot);
    __syncthreads();
    long long rank = seen + __popc(ballot & ((1u << lane) - 1u));
    int tile_ties = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) {
      if (w < warp) rank += warp_ties[w];
      tile_ties += warp_ties[w];
    }
    __syncthreads();
    if (valid) apply(off, v, key < threshold || (tie && rank < wanted));
    seen += tile_ties;
  }
}

// Group g of line l (m consecutive positions) by one thread: the m - n smallest are selected.
template <class Load, class Apply>
__device__ __forceinline__ void select_group(const Load& load, const Lines& ln, int64_t line, int64_t g, int n,
                                             int m, Apply&& apply) {
  unsigned long long c[kMaxGroup];
  float v[kMaxGroup];
  for (int t = 0; t < m; ++t) {
    v[t] = load(ln.offset(line, g * m + t));
    c[t] = (static_cast<unsigned long long>(abs_key(v[t])) << 32) | static_cast<unsigned>(t);
  }
  for (int t = 0; t < m; ++t) {
    int rank = 0;
    for (int s = 0; s < m; ++s) rank += c[s] < c[t];
    apply(ln.offset(line, g * m + t), v[t], rank < m - n);
  }
}

// Thread index -> (line, group), lines fastest when they are adjacent in memory (coalesced loads).
__device__ __forceinline__ bool group_of_thread(const Lines& ln, int m, int64_t* line, int64_t* g) {
  const int64_t groups = ln.len / m;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= ln.count * groups) return false;
  if (ln.line_stride == 1) {
    *line = idx % ln.count;
    *g = idx / ln.count;
  } else {
    *g = idx % groups;
    *line = idx / groups;
  }
  return true;
}

}  // namespace gpu
}  // namespace admm_sparse
