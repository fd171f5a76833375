// Emulates the subset of Metal that the ddtree kernels use, so an `mx.fast.metal_kernel` body can be compiled
// by g++ and run on the CPU (see harness.py, which writes the kernel signature around the body like MLX does).
//
// Execution model: a threadgroup runs on one OS thread; each of its GPU threads is a fiber (started with
// makecontext, then switched with _setjmp/_longjmp, which skip ucontext's signal-mask syscall). Fibers run
// round-robin until they reach a collective (simd_sum, simd_shuffle_xor, ..., threadgroup_barrier) or exit, so
// the lanes of a simdgroup really meet at every simd_* call and exchange values, as on the GPU. Threadgroups are
// spread over a few worker threads. A kernel that calls no collective (HARNESS_SYNC=0) runs as plain calls.
// Build with -U_FORTIFY_SOURCE: fortified longjmp refuses to jump between stacks.
//
// Limits (also what keeps a body portable): simd_* calls must be in simdgroup-uniform control flow (a lane that
// has returned counts as inactive, as on the GPU); Metal vector types are only uint3 with .x/.y/.z; `bfloat16_t`
// arithmetic happens in float (cast explicitly in kernels; on Metal bfloat*bfloat stays bfloat).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>
#if HARNESS_SYNC
#include <csetjmp>
#include <ucontext.h>
#endif

typedef unsigned int uint;
struct uint3 {
  uint x, y, z;
};

// bfloat16 storage; conversions round to nearest even (what MLX and Metal do).
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
  bfloat16_t(T value) {
    float f = static_cast<float>(value);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40);
    } else {
      bits = static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
    }
  }
  operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  operator float() const volatile {  // read through a `constant` pointer (see the address spaces below)
    return static_cast<float>(bfloat16_t(*this));
  }
  bfloat16_t(const volatile bfloat16_t& other) : bits(other.bits) {}
  bfloat16_t(const bfloat16_t& other) = default;
  bfloat16_t& operator=(const bfloat16_t& other) = default;
};

typedef _Float16 half;  // IEEE binary16, as Metal's half (GCC on x86-64 and arm64)

namespace metal {
using std::abs, std::exp, std::exp2, std::fabs, std::fma, std::log, std::sqrt, std::tanh;
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
template <typename T> T max(T a, T b) { return a < b ? b : a; }
template <typename T> T min(T a, T b) { return b < a ? b : a; }
namespace fast { using std::exp, std::log, std::sqrt, metal::rsqrt; }
namespace precise { using std::exp, std::log, std::sqrt, metal::rsqrt; }
}  // namespace metal
using namespace metal;

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

namespace harness {

constexpr int kSimdWidth = 32;

// Every builtin attribute MLX can declare (harness.py passes the ones a body mentions, in MLX's order).
struct ThreadIds {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, threadgroups_per_grid, threads_per_grid;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup, threads_per_simdgroup, thread_execution_width;
};

using ThreadFn = void (*)(void** buffers, const ThreadIds& ids);

#if HARNESS_SYNC
// One rendezvous point (a simdgroup or the whole threadgroup). Values are double-buffered by generation parity:
// a lane reads round g's values after the round completes, and no lane can write round g+2's values before
// every live lane has arrived at round g+1, i.e. has finished reading round g.
struct Rendezvous {
  int alive = 0, arrived = 0;
  long generation = 0;
  uint64_t values[2][kSimdWidth];
  bool present[2][kSimdWidth];
  bool reduced[2];  // simd_sum's result for the round, computed once by its first reader
  uint64_t reduction[2];
};

struct Fiber {
  ucontext_t start;  // used once, to enter fiber_main on the fiber's own stack
  jmp_buf resume;
  ThreadIds ids;
  bool started = false, done = false;
};

struct Threadgroup {
  ucontext_t scheduler_start;
  jmp_buf scheduler;
  std::vector<Fiber> fibers;
  std::vector<Rendezvous> simdgroups;
  Rendezvous all;  // threadgroup_barrier
  std::vector<std::vector<char>> stacks;
  long events = 0;  // arrivals, completions and exits: no events in a full sweep means a deadlock
  int current = 0;
  ThreadFn fn = nullptr;
  void** buffers = nullptr;
};

inline thread_local Threadgroup* tg_now = nullptr;

inline void yield_to_scheduler() {
  Threadgroup& tg = *tg_now;
  if (!_setjmp(tg.fibers[tg.current].resume)) _longjmp(tg.scheduler, 1);
}

inline void complete_if_ready(Rendezvous& r) {
  if (r.arrived > 0 && r.arrived == r.alive) {
    r.arrived = 0;
    ++r.generation;
    std::fill(std::begin(r.present[r.generation & 1]), std::end(r.present[r.generation & 1]), false);
    r.reduced[r.generation & 1] = false;
    ++tg_now->events;
  }
}

// Deposit `value` at `r` for `slot`, wait until every live member has arrived, return the round's parity.
template <typename T>
int rendezvous(Rendezvous& r, int slot, T value) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "simd value too large");
  const long generation = r.generation;
  const int parity = generation & 1;
  std::memcpy(&r.values[parity][slot], &value, sizeof(T));
  r.present[parity][slot] = true;
  ++r.arrived;
  ++tg_now->events;
  complete_if_ready(r);
  while (r.generation == generation) yield_to_scheduler();
  return parity;
}

