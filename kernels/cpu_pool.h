// The CPU kernels' thread pool (one per process, shared by every kernel in the library).
//
// Chunks of work are claimed from an atomic counter by the calling thread and by helper threads, and a call returns
// when every chunk is done -- not when every helper has shown up. On a shared 2-core box a helper may wait
// milliseconds for a time slice; a fork/join region (OpenMP) stalls the whole call for it (measured ~12 ms a call),
// here the caller just does the helper's share. Helpers spin briefly between calls, then sleep. All kernels of a
// process must share this one pool: two pools' spinning helpers would take each other's cores.
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

namespace nbllm {

class Pool {
   public:
    // fn(0), ..., fn(chunks - 1) on the calling thread and up to `threads - 1` helpers.
    void run(int64_t chunks, int threads, const std::function<void(int64_t)>& fn) {
        if (threads <= 1 || chunks <= 1) {
            for (int64_t c = 0; c < chunks; ++c) fn(c);
            return;
        }
        std::lock_guard<std::mutex> one_caller(run_mutex_);
        while (helpers_ < threads - 1) {
            std::thread(&Pool::helper, this).detach();
            ++helpers_;
        }
        fn_ = &fn;
        chunks_.store(chunks, std::memory_order_relaxed);
        done_.store(0, std::memory_order_relaxed);
        const uint64_t gen = ++gen_;
        state_.store(gen << 32);  // seq_cst: pairs with the helpers' sleeping_ increment
        if (sleeping_.load() > 0) {
            std::lock_guard<std::mutex> lock(sleep_mutex_);
            wake_.notify_all();
        }
        work(gen);
        // Only chunks a helper has claimed remain; if it was descheduled mid-chunk, give it the core.
        for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
            if (spins < 1000)
                _mm_pause();
            else
                std::this_thread::yield();
        }
    }

   private:
    // Between calls a helper waits busy (a sleeping thread takes ~0.1-0.5 ms to wake in a VM) for ~350 us of pause
    // loops: the gaps between a forward's kernel calls (its Python and torch ops) are shorter, and a yielding helper
    // may lose its core to another process for a time slice (measured: 4096x640 calls 100 us apart took 317 us
    // instead of 178). Then it yields for ~kYields more rounds before it sleeps: torch's OpenMP threads, which run
    // on the same cores outside our forwards (`kernels_own_the_threads`), get the core it no longer needs.
    static constexpr int kPauses = 1 << 14;
    static constexpr int kYields = 1 << 11;

    // Claim and run chunks of generation `gen` until none is left; a stale generation claims nothing.
    void work(uint64_t gen) {
        uint64_t v = state_.load(std::memory_order_acquire);
        while ((v >> 32) == gen && static_cast<int64_t>(v & 0xffffffffu) < chunks_.load(std::memory_order_relaxed)) {
            if (!state_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) continue;
            (*fn_)(static_cast<int64_t>(v & 0xffffffffu));
            done_.fetch_add(1, std::memory_order_release);
            v = state_.load(std::memory_order_acquire);
        }
    }

    void helper() {
        uint64_t seen = 0;
        for (;;) {
            uint64_t gen;
            for (int spins = 0; (gen = state_.load(std::memory_order_acquire) >> 32) == seen;) {
                if (++spins < kPauses) {
                    _mm_pause();
                    continue;
                }
                if (spins < kPauses + kYields) {
                    std::this_thread::yield();
                    continue;
                }
                std::unique_lock<std::mutex> lock(sleep_mutex_);
                sleeping_.fetch_add(1);  // seq_cst: pairs with run()'s state_ store
                wake_.wait(lock, [&] { return (state_.load() >> 32) != seen; });
                sleeping_.fetch_sub(1);
                spins = 0;
            }
            seen = gen;
            work(gen);
        }
    }

    std::mutex run_mutex_, sleep_mutex_;
    std::condition_variable wake_;
    std::atomic<uint64_t> state_{0};  // generation << 32 | next unclaimed chunk
    std::atomic<int64_t> done_{0};
    std::atomic<int> sleeping_{0};
    const std::function<void(int64_t)>* fn_ = nullptr;
    std::atomic<int64_t> chunks_{0};
    uint64_t gen_ = 0;
    int helpers_ = 0;
};

inline Pool& pool() {
    static Pool* p = new Pool;  // never destroyed: its detached helpers outlive static destructors
    return *p;
}

// Split [0, n) into chunks of about n / (threads * 8) (at least `grain`) and run body(begin, end) on each.
inline void parallel_for(int64_t n, int64_t grain, int threads, const std::function<void(int64_t, int64_t)>& body) {
    const int64_t step = std::max<int64_t>(grain, n / (std::max(threads, 1) * 8));
    const int64_t chunks = (n + step - 1) / step;
    pool().run(chunks, threads, [&](int64_t c) { body(c * step, std::min(n, (c + 1) * step)); });
}

}  // namespace nbllm
