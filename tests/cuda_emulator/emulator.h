// A CPU emulator of the CUDA execution model, so that csrc/cuda's kernels run (and are tested) on machines
// without a GPU. build.py compiles the CUDA sources as C++ against this header and the shim headers in
// include/ (cuda_runtime.h, c10/cuda/*), after rewriting each `kernel<<<grid, block, smem, stream>>>(args)`
// into `cuda_emulator::launch("kernel", {bound}, [&] { kernel(args); }, grid, block, smem, stream)`.
//
// Every thread of a block is a fiber on one OS thread (switched by fiber.cpp's few instructions on x86-64,
// by ucontext elsewhere); blocks run one after another. A fiber runs until it reaches __syncthreads or a
// warp collective, so the emulation is strict where the hardware is forgiving, and reports as errors what
// would be undefined behaviour on a GPU:
//   - __syncthreads must be reached by every thread of the block (none may have exited, none may be
//     waiting in a warp collective instead);
//   - a full-mask warp collective (__ballot_sync, __shfl_up_sync) must be reached by all 32 lanes of the
//     warp, at the same collective;
//   - launch configurations outside CUDA's limits, or with more threads per block than the kernel's
//     __launch_bounds__, do not run and leave the error a GPU gives for cudaGetLastError.
// Warps run one at a time, each until all its lanes wait at __syncthreads or have exited; blocks, warps and
// lanes run in an order set by the configuration op (control.cpp): index order, reverse order, or random
// permutations. Shared memory read without the barrier that orders it after another thread's write then
// gives results that depend on that order, which the tests compare against the CPU kernels.
// Memory from at::empty in the kernels' host code is filled with 0xff bytes (NaN, -1, or an invalid bool),
// as device memory is never zeroed: an output element a kernel forgets to write shows up. So is every
// block's shared memory (build.py turns each __shared__ array into one the emulator can reach).
#pragma once

// The stack switch: fiber.cpp's on x86-64; glibc's ucontext elsewhere, or where build.py asks for it
// (CUDA_EMULATOR_FIBERS=ucontext, which is how the tests run the fallback on x86-64 too).
#if defined(__x86_64__) && !defined(CUDA_EMULATOR_UCONTEXT)
#define CUDA_EMULATOR_ASM_SWITCH 1
#endif

#include <ATen/ATen.h>
#include <sys/mman.h>
#if !defined(CUDA_EMULATOR_ASM_SWITCH)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------ CUDA's vocabulary
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef struct CUstream_st* cudaStream_t;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

// Single rounding per operation: the emulator is compiled with -ffp-contract=off, as the CPU kernels are.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
// One OS thread runs every fiber, and fibers switch only at synchronisation points: a plain add is atomic.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}

