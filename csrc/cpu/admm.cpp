// CPU kernels: the fused ADMM projection pass and the k-smallest mask, both on the radix select of
// select.h, parallel over fixed chunks with at::parallel_for, and the normalisation passes before and after.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "../admm.h"
#include "select.h"

namespace admm_sparse {
namespace {

void project_cpu(const at::Tensor& wn, at::Tensor& u, const at::Tensor& b, at::Tensor& rhs, const MaskSpec& spec,
                 double rho, bool reselect) {
  const int64_t k = spec.k;
  const int64_t n = wn.numel();
  const float* w_p = wn.data_ptr<float>();
  float* u_p = u.data_ptr<float>();
  const float* b_p = b.data_ptr<float>();
  float* rhs_p = rhs.data_ptr<float>();
  const float rho_f = static_cast<float>(rho);

  // V is recomputed (Wn + U) in every pass instead of being stored: the passes are memory bound
  // either way, and this keeps the working set at four d_in x d_out buffers. Both lambdas are called
  // once per element from several loops and must be inlined into each: GCC once left `write` out of
  // line (a scalar call per element, 4-5x slower fixed-mask pass). Captured by value, so that a loop
  // holding a local copy keeps them in registers.
  const auto v_key = [w_p, u_p](int64_t i) ADMM_SPARSE_ALWAYS_INLINE_LAMBDA { return cpu::abs_key(w_p[i] + u_p[i]); };
  // The float ops of the reference, one rounding each (the build disables FMA contraction). The choices
  // are bit operations, not branches: `pruned` follows the data, so a branch would be mispredicted on a
  // good share of the elements, and branch-free loops can be vectorised.
  //   kept:   U = +0.0f,                       RHS = B + rho * V
  //   pruned: U = V (-0.0f when V is zero),    RHS = B + rho * (-V)   (-V: V with its sign bit flipped)
  const auto write = [w_p, u_p, b_p, rhs_p, rho_f](int64_t i, bool pruned) ADMM_SPARSE_ALWAYS_INLINE_LAMBDA {
    const uint32_t v = cpu::bits_of(w_p[i] + u_p[i]);
    const uint32_t all_if_pruned = 0u - static_cast<uint32_t>(pruned);
    const uint32_t zero_sign = static_cast<uint32_t>((v << 1) == 0) << 31;
    u_p[i] = cpu::float_of((v | zero_sign) & all_if_pruned);
    rhs_p[i] = b_p[i] + rho_f * cpu::float_of(v ^ (all_if_pruned & 0x80000000u));
  };

  // Output rows of W are the columns of Wn [d_in, d_out].
  const cpu::Lines columns{wn.size(1), wn.size(0), 1, wn.size(1)};
  if (reselect && spec.kind == Structure::kPerRow) {
    cpu::select_per_line(columns, spec.row_k, v_key, write);
  } else if (reselect && spec.kind == Structure::kNM) {
    cpu::select_n_of_m(columns, spec.n, spec.m, v_key, write);
  } else if (reselect) {
    // RHS is rewritten below, so the select may use it as scratch.
    uint32_t* scratch = reinterpret_cast<uint32_t*>(rhs_p);
    cpu::apply_selection(cpu::find_k_smallest(n, k, v_key, scratch), n, v_key, write);
  } else {
    at::parallel_for(0, n, cpu::kChunk, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) write(i, cpu::bits_of(u_p[i]) != 0);
    });
  }
}

// Tiles of 64 x 64 floats (16 KiB): a tile and its mirror stay in L1 while the mirror is written column-wise.
constexpr int64_t kTile = 64;

void normalise_cpu(const at::Tensor& h, const at::Tensor& d, at::Tensor& hn, bool symmetric) {
  const int64_t n = h.size(0);
  const float* h_p = h.data_ptr<float>();
  const float* d_p = d.data_ptr<float>();
  float* o_p = hn.data_ptr<float>();
  // The tiles on and below the diagonal, as one flat list so that the threads get equal shares; each
  // writes its entries and their mirrors above the diagonal.
  const int64_t tiles = (n + kTile - 1) / kTile;
  std::vector<std::pair<int64_t, int64_t>> lower;
  lower.reserve(tiles * (tiles + 1) / 2);
  for (int64_t ti = 0; ti < tiles; ++ti)
    for (int64_t tj = 0; tj <= ti; ++tj) lower.emplace_back(ti, tj);
  at::parallel_for(0, static_cast<int64_t>(lower.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = lower[t].first * kTile, c0 = lower[t].second * kTile;
      const int64_t r1 = std::min(n, r0 + kTile), c1 = std::min(n, c0 + kTile);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c_end = std::min(c1, r + 1);  // only the lower triangle of a diagonal tile
        for (int64_t c = c0; c < c_end; ++c) {
          const float v = h_p[r * n + c];
          const float lower_value = v / d_p[r] / d_p[c];
          o_p[r * n + c] = lower_value;
          o_p[c * n + r] = symmetric ? lower_value : v / d_p[c] / d_p[r];
        }
      }
    }
  });
}

