// Device-generic native code: the statistics update, the damped Cholesky inverse and the ADMM driver.
// Everything here is ATen calls (MKL/LAPACK on the CPU, cuBLAS/cuSOLVER on CUDA), so one implementation
// serves every device; only the fused projection pass differs per device (cpu/admm.cpp, cuda/admm.cu).
#include "admm.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>

namespace admm_sparse {
namespace {

void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be a matrix, got ", t.dim(), " dimensions");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
}

// No NaN or inf in t. A finite sum proves it (NaN and inf survive any addition) in one fast reduction;
// only a sum that is not finite (a non-finite entry, or an overflow) needs the elementwise check.
bool all_finite(const at::Tensor& t) {
  return at::isfinite(t.sum()).item<bool>() || at::isfinite(t).all().item<bool>();
}

// Leaf size of the triangular Hessian update: large enough for efficient GEMMs, small enough that the
// wasted upper half of the diagonal blocks stays a few percent of the work.
int64_t triangle_leaf(const at::Tensor& t) { return t.is_cuda() ? 1024 : 256; }

// The float32 product of an off-diagonal panel waiting for its float64 add: at most this many floats (16 MiB),
// which keeps the panels' GEMMs large (a 4096-wide layer's top quarter is one GEMM).
constexpr int64_t kPanelFloats = int64_t{1} << 22;

// hessian_sum[j0:j1, j0:j1] (float64) += lower triangle of X[:, j0:j1]^T X[:, j0:j1] (float32 GEMMs), and
// square_sum[j0:j1] += the columns' sums of squares. Halved recursively: the off-diagonal quarter is large
// GEMMs (efficient; cut into panels of rows only where its float32 product would exceed kPanelFloats), the
// two diagonal halves recurse, and only the leaves compute a full square block to keep
// its lower triangle. The blocking depends on d_in alone, so a batch's float32 products are the same
// whichever process computes them and whatever batches came before.
void accumulate_triangle(const at::Tensor& hessian_sum, const at::Tensor& square_sum, const at::Tensor& x,
                         int64_t j0, int64_t j1, int64_t leaf) {
  const int64_t w = j1 - j0;
  if (w <= leaf) {
    const at::Tensor xj = x.narrow(1, j0, w);
    // Its diagonal is the columns' sum of squares, which the scaler needs, so X is read only by the GEMMs.
    const at::Tensor diag_block = at::mm(xj.t(), xj);
    hessian_sum.narrow(0, j0, w).narrow(1, j0, w).add_(diag_block.tril());
    square_sum.narrow(0, j0, w).add_(diag_block.diagonal());
    return;
  }
  const int64_t mid = j0 + w / 2;
  const at::Tensor left = x.narrow(1, j0, mid - j0);
  const int64_t panel = std::max(leaf, kPanelFloats / (mid - j0));
  for (int64_t r0 = mid; r0 < j1; r0 += panel) {
    const int64_t rows = std::min(panel, j1 - r0);
    hessian_sum.narrow(0, r0, rows).narrow(1, j0, mid - j0).add_(at::mm(x.narrow(1, r0, rows).t(), left));
  }
  accumulate_triangle(hessian_sum, square_sum, x, j0, mid, leaf);
  accumulate_triangle(hessian_sum, square_sum, x, mid, j1, leaf);
}

void accumulate_sums(const at::Tensor& hessian_sum, const at::Tensor& square_sum, const at::Tensor& inp) {
  const NoAutocast no_autocast;
  TORCH_CHECK(hessian_sum.dim() == 2 && hessian_sum.scalar_type() == at::kDouble,
              "hessian_sum must be a float64 matrix, got ", hessian_sum.scalar_type(), " of ", hessian_sum.dim(),
              " dimensions");
  const int64_t d_in = hessian_sum.size(0);
  TORCH_CHECK(hessian_sum.size(1) == d_in && hessian_sum.is_contiguous(),
              "hessian_sum must be a contiguous square matrix");
  TORCH_CHECK(square_sum.dim() == 1 && square_sum.size(0) == d_in && square_sum.scalar_type() == at::kDouble,
              "square_sum must be a float64 vector of length ", d_in);
  TORCH_CHECK(inp.dim() >= 1 && inp.size(-1) == d_in, "input's last dimension must be ", d_in, ", got ",
              inp.sizes());
  TORCH_CHECK(at::isFloatingType(inp.scalar_type()), "input must be a floating tensor, got ", inp.scalar_type());
  TORCH_CHECK(inp.device() == hessian_sum.device() && square_sum.device() == hessian_sum.device(),
              "hessian_sum, square_sum and input must be on one device");

  const at::Tensor x = inp.reshape({-1, d_in}).to(at::kFloat).contiguous();
  if (d_in > 0) accumulate_triangle(hessian_sum, square_sum, x, 0, d_in, triangle_leaf(hessian_sum));
}

// Retry rule for a factorisation that failed: add 10x more shift each time, starting from a
// small fraction of the mean diagonal (or an absolute floor for an all-zero matrix).
constexpr int kMaxRetries = 12;

// (M + shift I)^-1 in place, where M = buf.t(): buf is a contiguous n x n buffer holding M transposed, so
// that buf.t() is M laid out column-major and both LAPACK calls run in place on it (a row-major matrix
// would cost ATen a temporary n x n copy in each). The factorisation reads M's lower triangle.
// fill_matrix() puts M in buf before each attempt; a failed one is retried with more shift. Returns the
// shift used; buf then holds the (symmetric) inverse.
double invert_in_place(at::Tensor& buf, double shift, double mean_diag, const std::function<void()>& fill_matrix) {
  at::Tensor cm = buf.t();
  at::Tensor info = at::empty({}, buf.options().dtype(at::kInt));
  double extra = 0.0;
  for (int attempt = 0;; ++attempt) {
    fill_matrix();
    buf.diagonal().add_(shift + extra);
    at::linalg_cholesky_ex_out(cm, info, cm);  // the factor overwrites the matrix
    if (info.item<int>() == 0) break;
    TORCH_CHECK(attempt < kMaxRetries, "damped_cholesky_inverse: matrix is not positive definite even with ",
                shift + extra, " added to its diagonal");
    extra = extra == 0.0 ? std::max(1e-6 * mean_diag, 1e-10) : extra * 10.0;
  }
  at::cholesky_inverse_out(cm, cm);  // and its inverse overwrites the factor
  return shift + extra;
}

std::tuple<at::Tensor, at::Tensor> damped_cholesky_inverse(const at::Tensor& matrix, double shift) {
  const NoAutocast no_autocast;
  check_matrix(matrix, "matrix");
  TORCH_CHECK(matrix.size(0) == matrix.size(1), "matrix must be square, got ", matrix.sizes());
  TORCH_CHECK(std::isfinite(shift) && shift >= 0, "shift must be finite and >= 0, got ", shift);
  TORCH_CHECK(all_finite(matrix), "matrix contains NaN or inf");
  const int64_t n = matrix.size(0);
  const double mean_diag = n ? matrix.diagonal().abs().mean().item<double>() : 0.0;
  // The lower triangle read is the matrix's own, as in the reference, even where rounding left the
  // matrix not exactly symmetric.
  at::Tensor buf = at::empty_like(matrix, at::MemoryFormat::Contiguous);
  const double used = invert_in_place(buf, shift, mean_diag, [&] { buf.t().copy_(matrix); });
  return {buf, at::full({}, used, matrix.options())};
}

}  // namespace

