// The interface between emulated kernel code and the emulator's scheduler (harness.cpp).
//
// Included by the shim `metal_stdlib` into kernel translation units, which see no C++
// standard library: this header includes nothing and uses only built-in types.
// Every name here starts with `__nnb` (reserved for the implementation), so kernel code
// cannot collide with it.
#pragma once

namespace __nnb {

struct dim3 {
  unsigned x, y, z;
};

// The values of every thread attribute the emulator supports, for one thread.
struct ThreadCtx {
  dim3 thread_position_in_grid;
  dim3 thread_position_in_threadgroup;
  dim3 threadgroup_position_in_grid;
  dim3 threads_per_threadgroup;           // actual size of this (possibly partial) threadgroup
  dim3 dispatch_threads_per_threadgroup;  // threadgroup size given at dispatch
  dim3 threads_per_grid;
  dim3 threadgroups_per_grid;
  unsigned thread_index_in_threadgroup;
  unsigned thread_index_in_simdgroup;
  unsigned simdgroup_index_in_threadgroup;
  unsigned simdgroups_per_threadgroup;
  unsigned threads_per_simdgroup;
  unsigned thread_execution_width;
  unsigned thread_index_in_quadgroup;
  unsigned quadgroup_index_in_threadgroup;
  unsigned quadgroups_per_threadgroup;
};

// One GPU thread of a kernel: the glue binds buffers and attributes and calls the kernel.
typedef void (*ThreadFn)(const ThreadCtx& ctx, void* const* buffers);

struct KernelEntry {
  const char* name;     // the kernel function's name
  ThreadFn fn;
  const char* file;     // the source file it was compiled from (for messages)
  int cooperative;      // 1: uses barriers, SIMD functions or threadgroup memory (run as fibers)
};

// Implemented by the scheduler. `line`/`col` identify the call site in the kernel source.
void tg_barrier(unsigned line, unsigned col);
float simd_reduce(float v, int op, unsigned line, unsigned col);  // op: SIMD_SUM or SIMD_MAX
[[noreturn]] void kernel_error(const char* what);

enum { SIMD_SUM = 0, SIMD_MAX = 1 };

}  // namespace __nnb
