// Exact selection of the k smallest |v| in O(numel): a three-level radix select on the bit pattern
// of |v| (for non-negative floats the unsigned bit pattern orders like the value), on large inputs run
// only on the entries of a sampled bracket around the k-th, followed by one pass that applies the result. Ties at the threshold are taken in flat index order, so the
// selection is deterministic and identical on every thread count (and to the CUDA path).
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// For the small per-element lambdas the loops below call (written after the parameter list): an
// out-of-line call per element would cost several times the memory traffic these passes are bound by.
#if defined(__GNUC__) || defined(__clang__)
#define ADMM_SPARSE_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
#else
#define ADMM_SPARSE_ALWAYS_INLINE_LAMBDA
#endif

namespace admm_sparse::cpu {

inline uint32_t bits_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}

inline float float_of(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline uint32_t abs_key(float v) { return bits_of(v) & 0x7fffffffu; }

// Fixed-size chunks make the tie quotas independent of how threads split the work.
constexpr int64_t kChunk = int64_t(1) << 16;

struct Selection {
  uint32_t threshold = 0;          // key of the k-th smallest entry
  std::vector<int64_t> tie_quota;  // per chunk: how many entries equal to threshold are selected
  std::vector<int64_t> ties;       // per chunk: how many entries equal to threshold there are
  bool none = false;               // k == 0
  bool all = false;                // k == n

  // In most chunks the ties at the threshold are all selected or none is: then "selected" is simply
  // key < limit, with no per-element bookkeeping (a loop the compiler can vectorise). Returns false
  // for a chunk that takes only some of its ties (walk it with apply_chunk).
  // Keys are |v|'s bits, at most 0x7fffffff, so every limit fits in 32 bits.
  bool uniform_limit(int64_t c, uint32_t& limit) const {
    if (none || all) {
      limit = all ? 0x80000000u : 0u;
      return true;
    }
    if (tie_quota[c] != 0 && tie_quota[c] != ties[c]) return false;
    limit = threshold + (tie_quota[c] != 0 ? 1u : 0u);
    return true;
  }

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

// The radix select proper, over a set of entries grouped in chunks: chunk c holds chunk_len(c) entries
// whose keys are key_in(c, j), j in [0, chunk_len(c)), in flat index order. Finds the k-th smallest key
// (1 <= k <= the number of entries) and, per chunk, how many entries equal it (ties) and how many of those
// are taken (the lowest indices first).
template <class ChunkLen, class KeyIn>
Selection radix_select(int64_t num_chunks, int64_t k, ChunkLen chunk_len, KeyIn key_in) {
  Selection sel;
  // Levels: key bits 31..20, 19..8, 7..0. Only entries whose higher bits equal the prefix chosen
  // so far are counted; `remaining` is the rank of the wanted entry among them (1-based).
  constexpr int kShift[3] = {20, 8, 0};
  constexpr int kBits[3] = {12, 12, 8};
  uint64_t prefix = 0;
  int64_t remaining = k;
  for (int level = 0; level < 3; ++level) {
    const int shift = kShift[level];
    const int64_t bins = int64_t(1) << kBits[level];
    const int high_shift = shift + kBits[level];
    const bool last = level == 2;
    // Earlier levels: per-thread histograms (summing is order independent); the last level per chunk,
    // which gives the tie quotas.
    const int64_t rows = last ? num_chunks : at::get_num_threads();
    std::vector<int64_t> hist(rows * bins, 0);
    at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t row = last ? c : at::get_thread_num();
        TORCH_INTERNAL_ASSERT(row < rows);
        int64_t* h = hist.data() + row * bins;
        const int64_t len = chunk_len(c);
        for (int64_t j = 0; j < len; ++j) {
          const uint64_t key = key_in(c, j);
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
      sel.ties.resize(num_chunks);
      for (int64_t c = 0; c < num_chunks; ++c) {
        sel.ties[c] = hist[c * bins + bin];
        const int64_t take = std::min(remaining, sel.ties[c]);
        sel.tie_quota[c] = take;
        remaining -= take;
      }
    }
  }
  sel.threshold = static_cast<uint32_t>(prefix);
  return sel;
}

// Below this many entries the radix select's three sweeps cost less than sampling a bracket.
constexpr int64_t kBracketMinEntries = int64_t(1) << 18;
constexpr int64_t kBracketSamples = int64_t(1) << 15;

// The k-th smallest key lies, with near certainty, between two keys of a sample whose ranks bracket
// k·s/n by several standard deviations. One sweep then counts the keys below the bracket and compacts
// those inside it into `scratch` (chunk c's into scratch[c·kChunk, ...), in index order: a chunk never
// holds more than its own length), and the radix select runs on that ~2% of the entries only: one sweep
// over all the data instead of three. Returns false if the k-th key fell outside the bracket (the caller
// then selects from all entries); the result is the same Selection either way.
template <class KeyAt>
bool bracket_select(int64_t n, int64_t k, KeyAt key_at, uint32_t* scratch, Selection& sel) {
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  // A deterministic, evenly spread sample (golden-ratio sequence): no two runs or thread counts differ.
  const int64_t s = kBracketSamples;
  for (int64_t j = 0; j < s; ++j) {
    const double frac = std::fmod(0.5 + static_cast<double>(j) * 0.6180339887498949, 1.0);
    scratch[j] = key_at(std::min(n - 1, static_cast<int64_t>(frac * static_cast<double>(n))));
  }
  const double p = static_cast<double>(k) / static_cast<double>(n);
  const double center = p * static_cast<double>(s);
  const double margin = 6.0 * std::sqrt(static_cast<double>(s) * p * (1.0 - p)) + 16.0;
  const auto sample_at = [&](double rank, uint32_t outside) {
    const int64_t r = static_cast<int64_t>(rank);
    if (r < 0 || r >= s) return outside;
    std::nth_element(scratch, scratch + r, scratch + s);
    return scratch[r];
  };
  const uint32_t lo = sample_at(std::floor(center - margin), 0u);
  const uint32_t hi = sample_at(std::ceil(center + margin), 0xffffffffu);

  std::vector<int64_t> below(num_chunks), inside(num_chunks);
  const uint32_t width = hi - lo;
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
      uint32_t* out = scratch + begin;
      int64_t count_below = 0, count_inside = 0;
      for (int64_t i = begin; i < end; ++i) {  // branch-free: the write lands past the kept ones
        const uint32_t key = key_at(i);
        count_below += key < lo;
        out[count_inside] = key;
        count_inside += static_cast<uint32_t>(key - lo) <= width;
      }
      below[c] = count_below;
      inside[c] = count_inside;
    }
  });
  int64_t total_below = 0, total_inside = 0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    total_below += below[c];
    total_inside += inside[c];
  }
  const int64_t rank = k - total_below;  // of the wanted key among the bracket's entries
  if (rank < 1 || rank > total_inside) return false;
  // Every entry equal to the threshold is inside the bracket, so the per-chunk tie counts are complete.
  sel = radix_select(
      num_chunks, rank, [&](int64_t c) { return inside[c]; },
      [&](int64_t c, int64_t j) { return scratch[c * kChunk + j]; });
  return true;
}

