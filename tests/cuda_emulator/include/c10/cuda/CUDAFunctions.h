// Emulator shim (see ../../../emulator.h): device 0 is the only one.
#pragma once
#include <c10/core/Device.h>
#include <cuda_runtime.h>

namespace c10::cuda {
inline c10::DeviceIndex current_device() { return 0; }
}  // namespace c10::cuda
