// CPU kernels of fast mode's two elementwise passes per ADMM iteration (admm_sparse.fast): each one pass
// over the d_in x d_out data instead of the five to eight that separate ATen ops make (measured: those cost
// more than the iteration's bfloat16 GEMM at 4096 x 4096).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <functional>

#include "select.h"

namespace admm_sparse {
namespace {

void check_like(const at::Tensor& t, const at::Tensor& like, const char* name, bool low_precision_ok) {
  TORCH_CHECK(t.sizes() == like.sizes() && t.is_contiguous() && t.device() == like.device(), name,
              " must be contiguous, of shape ", like.sizes(), " on ", like.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || (low_precision_ok && t.scalar_type() == at::kBFloat16), name,
              " must be float32", low_precision_ok ? " or bfloat16" : "", ", got ", t.scalar_type());
}

void fast_relax_cpu(const at::Tensor& gemm_out, const at::Tensor& wn0, const at::Tensor& z, at::Tensor& u,
                    double rho, double alpha) {
  check_like(wn0, u, "wn0", false);
  check_like(z, u, "z", false);
  check_like(gemm_out, u, "gemm_out", true);
  check_like(u, u, "u", false);
  const float* w0 = wn0.data_ptr<float>();
  const float* z_p = z.data_ptr<float>();
  float* u_p = u.data_ptr<float>();
  const float rho_f = static_cast<float>(rho), a = static_cast<float>(alpha), b = static_cast<float>(1.0 - alpha);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gemm_out.scalar_type(), "fast_relax", [&] {
    const scalar_t* o = gemm_out.data_ptr<scalar_t>();
    at::parallel_for(0, u.numel(), cpu::kChunk, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const float wn = w0[i] + rho_f * static_cast<float>(o[i]);
        u_p[i] = a * wn + b * z_p[i] + u_p[i];
      }
    });
  });
}

int64_t fast_project_cpu(at::Tensor& u, const at::Tensor& pruned, const c10::optional<at::Tensor>& previous,
                         const at::Tensor& wn0, at::Tensor& z, at::Tensor& step) {
  check_like(u, u, "u", false);
  check_like(wn0, u, "wn0", false);
  check_like(z, u, "z", false);
  check_like(step, u, "step", true);
  TORCH_CHECK(pruned.sizes() == u.sizes() && pruned.is_contiguous() && pruned.scalar_type() == at::kBool,
              "pruned must be a contiguous bool tensor of shape ", u.sizes());
  const bool* prev = nullptr;
  if (previous.has_value()) {
    TORCH_CHECK(previous->sizes() == u.sizes() && previous->is_contiguous() && previous->scalar_type() == at::kBool,
                "previous must be a contiguous bool tensor of shape ", u.sizes());
    prev = previous->data_ptr<bool>();
  }
  const bool* p = pruned.data_ptr<bool>();
  const float* w0 = wn0.data_ptr<float>();
  float* u_p = u.data_ptr<float>();
  float* z_p = z.data_ptr<float>();
  int64_t changed = 0;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, step.scalar_type(), "fast_project", [&] {
    scalar_t* s = step.data_ptr<scalar_t>();
    changed = at::parallel_reduce(0, u.numel(), cpu::kChunk, int64_t{0}, [&](int64_t i0, int64_t i1, int64_t count) {
      // Bit operations, not branches: the mask follows the data, and a branch on it is mispredicted on a
      // good share of the elements (measured 5-10x slower).
      for (int64_t i = i0; i < i1; ++i) {
        const uint32_t v = cpu::bits_of(u_p[i]);
        const uint32_t all_if_pruned = 0u - static_cast<uint32_t>(p[i]);
        const float kept = cpu::float_of(v & ~all_if_pruned), dual = cpu::float_of(v & all_if_pruned);
        z_p[i] = kept;
        u_p[i] = dual;
        s[i] = static_cast<scalar_t>(kept - dual - w0[i]);
      }
      if (prev) {
        for (int64_t i = i0; i < i1; ++i) count += p[i] != prev[i];
      }
      return count;
    }, std::plus<int64_t>());
  });
  return changed;
}

}  // namespace

TORCH_LIBRARY_IMPL(admm_sparse, CPU, m) {
  m.impl("fast_relax", &fast_relax_cpu);
  m.impl("fast_project", &fast_project_cpu);
}

}  // namespace admm_sparse