// key_at(i) must return abs_key of element i for i in [0, n). `scratch`: n entries the select may
// overwrite.
template <class KeyAt>
Selection find_k_smallest(int64_t n, int64_t k, KeyAt key_at, uint32_t* scratch) {
  TORCH_CHECK(k >= 0 && k <= n, "k must be in [0, ", n, "], got ", k);
  Selection sel;
  sel.none = k == 0;
  sel.all = k == n;
  if (sel.none || sel.all) return sel;
  if (n >= kBracketMinEntries && bracket_select(n, k, key_at, scratch, sel)) return sel;
  return radix_select(
      (n + kChunk - 1) / kChunk, k, [&](int64_t c) { return std::min(kChunk, n - c * kChunk); },
      [&](int64_t c, int64_t j) { return key_at(c * kChunk + j); });
}

// Calls apply(i, selected) for every i in [0, n), in parallel over the chunks. Chunks that take all or
// none of their threshold ties (nearly all of them) run a plain loop over key_at(i) < limit, which the
// compiler can vectorise when apply is branch-free.
template <class KeyAt, class Apply>
void apply_selection(const Selection& sel, int64_t n, KeyAt key_at, Apply apply) {
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    // Local copies: values they capture (say a float scalar) then provably cannot change when the loop
    // stores floats, so they stay in registers and the loop can be vectorised.
    const KeyAt key = key_at;
    const Apply write = apply;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk, end = std::min(n, (c + 1) * kChunk);
      uint32_t limit;
      if (sel.uniform_limit(c, limit)) {
        for (int64_t i = begin; i < end; ++i) write(i, key(i) < limit);
      } else {
        sel.apply_chunk(c, begin, end, key_at, apply);
      }
    }
  });
}

}  // namespace admm_sparse::cpu