template <typename T>
T slot_value(const Rendezvous& r, int parity, int slot) {
  T value;
  std::memcpy(&value, &r.values[parity][slot], sizeof(T));
  return value;
}

inline Rendezvous& my_simdgroup(int* lane) {
  Threadgroup& tg = *tg_now;
  const ThreadIds& ids = tg.fibers[tg.current].ids;
  *lane = ids.thread_index_in_simdgroup;
  return tg.simdgroups[ids.simdgroup_index_in_threadgroup];
}

inline void fiber_main() {
  Threadgroup& tg = *tg_now;
  Fiber& me = tg.fibers[tg.current];
  tg.fn(tg.buffers, me.ids);
  // Re-read: the body may have yielded, but tg_now and tg.current point at this fiber again when it returns.
  Threadgroup& now = *tg_now;
  Fiber& self = now.fibers[now.current];
  self.done = true;
  ++now.events;
  --now.simdgroups[self.ids.simdgroup_index_in_threadgroup].alive;
  --now.all.alive;
  complete_if_ready(now.simdgroups[self.ids.simdgroup_index_in_threadgroup]);
  complete_if_ready(now.all);
  _longjmp(now.scheduler, 1);  // never return: uc_link would resume a stale scheduler context
}
#endif  // HARNESS_SYNC

// Runs threadgroups one at a time on the calling OS thread.
struct Worker {
#if HARNESS_SYNC
  Threadgroup tg;

  // Runs fiber f until it yields or exits. A function of its own, so that the scheduler loop's variables are not
  // live across _setjmp.
  __attribute__((noinline)) void resume(Fiber& f) {
    if (!_setjmp(tg.scheduler)) {
      if (f.started) _longjmp(f.resume, 1);
      f.started = true;
      swapcontext(&tg.scheduler_start, &f.start);
    }
  }
#endif

  // One threadgroup: tg_pos is its position, tg_size the nominal size; the edge ones are partial.
  void run(ThreadFn fn, void** buffers, uint3 grid, uint3 tg_size, uint3 tg_pos, uint3 tg_count) {
    const uint3 origin{tg_pos.x * tg_size.x, tg_pos.y * tg_size.y, tg_pos.z * tg_size.z};
    const uint3 size{std::min(tg_size.x, grid.x - origin.x), std::min(tg_size.y, grid.y - origin.y),
                     std::min(tg_size.z, grid.z - origin.z)};
    const uint n = size.x * size.y * size.z;
    const uint n_simd = (n + kSimdWidth - 1) / kSimdWidth;
    auto ids_of = [&](uint i) {
      ThreadIds ids{};
      const uint3 local{i % size.x, (i / size.x) % size.y, i / (size.x * size.y)};
      ids.thread_position_in_threadgroup = local;
      ids.thread_position_in_grid = {origin.x + local.x, origin.y + local.y, origin.z + local.z};
      ids.threadgroup_position_in_grid = tg_pos;
      ids.threads_per_threadgroup = size;
      ids.threadgroups_per_grid = tg_count;
      ids.threads_per_grid = grid;
      ids.thread_index_in_threadgroup = i;
      ids.thread_index_in_simdgroup = i % kSimdWidth;
      ids.simdgroup_index_in_threadgroup = i / kSimdWidth;
      ids.simdgroups_per_threadgroup = n_simd;
      ids.threads_per_simdgroup = kSimdWidth;
      ids.thread_execution_width = kSimdWidth;
      return ids;
    };
#if !HARNESS_SYNC
    for (uint i = 0; i < n; ++i) fn(buffers, ids_of(i));
#else
    constexpr size_t kStack = 64 * 1024;
    tg.fn = fn;
    tg.buffers = buffers;
    tg.fibers.assign(n, Fiber{});
    tg.simdgroups.assign(n_simd, Rendezvous{});
    tg.all = Rendezvous{};
    tg.all.alive = n;
    tg.events = 0;
    while (tg.stacks.size() < n) tg.stacks.emplace_back(kStack);
    for (uint i = 0; i < n; ++i) {
      Fiber& f = tg.fibers[i];
      f.ids = ids_of(i);
      ++tg.simdgroups[f.ids.simdgroup_index_in_threadgroup].alive;
      getcontext(&f.start);
      f.start.uc_stack.ss_sp = tg.stacks[i].data();
      f.start.uc_stack.ss_size = kStack;
      f.start.uc_link = nullptr;
      makecontext(&f.start, fiber_main, 0);
    }
    tg_now = &tg;
    for (uint live = n; live > 0;) {
      const long events_before = tg.events;
      live = 0;
      for (uint i = 0; i < n; ++i) {
        if (tg.fibers[i].done) continue;
        tg.current = i;
        resume(tg.fibers[i]);
        live += !tg.fibers[i].done;
      }
      if (live > 0 && tg.events == events_before) {
        std::fprintf(stderr, "harness: deadlock in threadgroup (%u,%u,%u): a simd_*/barrier call is not reached by "
                     "every live thread (divergent control flow)\n", tg_pos.x, tg_pos.y, tg_pos.z);
        std::exit(3);
      }
    }
    tg_now = nullptr;
#endif
  }
};