void unnormalise_cpu(const at::Tensor& wn, const at::Tensor& u, const at::Tensor& d, at::Tensor& out) {
  const int64_t rows = wn.size(0), cols = wn.size(1);  // [d_in, d_out]
  const float* w_p = wn.data_ptr<float>();
  const float* u_p = u.data_ptr<float>();
  const float* d_p = d.data_ptr<float>();
  float* o_p = out.data_ptr<float>();
  const int64_t row_tiles = (rows + kTile - 1) / kTile, col_tiles = (cols + kTile - 1) / kTile;
  // Tiles of Wn read row by row and written transposed, so both sides stay in cache.
  at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = (t / col_tiles) * kTile, c0 = (t % col_tiles) * kTile;
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (int64_t r = r0; r < r1; ++r) {
        const float scale = d_p[r];
        for (int64_t c = c0; c < c1; ++c) {
          const float u_v = u_p[r * cols + c];
          const float z = cpu::bits_of(u_v) != 0 ? 0.0f : w_p[r * cols + c] + u_v;
          o_p[c * rows + r] = z / scale;
        }
      }
    }
  });
}

at::Tensor prune_mask_cpu(const at::Tensor& values, int64_t k) {
  check_prune_mask_args(values, k);
  const at::Tensor v = values.contiguous();
  at::Tensor mask = at::empty(values.sizes(), values.options().dtype(at::kBool));
  const float* v_p = v.data_ptr<float>();
  bool* m_p = mask.data_ptr<bool>();
  const int64_t n = v.numel();
  const auto key = [&](int64_t i) { return cpu::abs_key(v_p[i]); };
  at::Tensor scratch = at::empty({n}, values.options().dtype(at::kInt));
  cpu::apply_selection(cpu::find_k_smallest(n, k, key, reinterpret_cast<uint32_t*>(scratch.data_ptr<int32_t>())), n,
                       key, [&](int64_t i, bool selected) { m_p[i] = selected; });
  return mask;
}

// Rows of a contiguous [R, C] matrix as lines.
cpu::Lines rows_of(const at::Tensor& v) { return {v.size(0), v.size(1), v.size(1), 1}; }

at::Tensor prune_mask_rows_cpu(const at::Tensor& values, int64_t k) {
  check_prune_mask_rows_args(values, k);
  const at::Tensor v = values.contiguous();
  at::Tensor mask = at::empty(values.sizes(), values.options().dtype(at::kBool));
  const float* v_p = v.data_ptr<float>();
  bool* m_p = mask.data_ptr<bool>();
  cpu::select_per_line(rows_of(v), k, [&](int64_t i) { return cpu::abs_key(v_p[i]); },
                       [&](int64_t i, bool selected) { m_p[i] = selected; });
  return mask;
}

at::Tensor prune_mask_nm_cpu(const at::Tensor& values, int64_t n, int64_t m) {
  check_prune_mask_nm_args(values, n, m);
  const at::Tensor v = values.contiguous();
  at::Tensor mask = at::empty(values.sizes(), values.options().dtype(at::kBool));
  const float* v_p = v.data_ptr<float>();
  bool* m_p = mask.data_ptr<bool>();
  cpu::select_n_of_m(rows_of(v), n, m, [&](int64_t i) { return cpu::abs_key(v_p[i]); },
                     [&](int64_t i, bool selected) { m_p[i] = selected; });
  return mask;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> admm_prune_cpu(const at::Tensor& hessian, const at::Tensor& weight, int64_t k,
                                                  double percdamp, double rho, int64_t iters, int64_t prune_iters,
                                                  c10::string_view structure) {
  return admm_prune_with(hessian, weight, k, percdamp, rho, iters, prune_iters, std::string(structure),
                         DeviceKernels{&project_cpu, &normalise_cpu, &unnormalise_cpu});
}

}  // namespace

TORCH_LIBRARY_IMPL(admm_sparse, CPU, m) {
  m.impl("prune_mask", &prune_mask_cpu);
  m.impl("prune_mask_rows", &prune_mask_rows_cpu);
  m.impl("prune_mask_nm", &prune_mask_nm_cpu);
  m.impl("admm_prune", &admm_prune_cpu);
}

}  // namespace admm_sparse
