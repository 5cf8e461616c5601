// Emulator shim (see ../emulator.h): the part of the CUDA runtime API that csrc/cuda calls.
#pragma once
#include "../emulator.h"

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = cuda_emulator::kSuccess;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cuda_emulator::kSuccess: return "no error";
    case cuda_emulator::kInvalidValue: return "invalid argument";
    case cuda_emulator::kInvalidConfiguration: return "invalid configuration argument";
    case cuda_emulator::kLaunchOutOfResources: return "too many resources requested for launch";
    default: return "unknown error";
  }
}

inline cudaError_t cudaGetLastError() { return std::exchange(cuda_emulator::last_error, cudaSuccess); }

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMultiProcessorCount) return cuda_emulator::kInvalidValue;
  *value = cuda_emulator::config.multiprocessors;
  return cudaSuccess;
}

inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t /*stream*/ = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
