// nnbridge Metal emulator: dispatches compiled kernel code with Metal's compute semantics.
//
//   emu JOB IN OUT     run the job file JOB with initial buffer data from IN, write OUT
//   emu --list         print the kernels linked into this executable
//
// Semantics emulated (dispatchThreads): the grid counts threads; threadgroups tile it and
// the last one in each dimension may be partial; every thread attribute of nnb_emu.hpp has
// its Metal value. The threads of one threadgroup run as fibers on one OS thread:
// threadgroup_barrier suspends a fiber until every thread of the group waits at the same
// barrier; simd_sum/simd_max combine the live lanes of a 32-lane SIMD group.
// Threadgroups run one after another, and threadgroup memory is poisoned (all bits set:
// NaN for floats) before each. Errors are reported, never hung on:
//   exit 3  a barrier not reached by every thread, threads at different barriers, SIMD
//           functions called divergently, a barrier in a kernel classified as barrier-free
//   exit 4  invalid memory access (past the end of a buffer: guard pages; stack overflow)
//   exit 5  results differ between thread execution orders (a data race, missing barrier)
//   exit 6  an output element never written (outputs are filled with a NaN pattern first)
//   exit 2  bad job file or arguments
// The job runs once per requested order ("asc": threads resumed in increasing index,
// "desc": decreasing) from the same initial buffers, and the results must be identical.
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700  // macOS exposes the ucontext routines only with it (macOS is untested)
#endif
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "nnb_emu.hpp"

// Context switch between fibers: a few instructions on x86-64 (callee-saved registers,
// MXCSR and the x87 control word); elsewhere ucontext's swapcontext (one syscall per switch).
#if defined(__x86_64__) && defined(__ELF__)
#define NNB_FAST_SWITCH 1
extern "C" void nnb_switch(void** save_sp, void* to_sp);
extern "C" void nnb_trampoline();
extern "C" [[noreturn]] void nnb_fiber_main(long idx);
asm(R"(
    .text
    .globl nnb_switch
    .type nnb_switch, @function
nnb_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size nnb_switch, .-nnb_switch
    .globl nnb_trampoline
    .type nnb_trampoline, @function
nnb_trampoline:
    movq %r12, %rdi
    call nnb_fiber_main@PLT
    ud2
    .size nnb_trampoline, .-nnb_trampoline
)");
#else
#define NNB_FAST_SWITCH 0
#endif

extern "C" const __nnb::KernelEntry* const __nnb_entry_tables[];
// Threadgroup memory: every `threadgroup` variable lives in one section, bounded by these.
#if defined(__APPLE__)
extern "C" char __start_nnb_tg[] __asm("section$start$__DATA$__nnb_tg");
extern "C" char __stop_nnb_tg[] __asm("section$end$__DATA$__nnb_tg");
static __attribute__((section("__DATA,__nnb_tg"), used)) char nnb_tg_anchor[16];
#else
extern "C" char __start_nnb_tg[];
extern "C" char __stop_nnb_tg[];
// Keeps the section present even when no kernel declares threadgroup memory.
static __attribute__((section("nnb_tg"), used)) char nnb_tg_anchor[16];
#endif

