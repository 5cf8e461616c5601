// The schemas of every native op, and nothing else. Kernels register per dispatch key in
// cpu/*.cpp, cuda/*.cu, and (for device-generic ATen code) the files beside this one.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(admm_sparse, m) {
  // The statistics of SPEC section 1 as plain float64 sums, which any split of the batches over processes
  // adds up to the same values: hessian_sum[d_in, d_in] += X^T X on the lower triangle (the upper one is
  // never read or written), square_sum[d_in] += sum_t X[t]^2, X = inp.reshape(-1, d_in) in float32. Each
  // batch's products are float32 GEMMs blocked by d_in alone; only their sum is float64.
  m.def("accumulate_sums(Tensor(a!) hessian_sum, Tensor(b!) square_sum, Tensor inp) -> ()");
  // (matrix + shift I)^-1 through a Cholesky factorisation of the lower triangle. If that matrix is not
  // positive definite, more shift is added and the factorisation retried. Returns the inverse and the
  // shift used (a float32 scalar tensor on the matrix's device; callers warn when it exceeds `shift`,
  // since a C++ warning does not reach Python's warnings from a custom op).
  m.def("damped_cholesky_inverse(Tensor matrix, float shift) -> (Tensor, Tensor)");
  // Boolean mask of the k entries of smallest |values| over the whole tensor (True = selected);
  // ties are broken by the lower flat (row-major) index. Exactly k entries are True.
  m.def("prune_mask(Tensor values, int k) -> Tensor");
  // values [R, C] float32: in every row, the k smallest |values| (ties: lower column first). k * R True.
  m.def("prune_mask_rows(Tensor values, int k) -> Tensor");
  // values [R, C] float32, C a multiple of m (1 <= m <= 64, 0 <= n <= m): in every group of m consecutive
  // entries of a row, the m - n smallest |values| (ties: lower column first), so that at most n entries
  // per group stay unselected (the N:M layout when True means pruned).
  m.def("prune_mask_nm(Tensor values, int n, int m) -> Tensor");
  // The whole ADMM weight update of SPEC section 2: hessian [d_in, d_in] (lower triangle read),
  // weight [d_out, d_in] float32. Returns the pruned weight [d_out, d_in] float32 with exactly k zeros
  // chosen, the damping added to the normalised Hessian as a float32 pair (percdamp * mean(diag Hn),
  // the extra damping a failed factorisation's retry added: 0 normally), and
  // tr(W H W^T) of the input weight (= ||X W^T||^2 over the calibration data, free from the loop's B),
  // which callers need for the relative output error.
  // structure: "unstructured" (the k smallest over the whole weight, SPEC section 2), "per_row" (k / d_out
  // in every output row, as prune_mask_rows) or "N:M" (as prune_mask_nm on each output row; k must be
  // d_out * d_in / M * (M - N)); the mask is re-chosen with that structure in each of the first prune_iters.
  // Fast mode's elementwise passes (admm_sparse.fast; CPU kernels only, other devices use ATen ops there).
  // u, wn0, z: float32 [d_in, d_out], contiguous. fast_relax: u <- alpha * (wn0 + rho * gemm_out) +
  // (1 - alpha) * z + u (the over-relaxed iterate plus the scaled dual; gemm_out float32 or bfloat16).
  m.def("fast_relax(Tensor gemm_out, Tensor wn0, Tensor z, Tensor(a!) u, float rho, float alpha) -> ()");
  // With V in u and `pruned` (bool): z <- V where not pruned (else 0), u <- V where pruned (else 0),
  // step <- z - u - wn0 (float32 or bfloat16). Returns how many entries of pruned differ from previous
  // (0 without previous).
  m.def("fast_project(Tensor(a!) u, Tensor pruned, Tensor? previous, Tensor wn0, Tensor(b!) z, Tensor(c!) step) -> int");
  m.def("admm_prune(Tensor hessian, Tensor weight, int k, float percdamp, float rho, int iters, int prune_iters, str structure=\"unstructured\") -> (Tensor, Tensor, Tensor)");
}

// Importing admm_sparse._C from Python loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
