// Emulator shim (see ../../../emulator.h): the emulated device is the CPU, and there is only one.
#pragma once
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "CUDA emulator: tensors stand in for CUDA ones on the CPU, got ", device);
  }
};
}  // namespace c10::cuda
