// The CUDA built-ins that csrc/cuda/tpx_cuda_kernels.cuh uses, on the CPU,
// so that a C++ test runs the device code itself (no GPU has to be lent for
// the CUDA kernels to execute in CI). Include this, then the kernels header.
//
// Execution model, as close to a GPU's as the test needs:
//   - blocks run one after another, in grid order (x fastest);
//   - the threads of a block are real threads (a pool of blockDim workers,
//     reused across blocks and launches), running concurrently, so that
//     ThreadSanitizer sees their shared-memory accesses and __syncthreads()
//     is a real barrier (std::barrier);
//   - threadIdx / blockIdx are thread_local; blockDim / gridDim are set
//     before the block's threads start;
//   - __shared__ variables are static: one copy per kernel instantiation,
//     shared by the block's threads and, as blocks run one at a time, by one
//     block at a time (like shared memory, not cleared between blocks);
//   - atomics go through std::atomic_ref.
//
// Divergent __syncthreads() is detected, not hung on: a thread that finishes
// the kernel leaves the barrier (arrive_and_drop), so the others never wait
// for it, and a barrier phase that some threads reach through __syncthreads()
// after another thread of the block has exited is reported; so is a phase
// whose threads arrived from different __syncthreads() calls (different
// lines). Either makes the launch fail (see cuda_emu::launch's result).
#pragma once

#include <atomic>
#include <barrier>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline uint3 blockDim;
inline uint3 gridDim;

#define __global__
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() ::cuda_emu::sync_threads(__LINE__)

// CUDA's integer min() overloads, for the kernels' int64_t arguments.
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}

inline int atomicOr(int* p, int v) { return std::atomic_ref<int>(*p).fetch_or(v); }

inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}

namespace cuda_emu {

// What went wrong in a launch; empty when nothing did.
struct Failure {
  std::string message;
  explicit operator bool() const { return !message.empty(); }
};

class BlockPool;
inline thread_local BlockPool* current_pool = nullptr;

// blockDim.x worker threads that run the blocks of a launch, one block at a
// time, and check the block's __syncthreads() phases.
class BlockPool {
 public:
  explicit BlockPool(unsigned threads) : threads_(threads) {
    workers_.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) workers_.emplace_back([this, t] { work(t); });
  }

  ~BlockPool() {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      ++generation_;
    }
    start_.notify_all();
    for (auto& w : workers_) w.join();
  }

  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  unsigned threads() const { return threads_; }

  // Runs body() on every thread of block (bx, by); returns when all finished.
  void run_block(unsigned bx, unsigned by, const std::function<void()>& body) {
    barrier_.emplace(static_cast<std::ptrdiff_t>(threads_), Completion{this});
    phase_line_.store(0);
    phase_syncs_.store(0);
    exited_.store(0);
    body_ = &body;
    block_ = {bx, by, 0};
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      running_ = threads_;
      ++generation_;
    }
    start_.notify_all();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return running_ == 0; });
  }

  // The first problem seen since the last call, and clears it.
  Failure take_failure() {
    const std::lock_guard<std::mutex> lock(fail_mutex_);
    Failure f{failure_};
    failure_.clear();
    return f;
  }

  void sync(int line) {
    // All threads of a phase must come from the same __syncthreads().
    int expected = 0;
    if (!phase_line_.compare_exchange_strong(expected, line) && expected != line) {
      fail("divergent __syncthreads(): in block (" + std::to_string(blockIdx.x) + ", " +
           std::to_string(blockIdx.y) + ") thread " + std::to_string(threadIdx.x) +
           " is at line " + std::to_string(line) + " while others are at line " +
           std::to_string(expected));
    }
    phase_syncs_.fetch_add(1);
    barrier_->arrive_and_wait();
  }

 private:
  struct Completion {
    BlockPool* pool;
    // Runs once per phase, after every thread still in the block arrived
    // and before any is released.
    void operator()() noexcept {
      const unsigned syncs = pool->phase_syncs_.exchange(0);
      const int line = pool->phase_line_.exchange(0);
      const unsigned exited = pool->exited_.load();
      if (syncs > 0 && exited > 0) {
        pool->fail("divergent __syncthreads(): in block (" + std::to_string(pool->block_.x) +
                   ", " + std::to_string(pool->block_.y) + ") " + std::to_string(exited) +
                   " thread(s) exited while " + std::to_string(syncs) +
                   " wait(s) at the __syncthreads() of line " + std::to_string(line));
      }
    }
  };

  void fail(const std::string& message) {
    const std::lock_guard<std::mutex> lock(fail_mutex_);
    if (failure_.empty()) failure_ = message;
  }

  void work(unsigned t) {
    current_pool = this;
    unsigned seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        start_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
      }
      blockIdx = block_;
      threadIdx = {t, 0, 0};
      (*body_)();
      // Leaving the block: later phases no longer wait for this thread.
      exited_.fetch_add(1);
      barrier_->arrive_and_drop();
      const std::lock_guard<std::mutex> lock(mutex_);
      if (--running_ == 0) done_.notify_one();
    }
  }

  const unsigned threads_;
  std::vector<std::thread> workers_;
  // Waiting on a condition variable, not on std::atomic::wait: the latter
  // spins with sched_yield first, which on a loaded machine made a block
  // without barriers 7x slower (7 ms instead of 1 ms, 2 cores).
  std::mutex mutex_;
  std::condition_variable start_, done_;
  unsigned generation_ = 0;  // a new value starts the next block (or, with stop_, ends the workers)
  unsigned running_ = 0;     // threads still in the block
  bool stop_ = false;
  const std::function<void()>* body_ = nullptr;
  uint3 block_;

  std::optional<std::barrier<Completion>> barrier_;
  std::atomic<int> phase_line_{0};
  std::atomic<unsigned> phase_syncs_{0};
  std::atomic<unsigned> exited_{0};

  std::mutex fail_mutex_;
  std::string failure_;
};

inline void sync_threads(int line) { current_pool->sync(line); }

// The pool for blocks of `threads` threads, kept for the next launch.
inline BlockPool& pool_for(unsigned threads) {
  static std::optional<BlockPool> pool;
  if (!pool || pool->threads() != threads) {
    pool.reset();
    pool.emplace(threads);
  }
  return *pool;
}

// Runs kernel(args...) on grid_x * grid_y blocks of `threads` threads, to
// completion; the first divergence seen, if any, is returned.
template <typename... Params>
Failure launch(void (*kernel)(Params...), int64_t grid_x, int64_t grid_y, unsigned threads,
               std::type_identity_t<Params>... args) {
  BlockPool& pool = pool_for(threads);
  blockDim = {threads, 1, 1};
  gridDim = {static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y), 1};
  const std::function<void()> body = [&] { kernel(args...); };
  for (int64_t by = 0; by < grid_y; ++by) {
    for (int64_t bx = 0; bx < grid_x; ++bx) {
      pool.run_block(static_cast<unsigned>(bx), static_cast<unsigned>(by), body);
    }
  }
  return pool.take_failure();
}

}  // namespace cuda_emu
