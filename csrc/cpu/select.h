// Exact selection of the k smallest |v| in O(numel): a three-level radix select on the bit pattern
// of |v| (for non-negative floats the unsigned bit pattern orders like the value), followed by one
// pass that applies the result. Ties at the threshold are taken in flat index order, so the
// selection is deterministic and identical on every thread count (and to the CUDA path).
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace admm_sparse::cpu {

inline uint32_t abs_key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits & 0x7fffffffu;
}

// Fixed-size chunks make the tie quotas independent of how threads split the work.
constexpr int64_t kChunk = int64_t(1) << 16;

struct Selection {
  uint32_t threshold = 0;          // key of the k-th smallest entry
  std::vector<int64_t> tie_quota;  // per chunk: how many entries equal to threshold are selected
  bool none = false;               // k == 0
  bool all = false;                // k == n

  // Walks chunk `c` in index order; call `apply(i, selected)` for each i in [begin, end).
  template <class KeyAt, class Apply>
  void apply_chunk(int64_t c, int64_t begin, int64_t end, KeyAt key_at, Apply apply) const {
    if (none || all) {
      for (int64_t i = begin; i < end; ++i) apply(i, all);
      return;
    }
    int64_t ties_left = tie_quota[c];
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t key = key_at(i);
      bool selected = key < threshold;
      if (key == threshold && ties_left > 0) {
        selected = true;
        --ties_left;
      }
      apply(i, selected);
    }
  }
};

// key_at(i) must return abs_key of element i for i in [0, n).
template <class KeyAt>
Selection find_k_smallest(int64_t n, int64_t k, KeyAt key_at) {
  TORCH_CHECK(k >= 0 && k <= n, "k must be in [0, ", n, "], got ", k);
  Selection sel;
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  sel.none = k == 0;
  sel.all = k == n;
  if (sel.none || sel.all) return sel;

  // Levels: key bits 31..20, 19..8, 7..0. Only entries whose higher bits equal the prefix chosen
  // so far are counted; `remaining` is the rank of the wanted entry among them (1-based).
  constexpr int kShift[3] = {20, 8, 0};
  constexpr int kBits[3] = {12, 12, 8};
  uint64_t prefix = 0;
  int64_t remaining = k;
  std::vector<int64_t> chunk_hist;  // last level only: per-chunk counts give the tie quotas
  for (int level = 0; level < 3; ++level) {
    const int shift = kShift[level];
    const int64_t bins = int64_t(1) << kBits[level];
    const int high_shift = shift + kBits[level];
    const bool last = level == 2;
    // Earlier levels: per-thread histograms (summing is order independent).
    const int64_t rows = last ? num_chunks : at::get_num_threads();
    std::vector<int64_t> hist(rows * bins, 0);
    at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t row = last ? c : at::get_thread_num();
        TORCH_INTERNAL_ASSERT(row < rows);
        int64_t* h = hist.data() + row * bins;
        const int64_t end = std::min(n, (c + 1) * kChunk);
        for (int64_t i = c * kChunk; i < end; ++i) {
          const uint64_t key = key_at(i);
          if ((key >> high_shift) == prefix) ++h[(key >> shift) & (bins - 1)];
        }
      }
    });
    std::vector<int64_t> total(bins, 0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < bins; ++b) total[b] += hist[r * bins + b];
    int64_t bin = 0;
    while (remaining > total[bin]) remaining -= total[bin++];
    prefix = (prefix << kBits[level]) | static_cast<uint64_t>(bin);
    if (last) {
      // `remaining` entries equal to the threshold are selected, the lowest indices first.
      sel.tie_quota.resize(num_chunks);
      for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t take = std::min(remaining, hist[c * bins + bin]);
        sel.tie_quota[c] = take;
        remaining -= take;
      }
    }
  }
  sel.threshold = static_cast<uint32_t>(prefix);
  return sel;
}

}  // namespace admm_sparse::cpu