namespace {

constexpr unsigned kSimdWidth = 32;
constexpr size_t kStackBytes = 256 * 1024;

[[noreturn]] void fail(int code, const std::string& msg) {
  std::fprintf(stderr, "error: %s\n", msg.c_str());
  std::fflush(stderr);
  _exit(code);
}

std::string dim_str(__nnb::dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// ------------------------------------------------------------------ buffers
size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

struct Buffer {
  std::string name;
  size_t bytes = 0;
  size_t elem = 4;          // element size in bytes (4: float/int, 2: half)
  long long init = -1;      // offset of the initial data in IN, or -1: filled with the NaN pattern
  bool check = false;       // after the job, every element must have been written
  char* data = nullptr;     // ends exactly at a PROT_NONE guard page
};

void allocate(Buffer& b) {
  const size_t page = page_size();
  const size_t body = (b.bytes + page - 1) / page * page;
  const size_t total = (body == 0 ? page : body) + page;
  void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) fail(2, "cannot allocate buffer " + b.name);
  char* base = static_cast<char*>(p);
  char* guard = base + (body == 0 ? page : body);
  if (mprotect(guard, page, PROT_NONE) != 0) fail(2, "cannot protect guard page of buffer " + b.name);
  b.data = guard - b.bytes;
}

void fill_pattern(Buffer& b) {
  if (b.elem == 2) {
    const uint16_t pat = 0x7DA5;  // a half NaN no arithmetic produces
    for (size_t i = 0; i + 2 <= b.bytes; i += 2) std::memcpy(b.data + i, &pat, 2);
  } else {
    const uint32_t pat = 0x7FA5A5A5u;  // a float NaN no arithmetic produces
    for (size_t i = 0; i + 4 <= b.bytes; i += 4) std::memcpy(b.data + i, &pat, 4);
  }
}

long long first_unwritten(const Buffer& b) {
  if (b.elem == 2) {
    for (size_t i = 0; i + 2 <= b.bytes; i += 2) {
      uint16_t v;
      std::memcpy(&v, b.data + i, 2);
      if (v == 0x7DA5) return static_cast<long long>(i / 2);
    }
  } else {
    for (size_t i = 0; i + 4 <= b.bytes; i += 4) {
      uint32_t v;
      std::memcpy(&v, b.data + i, 4);
      if (v == 0x7FA5A5A5u) return static_cast<long long>(i / 4);
    }
  }
  return -1;
}

// ------------------------------------------------------------------ scheduler state
enum State { READY, WAIT_TG, WAIT_SIMD, DONE };

struct Fiber {
#if NNB_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  State st = READY;
  unsigned line = 0, col = 0;
  int op = 0;
  float val = 0.0f, res = 0.0f;
  __nnb::ThreadCtx tc{};
};

std::vector<Fiber> g_fibers;
char* g_stacks = nullptr;
size_t g_stack_count = 0;
#if NNB_FAST_SWITCH
void* g_sched_sp = nullptr;
#else
ucontext_t g_sched;
#endif
Fiber* g_cur = nullptr;
const __nnb::KernelEntry* g_kernel = nullptr;
void* g_bindings[32];
__nnb::dim3 g_group{0, 0, 0};
bool g_in_thread = false;
unsigned g_thread_index = 0;

std::string where() {
  std::string s = "kernel " + std::string(g_kernel ? g_kernel->name : "?");
  s += " (" + std::string(g_kernel ? g_kernel->file : "?") + "), threadgroup " + dim_str(g_group);
  return s;
}

// Leave the running fiber for the scheduler (it resumes here when made READY).
void yield_to_scheduler(Fiber* self) {
#if NNB_FAST_SWITCH
  nnb_switch(&self->sp, g_sched_sp);
#else
  swapcontext(&self->ctx, &g_sched);
#endif
}

void resume(Fiber* f) {
#if NNB_FAST_SWITCH
  nnb_switch(&g_sched_sp, f->sp);
#else
  swapcontext(&g_sched, &f->ctx);
#endif
}

#if !NNB_FAST_SWITCH
void fiber_entry(int idx) {
  Fiber& f = g_fibers[static_cast<size_t>(idx)];
  g_kernel->fn(f.tc, g_bindings);
  f.st = DONE;
}
#endif

void init_fiber(unsigned i, char* stack_lo, size_t size) {
  Fiber& f = g_fibers[i];
#if NNB_FAST_SWITCH
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack_lo) + size) & ~static_cast<uintptr_t>(15);
  auto* frame = reinterpret_cast<uint64_t*>(top - 64);
  unsigned mxcsr = 0;
  unsigned short fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(&frame[0], &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(&frame[0]) + 4, &fpucw, 2);
  frame[1] = 0;                                               // r15
  frame[2] = 0;                                               // r14
  frame[3] = 0;                                               // r13
  frame[4] = i;                                               // r12: fiber index for the trampoline
  frame[5] = 0;                                               // rbx
  frame[6] = 0;                                               // rbp
  frame[7] = reinterpret_cast<uint64_t>(&nnb_trampoline);     // return address
  f.sp = frame;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack_lo;
  f.ctx.uc_stack.ss_size = size;
  f.ctx.uc_link = &g_sched;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(fiber_entry), 1, static_cast<int>(i));