namespace cuda_emulator {

enum Error : int { kSuccess = 0, kInvalidValue = 1, kInvalidConfiguration = 9, kLaunchOutOfResources = 701 };

struct Config {
  int multiprocessors = 4;  // what cudaDevAttrMultiProcessorCount reports
  int64_t schedule = 0;     // 0: index order, 1: reverse order, other: seed of random orders
};
inline Config config;
inline int last_error = kSuccess;  // sticky until cudaGetLastError reads it, as in CUDA

enum class Wait : uint8_t { kRunnable, kBarrier, kWarp, kExited };
enum class Collective : uint8_t { kBallot, kShflUp };

// Stack switching. x86-64: save the callee-saved registers on this stack, store its pointer, load the other
// (fiber.cpp; glibc's swapcontext would also make a signal-mask system call on every switch).
#if defined(CUDA_EMULATOR_ASM_SWITCH)
extern "C" void cuda_emulator_switch(void** save_sp, void* load_sp);
struct Context {
  void* sp = nullptr;
};
inline void switch_to(Context& from, Context& to) { cuda_emulator_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Thread {
  Context context;
  char* stack;  // its lowest address; kStackBytes long
  void* fake_stack;  // AddressSanitizer's, while switched away
  uint3 index;
  Wait wait;
  Collective op;
  unsigned delta;
  uint64_t value;   // what this lane brings to a warp collective
  uint64_t result;  // what it gets back
};

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = size_t(256) << 10;

struct Runtime {
  std::mutex launching;  // one launch at a time: the fibers share this state
  std::vector<std::pair<void*, size_t>> shared_arrays;  // every __shared__ array, see shared_array()
  std::vector<Thread> threads = std::vector<Thread>(kMaxThreads);
  char* stacks = nullptr;  // kMaxThreads stacks, reserved once; pages are touched only as used
  Context scheduler;
  const void* scheduler_stack = nullptr;  // the scheduler's stack, as AddressSanitizer reports it
  size_t scheduler_stack_bytes = 0;
  void* scheduler_fake_stack = nullptr;
  Thread* current = nullptr;
  const std::function<void()>* body = nullptr;
  std::exception_ptr failure;
};

inline Runtime& runtime() {
  static Runtime r;
  if (r.stacks == nullptr) {
    void* p = mmap(nullptr, kStackBytes * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("CUDA emulator: cannot reserve the fiber stacks");
    r.stacks = static_cast<char*>(p);
  }
  return r;
}

[[noreturn]] inline void fail(const char* kernel, const uint3& block, const std::string& what) {
  throw std::runtime_error("CUDA emulator: kernel " + std::string(kernel) + ", block (" + std::to_string(block.x) +
                           "," + std::to_string(block.y) + "," + std::to_string(block.z) + "): " + what);
}

// AddressSanitizer follows a switch of stacks only when told of it, before and after (build.py's
// sanitized build; these are no-ops otherwise).
// fake_stack_save: where the side switching away keeps its fake stack (nullptr when it ends for good).
inline void before_switch([[maybe_unused]] void** fake_stack_save, [[maybe_unused]] const void* to_stack,
                          [[maybe_unused]] size_t to_bytes) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(fake_stack_save, to_stack, to_bytes);
#endif
}
inline void after_switch([[maybe_unused]] void* fake_stack, [[maybe_unused]] const void** from_stack,
                         [[maybe_unused]] size_t* from_bytes) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack, from_stack, from_bytes);
#endif
}

// Scheduler side: runs fiber t until it suspends or exits.
inline void resume(Runtime& r, Thread& t) {
  r.current = &t;
  threadIdx = t.index;
  before_switch(&r.scheduler_fake_stack, t.stack, kStackBytes);
  switch_to(r.scheduler, t.context);
  after_switch(r.scheduler_fake_stack, nullptr, nullptr);
}

// Fiber side: back to the scheduler, for good if exiting.
inline void yield_to_scheduler(Runtime& r, Thread& self, bool exiting) {
  before_switch(exiting ? nullptr : &self.fake_stack, r.scheduler_stack, r.scheduler_stack_bytes);
  switch_to(self.context, r.scheduler);
  after_switch(self.fake_stack, &r.scheduler_stack, &r.scheduler_stack_bytes);
}

// A fiber's whole life: the kernel body for this thread, then back to the scheduler for good.
[[noreturn]] inline void fiber_main() {
  Runtime& r = runtime();
  after_switch(nullptr, &r.scheduler_stack, &r.scheduler_stack_bytes);
  try {
    (*r.body)();
  } catch (...) {
    r.failure = std::current_exception();
  }
  r.current->wait = Wait::kExited;
  yield_to_scheduler(r, *r.current, /*exiting=*/true);
  __builtin_unreachable();
}

inline void start_fiber(Context& c, char* stack) {
#if defined(__SANITIZE_ADDRESS__)
  // A fiber leaves its stack by a switch, never by returning: its frames' redzones are still poisoned.
  ASAN_UNPOISON_MEMORY_REGION(stack, kStackBytes);
#endif
#if defined(CUDA_EMULATOR_ASM_SWITCH)
  // The frame cuda_emulator_switch pops: MXCSR and x87 control words, r15..r12, rbx, rbp, then the return
  // address (fiber_main), above which the stack is aligned as at a function's entry.
  auto* top = reinterpret_cast<uint64_t*>(stack + kStackBytes);
  uint64_t* sp = top - 9;
  uint32_t mxcsr;
  uint16_t fpu_cw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_cw));
  sp[0] = mxcsr | (uint64_t(fpu_cw) << 32);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&fiber_main);
  sp[8] = 0;  // fiber_main never returns
  c.sp = sp;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = kStackBytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fiber_main, 0);
