// CUDA kernels: the fused ADMM projection pass and the k-smallest mask, both on the radix select of
// select.cuh, and the normalisation passes before and after. The rest of admm_prune (GEMMs,
// Cholesky) is the device-generic driver of admm.cpp. Only c10/cuda headers are used (not
// ATen/cuda/CUDAContext.h, which needs the cuBLAS and cuSPARSE headers), so this file also compiles
// against a CPU build of torch plus a bare nvcc.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../admm.h"
#include "select.cuh"

namespace admm_sparse {
namespace {

using gpu::kThreads;

struct PlainLoad {
  const float* v;
  __device__ __forceinline__ float operator()(int64_t i) const { return v[i]; }
};

// V = Wn + U, recomputed in every pass rather than stored (the passes are memory bound either way;
// this keeps the working set at the driver's four buffers). Same rounding as the CPU path.
struct SumLoad {
  const float* wn;
  const float* u;
  __device__ __forceinline__ float operator()(int64_t i) const { return __fadd_rn(wn[i], u[i]); }
};

// The float ops of the reference, one rounding each (explicit _rn intrinsics: never contracted to
// an FMA whatever the flags). Pruned zeros are stored as -0.0f so bits(U) != 0 marks the pruned set.
__device__ __forceinline__ void project_write(int64_t i, float v, bool pruned, float* u, const float* b,
                                              float* rhs, float rho) {
  if (pruned) {
    u[i] = v == 0.0f ? -0.0f : v;
    rhs[i] = __fadd_rn(b[i], __fmul_rn(rho, -v));
  } else {
    u[i] = 0.0f;
    rhs[i] = __fadd_rn(b[i], __fmul_rn(rho, v));
  }
}

__global__ void __launch_bounds__(kThreads)
    project_select_kernel(const float* wn, float* u, const float* b, float* rhs, float rho, int64_t n,
                          gpu::DeviceSelection sel) {
  const SumLoad load{wn, u};
  gpu::apply_selection(load, n, sel, [&](int64_t i, float v, bool pruned) { project_write(i, v, pruned, u, b, rhs, rho); });
}

// Fixed-mask iterations: the pruned set is the previous pass's, read from U's bit pattern.
__global__ void __launch_bounds__(kThreads)
    project_fixed_kernel(const float* wn, float* u, const float* b, float* rhs, float rho, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const float u_old = u[i];
    project_write(i, __fadd_rn(wn[i], u_old), __float_as_uint(u_old) != 0u, u, b, rhs, rho);
  }
}

// Structured reselection: per output row (a column of Wn) by one block each, or one thread per N:M group.
__global__ void __launch_bounds__(kThreads)
    project_rows_kernel(const float* wn, float* u, const float* b, float* rhs, float rho, gpu::Lines ln, int64_t k) {
  const SumLoad load{wn, u};
  gpu::select_line_block(load, ln, blockIdx.x, k,
                         [&](int64_t i, float v, bool pruned) { project_write(i, v, pruned, u, b, rhs, rho); });
}

__global__ void __launch_bounds__(kThreads)
    project_nm_kernel(const float* wn, float* u, const float* b, float* rhs, float rho, gpu::Lines ln, int n, int m) {
  int64_t line, g;
  if (!gpu::group_of_thread(ln, m, &line, &g)) return;
  const SumLoad load{wn, u};
  gpu::select_group(load, ln, line, g, n, m,
                    [&](int64_t i, float v, bool pruned) { project_write(i, v, pruned, u, b, rhs, rho); });
}

__global__ void __launch_bounds__(kThreads) mask_rows_kernel(PlainLoad load, bool* out, gpu::Lines ln, int64_t k) {
  gpu::select_line_block(load, ln, blockIdx.x, k, [&](int64_t i, float, bool selected) { out[i] = selected; });
}

__global__ void __launch_bounds__(kThreads) mask_nm_kernel(PlainLoad load, bool* out, gpu::Lines ln, int n, int m) {
  int64_t line, g;
  if (!gpu::group_of_thread(ln, m, &line, &g)) return;
  gpu::select_group(load, ln, line, g, n, m, [&](int64_t i, float, bool selected) { out[i] = selected; });
}

// One block per line: the grid's x dimension holds at most 2^31 - 1 blocks.
void check_line_grid(int64_t lines) {
  TORCH_CHECK(lines < (int64_t(1) << 31), "too many rows for the per-row selection (", lines, ")");
}

unsigned group_grid(const gpu::Lines& ln, int64_t m) {
  const int64_t threads = ln.count * (ln.len / m);
  TORCH_CHECK(gpu::ceil_div(threads, kThreads) < (int64_t(1) << 31), "too many N:M groups (", threads, ")");
  return static_cast<unsigned>(std::max<int64_t>(1, gpu::ceil_div(threads, kThreads)));
}

__global__ void __launch_bounds__(kThreads) mask_kernel(PlainLoad load, bool* out, int64_t n, gpu::DeviceSelection sel) {
  gpu::apply_selection(load, n, sel, [&](int64_t i, float, bool selected) { out[i] = selected; });
}

void check_iterate(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.sizes() == like.sizes(),
              "project_cuda: ", name, " must be a contiguous float32 CUDA tensor like Wn");
}