#endif
}

void ensure_stacks(size_t n) {
  if (n <= g_stack_count) return;
  const size_t page = page_size();
  const size_t each = kStackBytes + page;
  void* p = mmap(nullptr, each * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) fail(2, "cannot allocate fiber stacks");
  g_stacks = static_cast<char*>(p);
  for (size_t i = 0; i < n; ++i) mprotect(g_stacks + i * each, page, PROT_NONE);  // overflow guard
  g_stack_count = n;
  g_fibers.resize(n);
}

__nnb::ThreadCtx make_ctx(__nnb::dim3 grid, __nnb::dim3 tg, __nnb::dim3 gpos, __nnb::dim3 act, unsigned lin) {
  __nnb::ThreadCtx c{};
  const unsigned lx = lin % act.x, ly = (lin / act.x) % act.y, lz = lin / (act.x * act.y);
  c.thread_position_in_threadgroup = {lx, ly, lz};
  c.threadgroup_position_in_grid = gpos;
  c.thread_position_in_grid = {gpos.x * tg.x + lx, gpos.y * tg.y + ly, gpos.z * tg.z + lz};
  c.threads_per_threadgroup = act;
  c.dispatch_threads_per_threadgroup = tg;
  c.threads_per_grid = grid;
  c.threadgroups_per_grid = {(grid.x + tg.x - 1) / tg.x, (grid.y + tg.y - 1) / tg.y, (grid.z + tg.z - 1) / tg.z};
  const unsigned n = act.x * act.y * act.z;
  c.thread_index_in_threadgroup = lin;
  c.thread_index_in_simdgroup = lin % kSimdWidth;
  c.simdgroup_index_in_threadgroup = lin / kSimdWidth;
  c.simdgroups_per_threadgroup = (n + kSimdWidth - 1) / kSimdWidth;
  c.threads_per_simdgroup = kSimdWidth;
  c.thread_execution_width = kSimdWidth;
  c.thread_index_in_quadgroup = lin % 4;
  c.quadgroup_index_in_threadgroup = lin / 4;
  c.quadgroups_per_threadgroup = (n + 3) / 4;
  return c;
}

void poison_threadgroup_memory() {
  std::memset(__start_nnb_tg, 0xFF, static_cast<size_t>(__stop_nnb_tg - __start_nnb_tg));
}

float combine(int op, float a, float b) {
  if (op == __nnb::SIMD_SUM) return a + b;
  return std::fmax(a, b);
}

const char* op_name(int op) {
  return op == __nnb::SIMD_SUM ? "simd_sum" : "simd_max";
}

// Resolve SIMD groups whose live lanes all wait in the same SIMD function (lanes that have
// returned are inactive, as on a GPU); true if any was resolved.
bool resolve_simd(unsigned n) {
  bool released = false;
  for (unsigned first = 0; first < n; first += kSimdWidth) {
    const unsigned last = std::min(n, first + kSimdWidth);
    unsigned live = 0, in_simd = 0, in_tg = 0;
    for (unsigned i = first; i < last; ++i) {
      const State s = g_fibers[i].st;
      if (s == DONE) continue;
      ++live;
      in_simd += s == WAIT_SIMD;
      in_tg += s == WAIT_TG;
    }
    if (live == 0 || in_simd == 0) continue;
    const Fiber* ref = nullptr;
    for (unsigned i = first; i < last; ++i) {
      const Fiber& f = g_fibers[i];
      if (f.st == DONE) continue;
      if (ref == nullptr) ref = &f;
      if (f.st != ref->st || f.line != ref->line || f.col != ref->col || f.op != ref->op) {
        fail(3, "divergent SIMD group " + std::to_string(first / kSimdWidth) + " in " + where() +
                    ": lanes wait at different calls (line " + std::to_string(ref->line) + " and line " +
                    std::to_string(f.line) + "); every live lane must reach the same SIMD function");
      }
    }
    if (in_tg != 0) continue;  // unreachable: caught above
    // Combine in lane order (a GPU uses a tree: the order of float additions differs).
    float acc = 0.0f;
    bool have = false;
    for (unsigned i = first; i < last; ++i) {
      if (g_fibers[i].st == DONE) continue;
      acc = have ? combine(ref->op, acc, g_fibers[i].val) : g_fibers[i].val;
      have = true;
    }
    for (unsigned i = first; i < last; ++i) {
      if (g_fibers[i].st == DONE) continue;
      g_fibers[i].res = acc;
      g_fibers[i].st = READY;
    }
    released = true;
  }
  return released;
}

