// Device-generic pieces of the native ops, shared by the CPU and CUDA registrations.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <string>
#include <tuple>

namespace admm_sparse {

// Held for the whole of an op whose arithmetic is its own (float32 GEMMs, float64 sums): a caller's autocast
// region must not turn the ATen GEMMs inside it into bfloat16 or float16 ones. Without it, statistics gathered
// inside the calibration passes' bfloat16 autocast had bfloat16-rounded products (an indefinite Hessian).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// One fused pass of the ADMM loop over the d_in x d_out iterate. All four tensors are float32,
// contiguous, of the same shape and on the same device. Semantics (SPEC section 2):
//   V = Wn + U
//   pruned = reselect ? the k smallest |V| (ties: lower flat index first)
//                     : (bit pattern of U != 0)      // the mask of the previous pass, see below
//   Z = pruned ? 0 : V;   U <- V - Z;   RHS <- B + rho * (Z - U)
// Computed so that RHS is bitwise what the reference's separate float32 ops give:
//   kept:   U <- +0.0f,                       RHS <- B + rho * V
//   pruned: U <- V (but -0.0f when V == 0),   RHS <- B + rho * (-V)
// Storing -0.0f for a pruned zero makes "bits(U) != 0" exactly the pruned set, so the fixed-mask
// iterations need no separate mask buffer (kept entries always hold +0.0f).
//
// Which entries "the k smallest" means is the mask structure (lines = output rows of W = columns of Wn):
//   kUnstructured: the k smallest over the whole matrix (SPEC section 2);
//   kPerRow:       the row_k smallest of every column of Wn (ties: lower row index first);
//   kNM:           in every group of m consecutive rows of a column of Wn, the m - n smallest
//                  (at most n non-zeros per group; ties: lower row index first).
// In every case exactly k entries are pruned (k = d_out * row_k, or d_out * d_in / m * (m - n)).
enum class Structure { kUnstructured, kPerRow, kNM };

struct MaskSpec {
  Structure kind = Structure::kUnstructured;
  int64_t k = 0;      // total pruned
  int64_t row_k = 0;  // kPerRow: pruned per output row
  int64_t n = 0, m = 0;  // kNM: kept per group, group size
};

// Parses "unstructured", "per_row" or "N:M" for a weight [d_out, d_in] with k pruned in all, checking
// that k is what the structure prunes and that M divides d_in (the errors name the weight's shape).
MaskSpec parse_mask_structure(const std::string& structure, int64_t d_out, int64_t d_in, int64_t k);

using ProjectFn = void (*)(const at::Tensor& Wn, at::Tensor& U, const at::Tensor& B, at::Tensor& RHS,
                           const MaskSpec& spec, double rho, bool reselect);

// Hn = H / d_i / d_j for a contiguous square H of which only the lower triangle is read (H[i][j] for i < j
// is taken as H[j][i]). With `symmetric` false, every entry is rounded as the reference rounds
// h / d[:, None] / d[None, :]: Hn[i][j] = (H[i][j] / d[i]) / d[j]. With `symmetric` true, the lower
// triangle's entries are mirrored into the upper one, so Hn is exactly symmetric (and so is its own
// column-major transpose, which LAPACK can factor in place).
using NormaliseFn = void (*)(const at::Tensor& H, const at::Tensor& d, at::Tensor& Hn, bool symmetric);

// The end of the ADMM: Out [d_out, d_in] = ((Wn + U) * mask)^T / d, where the pruned set (mask 0) is
// exactly the entries whose U has a non-zero bit pattern (see ProjectFn). Pruned entries become +0.0f.
using UnnormaliseFn = void (*)(const at::Tensor& Wn, const at::Tensor& U, const at::Tensor& d, at::Tensor& Out);

// The per-device kernels of admm_prune; everything else in it is device-generic ATen.
struct DeviceKernels {
  ProjectFn project;
  NormaliseFn normalise;
  UnnormaliseFn unnormalise;
};

// SPEC section 2 end to end, with the device's kernels; see the admm_prune schema.
std::tuple<at::Tensor, at::Tensor, at::Tensor> admm_prune_with(const at::Tensor& hessian, const at::Tensor& weight,
                                                   int64_t k, double percdamp, double rho, int64_t iters,
                                                   int64_t prune_iters, const std::string& structure,
                                                   const DeviceKernels& kernels);

// Argument checks shared by every device's registration of prune_mask.
void check_prune_mask_args(const at::Tensor& values, int64_t k);
// ... and of prune_mask_rows / prune_mask_nm (values: a float32 matrix).
void check_prune_mask_rows_args(const at::Tensor& values, int64_t k);
void check_prune_mask_nm_args(const at::Tensor& values, int64_t n, int64_t m);
constexpr int64_t kMaxGroupSize = 64;

}  // namespace admm_sparse