#endif
}

// Called by a fiber: parks it until the scheduler releases it.
inline void suspend(Wait why) {
  Runtime& r = runtime();
  Thread* self = r.current;
  self->wait = why;
  yield_to_scheduler(r, *self, /*exiting=*/false);
}

inline void order_for(std::vector<int>& order, std::mt19937_64& rng) {
  std::iota(order.begin(), order.end(), 0);
  if (config.schedule == 1) std::reverse(order.begin(), order.end());
  if (config.schedule > 1) std::shuffle(order.begin(), order.end(), rng);
}

// Runs one warp's lanes until each waits at __syncthreads or has exited, resolving its collectives as soon
// as all 32 lanes reach one, as a GPU runs warps independently: another warp may run only afterwards, so a
// read of shared memory that no barrier orders after another warp's write sees the old value.
inline void run_warp(Runtime& r, int first, int count, const char* kernel, std::mt19937_64& rng) {
  Thread* lanes = &r.threads[first];
  std::vector<int> order(count);
  for (;;) {
    order_for(order, rng);
    for (int l : order) {
      Thread& t = lanes[l];
      if (t.wait != Wait::kRunnable) continue;
      resume(r, t);
      if (r.failure) std::rethrow_exception(std::exchange(r.failure, nullptr));
    }
    int waiting = 0;
    for (int l = 0; l < count; ++l) waiting += lanes[l].wait == Wait::kWarp;
    if (waiting == 0) return;
    const std::string warp = "warp " + std::to_string(first / 32);
    if (count < 32) fail(kernel, blockIdx, warp + ": a full-mask warp collective in a partial warp");
    if (waiting < 32)
      fail(kernel, blockIdx, warp + ": a full-mask warp collective reached by " + std::to_string(waiting) +
                                 " of its 32 lanes (the others are at __syncthreads or have exited)");
    for (int l = 1; l < 32; ++l)
      if (lanes[l].op != lanes[0].op || lanes[l].delta != lanes[0].delta)
        fail(kernel, blockIdx, warp + ": its lanes wait at different warp collectives");
    if (lanes[0].op == Collective::kBallot) {
      uint64_t bits = 0;
      for (int l = 0; l < 32; ++l) bits |= uint64_t(lanes[l].value != 0) << l;
      for (int l = 0; l < 32; ++l) lanes[l].result = bits;
    } else {
      const unsigned delta = lanes[0].delta;
      for (int l = 0; l < 32; ++l) lanes[l].result = unsigned(l) >= delta ? lanes[l - delta].value : lanes[l].value;
    }
    for (int l = 0; l < 32; ++l) lanes[l].wait = Wait::kRunnable;
  }
}

inline void run_block(Runtime& r, const char* kernel, const dim3& block, std::mt19937_64& rng) {
  // Shared memory starts as garbage on a GPU: a kernel that reads it before writing it must fail here too.
  for (const auto& [p, bytes] : r.shared_arrays) std::memset(p, 0xff, bytes);
  const int n = static_cast<int>(block.x * block.y * block.z);
  for (int i = 0; i < n; ++i) {
    Thread& t = r.threads[i];
    t.index = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    t.wait = Wait::kRunnable;
    t.stack = r.stacks + size_t(i) * kStackBytes;
    start_fiber(t.context, t.stack);
  }
  std::vector<int> warps((n + 31) / 32);
  for (;;) {  // one phase between two barriers per pass
    order_for(warps, rng);
    for (int w : warps) run_warp(r, 32 * w, std::min(32, n - 32 * w), kernel, rng);
    int exited = 0;
    for (int i = 0; i < n; ++i) exited += r.threads[i].wait == Wait::kExited;
    if (exited == n) return;
    if (exited > 0)
      fail(kernel, blockIdx, "__syncthreads reached by " + std::to_string(n - exited) + " threads while " +
                                 std::to_string(exited) + " of the block have exited");
    for (int i = 0; i < n; ++i) r.threads[i].wait = Wait::kRunnable;
  }
}