void run_group(__nnb::dim3 grid, __nnb::dim3 tg, __nnb::dim3 gpos, bool desc) {
  const __nnb::dim3 act{std::min(tg.x, grid.x - gpos.x * tg.x), std::min(tg.y, grid.y - gpos.y * tg.y),
                        std::min(tg.z, grid.z - gpos.z * tg.z)};
  const unsigned n = act.x * act.y * act.z;
  g_group = gpos;
  poison_threadgroup_memory();
  if (!g_kernel->cooperative) {
    for (unsigned k = 0; k < n; ++k) {
      const unsigned i = desc ? n - 1 - k : k;
      const __nnb::ThreadCtx c = make_ctx(grid, tg, gpos, act, i);
      g_thread_index = i;
      g_in_thread = true;
      g_kernel->fn(c, g_bindings);
      g_in_thread = false;
    }
    return;
  }
  ensure_stacks(n);
  const size_t each = kStackBytes + page_size();
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = g_fibers[i];
    f.st = READY;
    f.tc = make_ctx(grid, tg, gpos, act, i);
    init_fiber(i, g_stacks + i * each + page_size(), kStackBytes);
  }
  for (;;) {
    for (unsigned k = 0; k < n; ++k) {
      const unsigned i = desc ? n - 1 - k : k;
      Fiber& f = g_fibers[i];
      if (f.st != READY) continue;
      g_cur = &f;
      g_thread_index = i;
      g_in_thread = true;
      resume(&f);
      g_in_thread = false;
      g_cur = nullptr;
    }
    unsigned done = 0;
    for (unsigned i = 0; i < n; ++i) done += g_fibers[i].st == DONE;
    if (done == n) return;
    if (resolve_simd(n)) continue;
    // Every live thread now waits at a threadgroup barrier.
    const Fiber* ref = nullptr;
    for (unsigned i = 0; i < n; ++i) {
      const Fiber& f = g_fibers[i];
      if (f.st == DONE) continue;
      if (ref == nullptr) ref = &f;
      if (f.line != ref->line || f.col != ref->col) {
        fail(3, "threads of " + where() + " wait at different threadgroup_barrier calls (line " +
                    std::to_string(ref->line) + " and line " + std::to_string(f.line) +
                    "); every thread must reach the same barrier");
      }
    }
    if (done > 0) {
      fail(3, "threadgroup_barrier at line " + std::to_string(ref->line) + " not reached by every thread of " +
                  where() + ": " + std::to_string(done) + " of " + std::to_string(n) +
                  " threads returned without reaching it (on a GPU this hangs or is undefined)");
    }
    for (unsigned i = 0; i < n; ++i) g_fibers[i].st = READY;
  }
}

// ------------------------------------------------------------------ faults
void on_fault(int sig) {
  char msg[512];
  const char* what = sig == SIGFPE ? "arithmetic fault (integer division by zero?)"
                                   : "invalid memory access (past the end of a buffer, or thread stack overflow)";
  const int len = std::snprintf(msg, sizeof msg, "error: %s in kernel %s, threadgroup (%u, %u, %u), thread index %u\n",
                                what, g_kernel ? g_kernel->name : "?", g_group.x, g_group.y, g_group.z,
                                g_thread_index);
  if (len > 0) {
    ssize_t w = write(2, msg, static_cast<size_t>(std::min(len, static_cast<int>(sizeof msg) - 1)));
    (void)w;
  }
  _exit(4);
}