namespace admm_sparse::cpu {

// Structured selections over "lines": line l holds the elements at offset l * line_stride + p * elem_stride,
// p in [0, len). A weight W [d_out, d_in] has its output rows as lines (line_stride d_in, elem_stride 1);
// the ADMM iterate Wn = (W d)^T [d_in, d_out] has them as columns (line_stride 1, elem_stride d_out).
// Ordering is by (abs_key, position along the line): all composites differ, so "the k smallest" is exact
// and ties go to the lower position, as the whole-matrix select gives them to the lower flat index.
struct Lines {
  int64_t count, len, line_stride, elem_stride;
  int64_t offset(int64_t line, int64_t p) const { return line * line_stride + p * elem_stride; }
};

inline uint64_t composite(uint32_t key, int64_t p) { return (uint64_t(key) << 32) | uint64_t(p); }

// Per line, the k smallest: calls apply(offset, selected) for every element of every line.
// Lines are processed in blocks of up to 16 so that, for lines that are columns (line_stride 1), the
// gather walks memory row by row instead of striding down one column at a time.
template <class KeyAt, class Apply>
void select_per_line(const Lines& ln, int64_t k, KeyAt key_at, Apply apply) {
  TORCH_CHECK(k >= 0 && k <= ln.len, "per-line k must be in [0, ", ln.len, "], got ", k);
  if (ln.count == 0 || ln.len == 0) return;
  constexpr int64_t kBlock = 16;
  const int64_t block = ln.line_stride == 1 ? kBlock : 1;
  const int64_t num_blocks = (ln.count + block - 1) / block;
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> buf(block * ln.len), scratch(ln.len);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t l0 = b * block;
      const int64_t nl = std::min(block, ln.count - l0);
      for (int64_t p = 0; p < ln.len; ++p)
        for (int64_t j = 0; j < nl; ++j) buf[j * ln.len + p] = composite(key_at(ln.offset(l0 + j, p)), p);
      for (int64_t j = 0; j < nl; ++j) {
        uint64_t threshold = ~uint64_t(0);  // k == len: everything below it
        if (k < ln.len) {
          std::copy(buf.begin() + j * ln.len, buf.begin() + (j + 1) * ln.len, scratch.begin());
          std::nth_element(scratch.begin(), scratch.begin() + k, scratch.end());
          threshold = scratch[k];
        }
        const uint64_t* c = buf.data() + j * ln.len;
        for (int64_t p = 0; p < ln.len; ++p) apply(ln.offset(l0 + j, p), k == ln.len || c[p] < threshold);
      }
    }
  });
}

// In every group of m consecutive elements of a line (len % m == 0), the m - n smallest: at most n
// survive per group. rank(t) = #{s in group : composite(s) < composite(t)}; selected iff rank < m - n.
constexpr int64_t kMaxGroup = 64;

template <class KeyAt, class Apply>
void select_n_of_m(const Lines& ln, int64_t n, int64_t m, KeyAt key_at, Apply apply) {
  TORCH_CHECK(m >= 1 && m <= kMaxGroup && n >= 0 && n <= m && ln.len % m == 0, "bad N:M selection ", n, ":", m,
              " for lines of length ", ln.len);
  const int64_t groups = ln.len / m;
  const int64_t prune = m - n;
  // Outer loop over groups, inner over lines: for column lines the inner loop is contiguous in memory.
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    uint64_t c[kMaxGroup];
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t l = 0; l < ln.count; ++l) {
        for (int64_t t = 0; t < m; ++t) c[t] = composite(key_at(ln.offset(l, g * m + t)), t);
        for (int64_t t = 0; t < m; ++t) {
          int64_t rank = 0;
          for (int64_t s = 0; s < m; ++s) rank += c[s] < c[t];
          apply(ln.offset(l, g * m + t), rank < prune);
        }
      }
  });
}

}  // namespace admm_sparse::cpu