MaskSpec parse_mask_structure(const std::string& structure, int64_t d_out, int64_t d_in, int64_t k) {
  MaskSpec spec;
  spec.k = k;
  if (structure == "unstructured") return spec;
  if (structure == "per_row") {
    spec.kind = Structure::kPerRow;
    spec.row_k = d_out > 0 ? k / d_out : 0;
    TORCH_CHECK(spec.row_k * d_out == k && spec.row_k <= d_in, "mask structure per_row: k=", k,
                " is not the same count in each of the ", d_out, " rows of a weight of shape [", d_out, ", ", d_in,
                "]");
    return spec;
  }
  const auto colon = structure.find(':');
  int64_t n = -1, m = -1;
  if (colon != std::string::npos && colon > 0 && colon + 1 < structure.size() &&
      structure.find_first_not_of("0123456789:") == std::string::npos && structure.find(':', colon + 1) == std::string::npos &&
      colon < 4 && structure.size() - colon - 1 < 4) {
    n = std::stoll(structure.substr(0, colon));
    m = std::stoll(structure.substr(colon + 1));
  }
  TORCH_CHECK(m >= 1 && m <= kMaxGroupSize && n >= 1 && n <= m,
              "mask structure must be \"unstructured\", \"per_row\" or \"N:M\" with 1 <= N <= M <= ", kMaxGroupSize,
              ", got \"", structure, "\"");
  TORCH_CHECK(d_in % m == 0, "mask structure ", structure, " needs in_features divisible by ", m,
              ", got a weight of shape [", d_out, ", ", d_in, "]");
  const int64_t expected = d_out * (d_in / m) * (m - n);
  TORCH_CHECK(k == expected, "mask structure ", structure, " prunes exactly ", expected,
              " entries of a weight of shape [", d_out, ", ", d_in, "], got k=", k);
  spec.kind = Structure::kNM;
  spec.n = n;
  spec.m = m;
  return spec;
}

