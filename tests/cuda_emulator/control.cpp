// Test-only op that sets the emulated device: its multiprocessor count (which sizes the grids) and the
// order in which threads and blocks run between synchronisation points (see emulator.h).
#include <torch/library.h>

#include "emulator.h"

namespace {
void configure(int64_t multiprocessors, int64_t schedule) {
  TORCH_CHECK(multiprocessors >= 1, "configure: multiprocessors must be >= 1, got ", multiprocessors);
  TORCH_CHECK(schedule >= 0, "configure: schedule must be >= 0, got ", schedule);
  cuda_emulator::config.multiprocessors = static_cast<int>(multiprocessors);
  cuda_emulator::config.schedule = schedule;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(admm_sparse_emulated, m) {
  m.def("emulator_configure(int multiprocessors, int schedule) -> ()", &configure);
}