// ProjectFn of admm.h for CUDA tensors; everything is enqueued on the current stream.
void project_cuda(const at::Tensor& wn, at::Tensor& u, const at::Tensor& b, at::Tensor& rhs, const MaskSpec& spec,
                  double rho, bool reselect) {
  const int64_t k = spec.k;
  check_iterate(wn, wn, "Wn");
  check_iterate(u, wn, "U");
  check_iterate(b, wn, "B");
  check_iterate(rhs, wn, "RHS");
  const int64_t n = wn.numel();
  TORCH_CHECK(k >= 0 && k <= n, "project_cuda: k must be in [0, ", n, "], got ", k);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(wn.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float rho_f = static_cast<float>(rho);
  const float* wn_p = wn.data_ptr<float>();
  float* u_p = u.data_ptr<float>();
  const float* b_p = b.data_ptr<float>();
  float* rhs_p = rhs.data_ptr<float>();
  const gpu::Lines columns{wn.size(1), wn.size(0), 1, wn.size(1)};  // output rows of W
  if (reselect && spec.kind == Structure::kPerRow) {
    if (columns.count == 0) return;
    check_line_grid(columns.count);
    project_rows_kernel<<<static_cast<unsigned>(columns.count), kThreads, 0, stream>>>(wn_p, u_p, b_p, rhs_p, rho_f,
                                                                                      columns, spec.row_k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (reselect && spec.kind == Structure::kNM) {
    project_nm_kernel<<<group_grid(columns, spec.m), kThreads, 0, stream>>>(wn_p, u_p, b_p, rhs_p, rho_f, columns,
                                                                            static_cast<int>(spec.n),
                                                                            static_cast<int>(spec.m));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (reselect) {
    const gpu::SelectBuffers sel = gpu::select_k_smallest(SumLoad{wn_p, u_p}, n, k, wn.options(), stream);
    project_select_kernel<<<sel.grid, kThreads, 0, stream>>>(wn_p, u_p, b_p, rhs_p, rho_f, n, sel.dev);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, wn.get_device()));
    const int64_t grid = std::min<int64_t>(gpu::ceil_div(n, kThreads), std::max(1, sms) * int64_t(8));
    project_fixed_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(wn_p, u_p, b_p, rhs_p, rho_f, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor prune_mask_cuda(const at::Tensor& values, int64_t k) {
  check_prune_mask_args(values, k);
  TORCH_CHECK(values.is_cuda(), "prune_mask: values must be a CUDA tensor here, got ", values.device());
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = values.contiguous();
  at::Tensor mask = at::empty(values.sizes(), values.options().dtype(at::kBool));
  const int64_t n = v.numel();
  if (n == 0) return mask;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const PlainLoad load{v.data_ptr<float>()};
  const gpu::SelectBuffers sel = gpu::select_k_smallest(load, n, k, v.options(), stream);
  mask_kernel<<<sel.grid, kThreads, 0, stream>>>(load, mask.data_ptr<bool>(), n, sel.dev);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

// Rows of a contiguous [R, C] matrix as lines.
gpu::Lines rows_of(const at::Tensor& v) { return {v.size(0), v.size(1), v.size(1), 1}; }

at::Tensor prune_mask_rows_cuda(const at::Tensor& values, int64_t k) {
  check_prune_mask_rows_args(values, k);
  TORCH_CHECK(values.is_cuda(), "prune_mask_rows: values must be a CUDA tensor here, got ", values.device());
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = values.contiguous();
  at::Tensor mask = at::empty(values.sizes(), values.options().dtype(at::kBool));
  if (v.numel() == 0) return mask;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const gpu::Lines ln = rows_of(v);
  check_line_grid(ln.count);
  mask_rows_kernel<<<static_cast<unsigned>(ln.count), kThreads, 0, stream>>>(PlainLoad{v.data_ptr<float>()},
                                                                            mask.data_ptr<bool>(), ln, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

at::Tensor prune_mask_nm_cuda(const at::Tensor& values, int64_t n, int64_t m) {
  check_prune_mask_nm_args(values, n, m);
  TORCH_CHECK(values.is_cuda(), "prune_mask_nm: values must be a CUDA tensor here, got ", values.device());
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = values.contiguous();
  at::Tensor mask = at::empty(values.sizes(), values.options().dtype(at::kBool));
  if (v.numel() == 0) return mask;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const gpu::Lines ln = rows_of(v);
  mask_nm_kernel<<<group_grid(ln, m), kThreads, 0, stream>>>(PlainLoad{v.data_ptr<float>()}, mask.data_ptr<bool>(),
                                                             ln, static_cast<int>(n), static_cast<int>(m));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

// One thread per entry of Hn; the upper triangle reads its mirror in H's lower triangle (uncoalesced, but a
// single pass over an n x n matrix once per layer).
constexpr int kNormTileX = 32, kNormTileY = 8;

__global__ void __launch_bounds__(kNormTileX * kNormTileY)
    normalise_kernel(const float* h, const float* d, float* hn, int64_t n, bool symmetric) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kNormTileX + threadIdx.x;
  const int64_t r = static_cast<int64_t>(blockIdx.y) * kNormTileY + threadIdx.y;
  if (r >= n || c >= n) return;
  const int64_t hi = r >= c ? r : c, lo = r >= c ? c : r;
  // Divided first by the row's scale (the reference's rounding), or by the lower triangle's row's.
  const int64_t first = symmetric ? hi : r, second = symmetric ? lo : c;
  hn[r * n + c] = __fdiv_rn(__fdiv_rn(h[hi * n + lo], d[first]), d[second]);
}

void normalise_cuda(const at::Tensor& h, const at::Tensor& d, at::Tensor& hn, bool symmetric) {
  const int64_t n = h.size(0);
  if (n == 0) return;
  const int64_t rows = (n + kNormTileY - 1) / kNormTileY;
  TORCH_CHECK(rows <= 65535, "admm_prune: in_features=", n, " is too large for the CUDA normalisation grid");
  const dim3 grid(static_cast<unsigned>((n + kNormTileX - 1) / kNormTileX), static_cast<unsigned>(rows));
  normalise_kernel<<<grid, dim3(kNormTileX, kNormTileY), 0, c10::cuda::getCurrentCUDAStream()>>>(
      h.data_ptr<float>(), d.data_ptr<float>(), hn.data_ptr<float>(), n, symmetric);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One thread per entry of Out [d_out, d_in]; Wn and U are read transposed (uncoalesced, once per layer).
__global__ void __launch_bounds__(kNormTileX * kNormTileY)
    unnormalise_kernel(const float* wn, const float* u, const float* d, float* out, int64_t d_out, int64_t d_in) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kNormTileX + threadIdx.x;  // input channel
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kNormTileY + threadIdx.y;  // output row
  if (o >= d_out || i >= d_in) return;
  const float u_v = u[i * d_out + o];
  const float z = __float_as_uint(u_v) != 0u ? 0.0f : __fadd_rn(wn[i * d_out + o], u_v);
  out[o * d_in + i] = __fdiv_rn(z, d[i]);
}

void unnormalise_cuda(const at::Tensor& wn, const at::Tensor& u, const at::Tensor& d, at::Tensor& out) {
  const int64_t d_in = wn.size(0), d_out = wn.size(1);
  if (d_in == 0 || d_out == 0) return;
  const int64_t rows = (d_out + kNormTileY - 1) / kNormTileY;
  TORCH_CHECK(rows <= 65535, "admm_prune: out_features=", d_out, " is too large for the CUDA output grid");
  const dim3 grid(static_cast<unsigned>((d_in + kNormTileX - 1) / kNormTileX), static_cast<unsigned>(rows));
  unnormalise_kernel<<<grid, dim3(kNormTileX, kNormTileY), 0, c10::cuda::getCurrentCUDAStream()>>>(
      wn.data_ptr<float>(), u.data_ptr<float>(), d.data_ptr<float>(), out.data_ptr<float>(), d_out, d_in);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Returns whatever admm_prune_with returns (the schema's outputs).
auto admm_prune_cuda(const at::Tensor& hessian, const at::Tensor& weight, int64_t k, double percdamp, double rho,
                     int64_t iters, int64_t prune_iters, c10::string_view structure) {
  TORCH_CHECK(weight.is_cuda() && hessian.is_cuda(), "admm_prune: hessian and weight must both be CUDA tensors, got ",
              hessian.device(), " and ", weight.device());
  const c10::cuda::CUDAGuard guard(weight.device());
  return admm_prune_with(hessian, weight, k, percdamp, rho, iters, prune_iters, std::string(structure),
                         DeviceKernels{&project_cuda, &normalise_cuda, &unnormalise_cuda});
}

}  // namespace

TORCH_LIBRARY_IMPL(admm_sparse, CUDA, m) {
  m.impl("prune_mask", &prune_mask_cuda);
  m.impl("prune_mask_rows", &prune_mask_rows_cuda);
  m.impl("prune_mask_nm", &prune_mask_nm_cuda);
  m.impl("admm_prune", &admm_prune_cuda);
}

}  // namespace admm_sparse