void check_prune_mask_rows_args(const at::Tensor& values, int64_t k) {
  TORCH_CHECK(values.scalar_type() == at::kFloat, "prune_mask_rows: values must be float32, got ", values.scalar_type());
  TORCH_CHECK(values.dim() == 2, "prune_mask_rows: values must be a matrix, got ", values.dim(), " dimensions");
  TORCH_CHECK(k >= 0 && k <= values.size(1), "prune_mask_rows: k must be in [0, ", values.size(1), "], got ", k);
}

void check_prune_mask_nm_args(const at::Tensor& values, int64_t n, int64_t m) {
  TORCH_CHECK(values.scalar_type() == at::kFloat, "prune_mask_nm: values must be float32, got ", values.scalar_type());
  TORCH_CHECK(values.dim() == 2, "prune_mask_nm: values must be a matrix, got ", values.dim(), " dimensions");
  TORCH_CHECK(m >= 1 && m <= kMaxGroupSize && n >= 0 && n <= m, "prune_mask_nm: need 0 <= n <= m and 1 <= m <= ",
              kMaxGroupSize, ", got n=", n, ", m=", m);
  TORCH_CHECK(values.size(1) % m == 0, "prune_mask_nm: the last dimension must be a multiple of m=", m,
              ", got shape ", values.sizes());
}

void check_prune_mask_args(const at::Tensor& values, int64_t k) {
  TORCH_CHECK(values.scalar_type() == at::kFloat, "prune_mask: values must be float32, got ", values.scalar_type());
  TORCH_CHECK(k >= 0 && k <= values.numel(), "prune_mask: k must be in [0, ", values.numel(), "], got ", k);
}

