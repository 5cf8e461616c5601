// Small kernels, some with the defects the emulator must catch, for tests/test_cuda_emulator.py. Built
// only for the emulator, through the same rewrite as csrc/cuda (build.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>

namespace {

constexpr int kBlock = 256;

// out[t] = in[(t + 32) % kBlock] within each block, through shared memory: another warp's value, so the
// barrier is needed between the write and the read.
__global__ void rotate_kernel(const float* in, float* out, bool barrier) {
  __shared__ float staged[kBlock];
  const int t = threadIdx.x;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kBlock;
  staged[t] = in[base + t];
  if (barrier) __syncthreads();
  out[base + t] = staged[(t + 32) % kBlock];
}

// Inclusive prefix sum within each warp by __shfl_up_sync; lane l also gets, in the second half of out,
// the number of lanes below it with a positive input (by __ballot_sync).
__global__ void warp_scan_kernel(const float* in, float* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  const int lane = threadIdx.x & 31;
  float x = in[i];
  const unsigned positive = __ballot_sync(0xffffffffu, x > 0.0f);
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  out[i] = x;
  out[n + i] = static_cast<float>(__popc(positive & ((1u << lane) - 1u)));
}

// A barrier that only some threads reach: the others return first.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x >= 100) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// A full-mask ballot that half of each warp skips.
__global__ void divergent_ballot_kernel(float* out) {
  unsigned bits = 0;
  if ((threadIdx.x & 31) < 16) bits = __ballot_sync(0xffffffffu, 1);
  out[threadIdx.x] = static_cast<float>(bits);
}

// Reads shared memory that no thread has written.
__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float never_written[kBlock];
  out[threadIdx.x] = never_written[threadIdx.x];
}

// Reads one block past the end of its input (a read, so that a run without the sanitizer corrupts nothing).
__global__ void read_past_end_kernel(const float* in, float* out, int64_t n) {
  out[threadIdx.x] = in[n + threadIdx.x];
}

// Declared for at most 128 threads per block.
__global__ void __launch_bounds__(128) bounded_kernel(float* out) { out[threadIdx.x] = 1.0f; }

at::Tensor selftest(c10::string_view kernel, const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.numel() % kBlock == 0 && input.numel() > 0,
              "emulator_selftest: input must be float32 with a positive multiple of ", kBlock, " elements");
  const at::Tensor in = input.contiguous();
  const std::string name(kernel);
  const int64_t n = in.numel();
  const unsigned blocks = static_cast<unsigned>(n / kBlock);
  at::Tensor out = at::zeros({name == "warp_scan" ? 2 * n : n}, in.options());
  if (name == "rotate" || name == "rotate_unsynchronised") {
    rotate_kernel<<<blocks, kBlock>>>(in.data_ptr<float>(), out.data_ptr<float>(), name == "rotate");
  } else if (name == "warp_scan") {
    warp_scan_kernel<<<blocks, kBlock>>>(in.data_ptr<float>(), out.data_ptr<float>(), n);
  } else if (name == "divergent_barrier") {
    divergent_barrier_kernel<<<1, kBlock>>>(out.data_ptr<float>());
  } else if (name == "divergent_ballot") {
    divergent_ballot_kernel<<<1, kBlock>>>(out.data_ptr<float>());
  } else if (name == "empty_grid") {
    rotate_kernel<<<0, kBlock>>>(in.data_ptr<float>(), out.data_ptr<float>(), true);
  } else if (name == "read_past_end") {
    read_past_end_kernel<<<1, kBlock>>>(in.data_ptr<float>(), out.data_ptr<float>(), n);
  } else if (name == "unwritten_shared") {
    unwritten_shared_kernel<<<1, kBlock>>>(out.data_ptr<float>());
  } else if (name == "over_launch_bounds") {
    bounded_kernel<<<1, kBlock>>>(out.data_ptr<float>());
  } else if (name == "oversized_block") {
    rotate_kernel<<<1, 2048>>>(in.data_ptr<float>(), out.data_ptr<float>(), true);
  } else {
    TORCH_CHECK(false, "emulator_selftest: unknown kernel ", name);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(admm_sparse_emulated, m) {
  m.def("emulator_selftest(str kernel, Tensor input) -> Tensor", &selftest);
}
