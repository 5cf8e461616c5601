// Device-generic pieces of the native ops, shared by the CPU and CUDA registrations.
#pragma once
#include <ATen/ATen.h>
#include <tuple>

namespace admm_sparse {

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
using ProjectFn = void (*)(const at::Tensor& Wn, at::Tensor& U, const at::Tensor& B, at::Tensor& RHS,
                           int64_t k, double rho, bool reselect);

// SPEC section 2 end to end, with the device's fused projection; see the admm_prune schema.
std::tuple<at::Tensor, at::Tensor, at::Tensor> admm_prune_with(const at::Tensor& hessian, const at::Tensor& weight,
                                                   int64_t k, double percdamp, double rho, int64_t iters,
                                                   int64_t prune_iters, ProjectFn project);

// Argument checks shared by every device's registration of prune_mask.
void check_prune_mask_args(const at::Tensor& values, int64_t k);

}  // namespace admm_sparse