void install_fault_handlers() {
  static char altstack[64 * 1024];
  stack_t ss{};
  ss.ss_sp = altstack;
  ss.ss_size = sizeof altstack;
  sigaltstack(&ss, nullptr);
  struct sigaction sa{};
  sa.sa_handler = on_fault;
  sa.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
  sigaction(SIGFPE, &sa, nullptr);
}

// ------------------------------------------------------------------ job
struct Dispatch {
  const __nnb::KernelEntry* kernel;
  __nnb::dim3 grid, tg;
  std::vector<std::pair<unsigned, size_t>> bindings;  // buffer index -> buffer slot
};

const __nnb::KernelEntry* find_kernel(const std::string& name) {
  for (size_t t = 0; __nnb_entry_tables[t] != nullptr; ++t)
    for (const __nnb::KernelEntry* e = __nnb_entry_tables[t]; e->name != nullptr; ++e)
      if (name == e->name) return e;
  return nullptr;
}

}  // namespace

// ------------------------------------------------------------------ hooks called by kernel code
namespace __nnb {

void tg_barrier(unsigned line, unsigned col) {
  if (g_cur == nullptr) {
    fail(3, "threadgroup_barrier (line " + std::to_string(line) + ") called in " + where() +
                ", which was classified as barrier-free; the emulator cannot run it");
  }
  Fiber* self = g_cur;
  self->st = WAIT_TG;
  self->line = line;
  self->col = col;
  yield_to_scheduler(self);
}

float simd_reduce(float v, int op, unsigned line, unsigned col) {
  if (g_cur == nullptr) {
    fail(3, std::string(op_name(op)) + " (line " + std::to_string(line) + ") called in " + where() +
                ", which was classified as barrier-free; the emulator cannot run it");
  }
  Fiber* self = g_cur;
  self->st = WAIT_SIMD;
  self->line = line;
  self->col = col;
  self->op = op;
  self->val = v;
  yield_to_scheduler(self);
  return self->res;
}

void kernel_error(const char* what) { fail(3, std::string(what) + " in " + where()); }

}  // namespace __nnb