// Runs the whole grid (dispatchThreads semantics: edge threadgroups are partial) on a few OS threads.
inline void dispatch_threads(ThreadFn fn, void** buffers, uint3 grid, uint3 tg_size) {
  tg_size = {std::min(tg_size.x, grid.x), std::min(tg_size.y, grid.y), std::min(tg_size.z, grid.z)};
  const uint3 count{(grid.x + tg_size.x - 1) / tg_size.x, (grid.y + tg_size.y - 1) / tg_size.y,
                    (grid.z + tg_size.z - 1) / tg_size.z};
  const long total = long(count.x) * count.y * count.z;
  std::atomic<long> next{0};
  auto work = [&] {
    Worker worker;
    for (long i; (i = next.fetch_add(1)) < total;) {
      const uint3 pos{uint(i % count.x), uint((i / count.x) % count.y), uint(i / (long(count.x) * count.y))};
      worker.run(fn, buffers, grid, tg_size, pos, count);
    }
  };
  const long n_workers = std::min<long>(total, std::max(1u, std::min(8u, std::thread::hardware_concurrency())));
  std::vector<std::thread> workers;
  for (long w = 1; w < n_workers; ++w) workers.emplace_back(work);
  work();
  for (auto& w : workers) w.join();
}

}  // namespace harness

#if HARNESS_SYNC
template <typename T>
T simd_sum(T x) {
  int lane;
  harness::Rendezvous& r = harness::my_simdgroup(&lane);
  const int parity = harness::rendezvous(r, lane, x);
  T total = T(0);
  if (r.reduced[parity]) {
    std::memcpy(&total, &r.reduction[parity], sizeof(T));
    return total;
  }
  int n = 0;
  for (int i = 0; i < harness::kSimdWidth; ++i) n += r.present[parity][i];
  if (n == harness::kSimdWidth) {  // full simdgroup: ascending butterfly (xor 1, 2, 4, 8, 16)
    T vals[harness::kSimdWidth];
    for (int i = 0; i < harness::kSimdWidth; ++i) vals[i] = harness::slot_value<T>(r, parity, i);
    for (int m = 1; m < harness::kSimdWidth; m <<= 1) {
      T next[harness::kSimdWidth];
      for (int i = 0; i < harness::kSimdWidth; ++i) next[i] = vals[i] + vals[i ^ m];
      std::copy(next, next + harness::kSimdWidth, vals);
    }
    total = vals[0];
  } else {  // partial simdgroup: sum of the active lanes
    for (int i = 0; i < harness::kSimdWidth; ++i)
      if (r.present[parity][i]) total += harness::slot_value<T>(r, parity, i);
  }
  std::memcpy(&r.reduction[parity], &total, sizeof(T));
  r.reduced[parity] = true;
  return total;
}

template <typename T>
T simd_max(T x) {
  int lane;
  harness::Rendezvous& r = harness::my_simdgroup(&lane);
  const int parity = harness::rendezvous(r, lane, x);
  T best = x;
  for (int i = 0; i < harness::kSimdWidth; ++i)
    if (r.present[parity][i]) best = metal::max(best, harness::slot_value<T>(r, parity, i));
  return best;
}

template <typename T>
T simd_shuffle(T x, uint source_lane) {
  int lane;
  harness::Rendezvous& r = harness::my_simdgroup(&lane);
  const int parity = harness::rendezvous(r, lane, x);
  source_lane %= harness::kSimdWidth;
  return r.present[parity][source_lane] ? harness::slot_value<T>(r, parity, source_lane) : x;
}

template <typename T>
T simd_shuffle_xor(T x, uint mask) {
  int lane;
  harness::my_simdgroup(&lane);
  return simd_shuffle(x, lane ^ mask);
}

template <typename T>
T simd_broadcast(T x, uint source_lane) { return simd_shuffle(x, source_lane); }

inline void simdgroup_barrier(mem_flags) {
  int lane;
  harness::Rendezvous& r = harness::my_simdgroup(&lane);
  harness::rendezvous(r, lane, 0);
}

inline void threadgroup_barrier(mem_flags) {
  harness::Threadgroup& tg = *harness::tg_now;
  harness::rendezvous(tg.all, 0, 0);
}
#endif  // HARNESS_SYNC

// Metal address spaces and qualifiers. Defined last so that nothing above is affected. `threadgroup` storage is
// per worker thread, which is per threadgroup because a worker runs one threadgroup at a time. `constant` is
// emulated by `volatile`: like Metal, C++ then refuses to turn a pointer into constant memory into a plain (device)
// pointer, so a body that takes a device pointer from an input MLX passes in constant memory (fewer than 8
// elements) fails to compile here as it would on a Mac.
#define device
#define constant volatile
#define threadgroup static thread_local
#define METAL_FUNC inline