namespace {

// sum(a * b) accumulated in float64, a and b contiguous of one shape: blocks of ~1M elements, so that no
// full-size product is materialised.
at::Tensor dot_float64(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor flat_a = a.reshape(-1), flat_b = b.reshape(-1);
  const int64_t n = flat_a.numel(), block = int64_t{1} << 20;
  at::Tensor total = at::zeros({}, a.options().dtype(at::kDouble));
  for (int64_t start = 0; start < n; start += block) {
    const int64_t len = std::min(block, n - start);
    total.add_(at::mul(flat_a.narrow(0, start, len), flat_b.narrow(0, start, len)).sum(at::kDouble));
  }
  return total;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> admm_prune_with(const at::Tensor& hessian, const at::Tensor& weight, int64_t k,
                                                   double percdamp, double rho, int64_t iters,
                                                   int64_t prune_iters, const std::string& structure,
                                                   const DeviceKernels& kernels) {
  const NoAutocast no_autocast;
  check_matrix(hessian, "hessian");
  check_matrix(weight, "weight");
  const int64_t d_in = weight.size(1);
  TORCH_CHECK(hessian.size(0) == d_in && hessian.size(1) == d_in, "hessian must be ", d_in, " x ", d_in,
              " for a weight of shape ", weight.sizes(), ", got ", hessian.sizes());
  TORCH_CHECK(hessian.device() == weight.device(), "hessian and weight must be on one device");
  TORCH_CHECK(k >= 0 && k <= weight.numel(), "k must be in [0, ", weight.numel(), "], got ", k);
  TORCH_CHECK(iters >= 1 && prune_iters >= 1 && prune_iters <= iters,
              "need 1 <= prune_iters <= iters, got prune_iters=", prune_iters, ", iters=", iters);
  const MaskSpec spec = parse_mask_structure(structure, weight.size(0), d_in, k);
  TORCH_CHECK(std::isfinite(percdamp) && percdamp >= 0, "percdamp must be finite and >= 0, got ", percdamp);
  TORCH_CHECK(std::isfinite(rho) && rho > 0, "rho must be finite and > 0, got ", rho);
  const at::Tensor h = hessian.contiguous();
  TORCH_CHECK(all_finite(h), "hessian contains NaN or inf");

  // 1. d = sqrt(diag H) + 1e-8; Hn = H / d_i / d_j, rounded as the reference rounds it.
  const at::Tensor d = h.diagonal().sqrt().add_(1e-8);
  at::Tensor hn = at::empty_like(h);
  kernels.normalise(h, d, hn, /*symmetric=*/false);
  // 2. Damping.
  // float32 product, as the reference's tensor * scalar rounds it: keeps the two bitwise comparable.
  const double damping = static_cast<float>(percdamp) * hn.diagonal().mean().item<float>();
  hn.diagonal().add_(damping);
  // 3. Wn = (W d)^T (the transposed copy first: a blocked transpose); B = Hn Wn with the damped Hn.
  at::Tensor wn = at::empty({d_in, weight.size(0)}, weight.options());
  wn.copy_(weight.t());
  wn.mul_(d.unsqueeze(1));
  at::Tensor b = at::mm(hn, wn);
  // Wn^T Hn Wn = W H W^T, so the dense output energy comes from B for one elementwise pass.
  const at::Tensor dense_energy = dot_float64(wn, b).sub_(damping * dot_float64(wn, wn));
  // 4. Hinv = (Hn + rho I)^-1 in Hn's own buffer, so the working set never holds Hn and Hinv at once;
  //    retried with more damping if needed. The factorisation reads the lower triangle of Hn's
  //    column-major view, i.e. Hn's upper one: with Hn's lower triangle mirrored there, it factors
  //    exactly the values the reference's Cholesky reads.
  const double mean_diag = hn.diagonal().abs().mean().item<double>();
  const double shift_used = invert_in_place(hn, rho, mean_diag, [&] {
    kernels.normalise(h, d, hn, /*symmetric=*/true);
    hn.diagonal().add_(damping);
  });
  at::Tensor hinv = std::move(hn);
  const double extra_damping = shift_used - rho;

  // 5. The loop: one fused projection pass and one GEMM per iteration.
  at::Tensor u = at::zeros_like(wn);
  at::Tensor rhs = at::empty_like(wn);
  for (int64_t it = 0; it < iters; ++it) {
    kernels.project(wn, u, b, rhs, spec, rho, /*reselect=*/it < prune_iters);
    at::mm_out(wn, hinv, rhs);
  }
  // 6. Z = (Wn + U) * mask, where the pruned set is exactly the entries whose U has a non-zero bit
  //    pattern (see ProjectFn); then W = Z^T / d, written in the right-hand side's buffer (dead now,
  //    and of the same size), so that the output raises neither the peak nor the page faults.
  b.reset();
  hinv.reset();
  at::Tensor out = rhs.view({weight.size(0), d_in});
  rhs.reset();
  kernels.unnormalise(wn, u, d, out);
  TORCH_CHECK(all_finite(out),
              "admm_prune produced non-finite weights; check the Hessian and weight for extreme values");
  const at::Tensor dampings = at::tensor({damping, extra_damping}, weight.options().device(at::kCPU)).to(weight.device());
  return {out, dampings, dense_energy.to(at::kFloat)};
}

TORCH_LIBRARY_IMPL(admm_sparse, CompositeExplicitAutograd, m) {
  m.impl("accumulate_sums", &accumulate_sums);
  m.impl("damped_cholesky_inverse", &damped_cholesky_inverse);
}

}  // namespace admm_sparse
