// Emulator shim (see ../../../emulator.h): C10's CUDA error checks, reporting through TORCH_CHECK.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(EXPR)                                                         \
  do {                                                                               \
    const cudaError_t c10_cuda_emulated_error = (EXPR);                              \
    TORCH_CHECK(c10_cuda_emulated_error == cudaSuccess, "CUDA error: ",              \
                cudaGetErrorString(c10_cuda_emulated_error));                        \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