#if NNB_FAST_SWITCH
// First code a new fiber runs (entered from nnb_trampoline); it never returns.
extern "C" void nnb_fiber_main(long idx) {
  Fiber& f = g_fibers[static_cast<size_t>(idx)];
  g_kernel->fn(f.tc, g_bindings);
  f.st = DONE;
  nnb_switch(&f.sp, g_sched_sp);
  __builtin_unreachable();
}
#endif

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--list") {
    for (size_t t = 0; __nnb_entry_tables[t] != nullptr; ++t)
      for (const __nnb::KernelEntry* e = __nnb_entry_tables[t]; e->name != nullptr; ++e)
        std::printf("%s %d %s\n", e->name, e->cooperative, e->file);
    return 0;
  }
  if (argc != 4) fail(2, "usage: emu JOB IN OUT | emu --list");
  install_fault_handlers();

  std::ifstream job(argv[1]);
  if (!job) fail(2, std::string("cannot read job file ") + argv[1]);
  std::ifstream in(argv[2], std::ios::binary);
  std::vector<char> init((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());

  std::vector<Buffer> buffers;
  std::map<std::string, size_t> slot;
  std::vector<Dispatch> dispatches;
  std::vector<size_t> outputs;
  std::vector<bool> orders;  // false: ascending, true: descending
  std::string line;
  std::getline(job, line);
  if (line != "NNBEMU 1") fail(2, "job file: expected header 'NNBEMU 1'");
  while (std::getline(job, line)) {
    std::istringstream ss(line);
    std::string word;
    if (!(ss >> word)) continue;
    if (word == "buffer") {
      Buffer b;
      int check = 0;
      if (!(ss >> b.name >> b.bytes >> b.elem >> b.init >> check)) fail(2, "job file: bad buffer line: " + line);
      b.check = check != 0;
      if (b.init >= 0 && static_cast<size_t>(b.init) + b.bytes > init.size())
        fail(2, "job file: initial data of buffer " + b.name + " lies past the end of the input file");
      slot[b.name] = buffers.size();
      buffers.push_back(b);
    } else if (word == "dispatch") {
      Dispatch d{};
      std::string kname;
      unsigned nb = 0;
      if (!(ss >> kname >> d.grid.x >> d.grid.y >> d.grid.z >> d.tg.x >> d.tg.y >> d.tg.z >> nb))
        fail(2, "job file: bad dispatch line: " + line);
      d.kernel = find_kernel(kname);
      if (d.kernel == nullptr) fail(2, "no kernel named " + kname + " in the compiled source");
      if (d.tg.x * d.tg.y * d.tg.z == 0 || d.tg.x * d.tg.y * d.tg.z > 1024)
        fail(2, "threadgroup " + dim_str(d.tg) + " of " + kname + " must have 1 to 1024 threads");
      for (unsigned i = 0; i < nb; ++i) {
        unsigned idx = 0;
        std::string bname;
        if (!(ss >> idx >> bname) || idx >= 32) fail(2, "job file: bad binding in: " + line);
        if (!slot.count(bname)) fail(2, "job file: unknown buffer " + bname);
        d.bindings.emplace_back(idx, slot[bname]);
      }
      dispatches.push_back(d);
    } else if (word == "output") {
      std::string bname;
      while (ss >> bname) {
        if (!slot.count(bname)) fail(2, "job file: unknown output buffer " + bname);
        outputs.push_back(slot[bname]);
      }
    } else if (word == "orders") {
      std::string o;
      while (ss >> o) {
        if (o != "asc" && o != "desc") fail(2, "job file: unknown order " + o);
        orders.push_back(o == "desc");
      }
    } else {
      fail(2, "job file: unknown line: " + line);
    }
  }
  if (orders.empty()) orders.push_back(false);
  for (Buffer& b : buffers) allocate(b);

  std::vector<std::vector<char>> first_result;
  for (size_t r = 0; r < orders.size(); ++r) {
    for (Buffer& b : buffers) {
      if (b.init >= 0)
        std::memcpy(b.data, init.data() + b.init, b.bytes);
      else
        fill_pattern(b);
    }
    for (const Dispatch& d : dispatches) {
      g_kernel = d.kernel;
      for (void*& p : g_bindings) p = nullptr;
      for (const auto& [idx, s] : d.bindings) g_bindings[idx] = buffers[s].data;
      if (d.grid.x == 0 || d.grid.y == 0 || d.grid.z == 0) continue;
      const __nnb::dim3 groups{(d.grid.x + d.tg.x - 1) / d.tg.x, (d.grid.y + d.tg.y - 1) / d.tg.y,
                               (d.grid.z + d.tg.z - 1) / d.tg.z};
      for (unsigned gz = 0; gz < groups.z; ++gz)
        for (unsigned gy = 0; gy < groups.y; ++gy)
          for (unsigned gx = 0; gx < groups.x; ++gx) run_group(d.grid, d.tg, {gx, gy, gz}, orders[r]);
    }
    g_kernel = nullptr;
    for (const Buffer& b : buffers) {
      if (!b.check) continue;
      const long long k = first_unwritten(b);
      if (k >= 0)
        fail(6, "element " + std::to_string(k) + " of buffer " + b.name +
                    " was never written (it still holds the fill pattern set before the dispatch)");
    }
    if (r == 0) {
      for (const Buffer& b : buffers) first_result.emplace_back(b.data, b.data + b.bytes);
      continue;
    }
    for (size_t s = 0; s < buffers.size(); ++s) {
      const Buffer& b = buffers[s];
      if (std::memcmp(first_result[s].data(), b.data, b.bytes) == 0) continue;
      size_t k = 0;
      while (k < b.bytes && first_result[s][k] == b.data[k]) ++k;
      fail(5, "buffer " + b.name + " differs at element " + std::to_string(k / b.elem) +
                  " between thread execution orders (" + (orders[0] ? "desc" : "asc") + " and " +
                  (orders[r] ? "desc" : "asc") +
                  "): the result depends on scheduling - a data race or a missing threadgroup_barrier");
    }
  }

  std::ofstream out(argv[3], std::ios::binary);
  for (size_t s : outputs) out.write(first_result[s].data(), static_cast<std::streamsize>(buffers[s].bytes));
  if (!out) fail(2, std::string("cannot write ") + argv[3]);
  return 0;
}