inline bool valid_launch(const dim3& grid, const dim3& block, size_t shared_bytes) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  return grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535 &&
         threads >= 1 && threads <= kMaxThreads && block.x <= 1024 && block.y <= 1024 && block.z <= 64 &&
         shared_bytes <= 48 * 1024;
}

// A kernel's __launch_bounds__ (its most threads per block); 0 where it has none.
struct MaxThreads {
  uint64_t value;
};

// kernel<<<grid, block, shared_bytes, stream>>>(args) becomes launch("kernel", {bound}, [&] { kernel(args); }, ...).
template <class Body>
void launch(const char* kernel, MaxThreads bound, const Body& body, dim3 grid, dim3 block, size_t shared_bytes = 0,
            cudaStream_t /*stream: launches run to completion in order*/ = nullptr) {
  if (!valid_launch(grid, block, shared_bytes)) {
    last_error = kInvalidConfiguration;
    return;
  }
  if (bound.value != 0 && uint64_t(block.x) * block.y * block.z > bound.value) {
    last_error = kLaunchOutOfResources;
    return;
  }
  Runtime& r = runtime();
  const std::lock_guard<std::mutex> lock(r.launching);
  const std::function<void()> fn = [&body] { body(); };
  r.body = &fn;
  gridDim = grid;
  blockDim = block;
  std::mt19937_64 rng(static_cast<uint64_t>(config.schedule));
  std::vector<int> blocks(static_cast<size_t>(uint64_t(grid.x) * grid.y * grid.z));
  order_for(blocks, rng);
  for (int b : blocks) {
    blockIdx = {b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)};
    run_block(r, kernel, block, rng);
  }
  r.body = nullptr;
}

// `__shared__ T name[N];` becomes `T (&name)[N] = shared_array<T[N], __COUNTER__>();`: one static array per
// declaration (blocks run one after another, so one serves every block), poisoned when a block first
// reaches it and registered to be poisoned before every later block.
template <class Array, int kDeclaration>
Array& shared_array() {
  static Array storage;
  static const bool registered = [] {
    std::memset(&storage, 0xff, sizeof(Array));
    runtime().shared_arrays.emplace_back(&storage, sizeof(Array));
    return true;
  }();
  (void)registered;
  return storage;
}

// at::empty for the kernels' host code: filled with 0xff bytes, as device memory is never zeroed.
inline at::Tensor uninitialised(at::IntArrayRef size, const at::TensorOptions& options) {
  at::Tensor t = at::empty(size, options);
  if (t.numel() > 0) std::memset(t.data_ptr(), 0xff, t.nbytes());
  return t;
}

}  // namespace cuda_emulator

inline void __syncthreads() { cuda_emulator::suspend(cuda_emulator::Wait::kBarrier); }

inline void require_full_mask(unsigned mask) {
  if (mask != 0xffffffffu) throw std::runtime_error("CUDA emulator: only full-mask warp collectives are emulated");
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  require_full_mask(mask);
  cuda_emulator::Thread* self = cuda_emulator::runtime().current;
  self->op = cuda_emulator::Collective::kBallot;
  self->delta = 0;
  self->value = predicate != 0;
  cuda_emulator::suspend(cuda_emulator::Wait::kWarp);
  return static_cast<unsigned>(self->result);
}

template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move at most 8 bytes");
  require_full_mask(mask);
  cuda_emulator::Thread* self = cuda_emulator::runtime().current;
  self->op = cuda_emulator::Collective::kShflUp;
  self->delta = delta;
  self->value = 0;
  std::memcpy(&self->value, &var, sizeof(T));
  cuda_emulator::suspend(cuda_emulator::Wait::kWarp);
  T out;
  std::memcpy(&out, &self->result, sizeof(T));
  return out;
}
