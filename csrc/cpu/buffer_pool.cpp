#include "buffer_pool.h"

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace resnet_fast::cpu {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;   // smaller outputs: default allocator
constexpr size_t kAlign = size_t(2) << 20;      // huge-page size and alignment

size_t cap_bytes() {
  static const size_t cap = [] {
    const char* env = std::getenv("RESNET_FAST_CPU_CACHE_MB");
    if (env == nullptr || *env == '\0') return size_t(1024) << 20;
    long long mb = -1;
    size_t used = 0;
    try {
      mb = std::stoll(env, &used);
    } catch (const std::logic_error&) {
      used = 0;  // not a number, or out of range
    }
    // The whole value must be the integer: "1e3" or "512MB" is refused, not read as 1 or 512.
    TORCH_CHECK(used > 0 && env[used] == '\0',
                "RESNET_FAST_CPU_CACHE_MB must be a whole number of megabytes, got '", env, "'");
    TORCH_CHECK(mb >= 0, "RESNET_FAST_CPU_CACHE_MB must be >= 0, got ", env);
    return static_cast<size_t>(mb) << 20;
  }();
  return cap;
}

// A free buffer and when it was handed back (for evicting the least recently used).
struct FreeBlock {
  void* ptr;
  uint64_t stamp;
};

struct Pool {
  std::mutex mu;
  std::multimap<size_t, FreeBlock> free_blocks;  // rounded size -> buffer
  size_t cached = 0;
  uint64_t clock = 0;
  std::unordered_map<void*, size_t> live;  // buffers handed out -> their size
};

// A free buffer up to this much larger than asked for is reused (the rest of it idles while
// the tensor lives): inputs of varying sizes (batch 1-4, 64-256 px) then share buffers instead
// of each size keeping its own until the cap.
constexpr size_t kSlackDiv = 4;  // up to 1/4 larger

// Never destroyed: tensors may outlive static destruction at interpreter exit.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

// The allocator that PooledAllocations swapped out: the pool and the router hand it what they
// do not serve (asking c10::GetCPUAllocator() then would return the router itself).
std::atomic<c10::Allocator*> swapped_out{nullptr};

c10::Allocator* small_allocator() {
  c10::Allocator* a = swapped_out.load(std::memory_order_acquire);
  return a != nullptr ? a : c10::GetCPUAllocator();
}

// Keeps the freed buffer, evicting the least recently freed ones while the cache would pass
// its cap: the buffers of the sizes in use now stay, those of sizes gone by are freed. A
// pointer the pool did not hand out (memory the router passed on, freed through its
// raw_deleter while installed) goes back to the allocator that made it.
void release(void* ptr) {
  std::vector<void*> evicted;
  bool ours = false, kept = false;
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    auto live = p.live.find(ptr);
    if (live != p.live.end()) {
      ours = true;
      const size_t bytes = live->second;
      p.live.erase(live);
      if (bytes <= cap_bytes()) {
        while (p.cached + bytes > cap_bytes()) {
          auto oldest = p.free_blocks.begin();
          for (auto it = p.free_blocks.begin(); it != p.free_blocks.end(); ++it) {
            if (it->second.stamp < oldest->second.stamp) oldest = it;
          }
          evicted.push_back(oldest->second.ptr);
          p.cached -= oldest->first;
          p.free_blocks.erase(oldest);
        }
        p.free_blocks.emplace(bytes, FreeBlock{ptr, ++p.clock});
        p.cached += bytes;
        kept = true;
      }
    }
  }
  if (!ours) return small_allocator()->raw_deleter()(ptr);
  for (void* e : evicted) std::free(e);  // outside the lock
  if (!kept) std::free(ptr);
}

// The smallest free buffer of at least `bytes` (and at most 1/kSlackDiv more), else a new one;
// recorded as handed out with its size.
void* acquire(size_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.free_blocks.lower_bound(bytes);
    if (it != p.free_blocks.end() && it->first <= bytes + bytes / kSlackDiv) {
      void* ptr = it->second.ptr;
      p.cached -= it->first;
      p.live.emplace(ptr, it->first);
      p.free_blocks.erase(it);
      return ptr;
    }
  }
  void* ptr = std::aligned_alloc(kAlign, bytes);
  TORCH_CHECK(ptr != nullptr, "resnet_fast: out of memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(ptr, bytes, MADV_HUGEPAGE);  // advice only: failure just means 4 KiB pages
#endif
  std::lock_guard<std::mutex> lock(p.mu);
  p.live[ptr] = bytes;
  return ptr;
}

// The pool as a c10::Allocator: tensors made with it own an ordinary resizable storage whose
// deleter hands the buffer back, so a buffer is reused only after its last owner is gone (the
// contract of the CUDA caching allocator), whatever holds the tensor: inductor, export, other
// threads, an `out=` that resizes it.
struct PoolAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    if (!pooled(nbytes)) return small_allocator()->allocate(nbytes);
    void* ptr = acquire((nbytes + kAlign - 1) / kAlign * kAlign);
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

PoolAllocator& pool_allocator() {
  static auto* alloc = new PoolAllocator();  // never destroyed, like the pool
  return *alloc;
}

}  // namespace

bool pooled(size_t bytes) { return bytes >= kMinBytes && cap_bytes() != 0; }

namespace {

thread_local size_t routed_bytes = 0;  // this thread's PooledAllocations request (0: none)

// The CPU allocator while a PooledAllocations lives: this thread's one awaited request from
// the pool, the rest from the allocator it replaced. Its raw_deleter takes both kinds of
// pointer (torch frees raw memory through whatever allocator is installed at the time).
struct Router final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes != 0 && nbytes == routed_bytes) {
      routed_bytes = 0;  // once
      return pool_allocator().allocate(nbytes);
    }
    return small_allocator()->allocate(nbytes);
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

Router& router() {
  static auto* r = new Router();  // never destroyed
  return *r;
}

std::mutex swap_mu;
int swap_depth = 0;  // live PooledAllocations on all threads, under swap_mu

}  // namespace

PooledAllocations::PooledAllocations(size_t bytes) : outer_(routed_bytes) {
  routed_bytes = bytes;  // (the pool passes a request too small for it on)
  std::lock_guard<std::mutex> lock(swap_mu);
  if (swap_depth++ == 0) {
    c10::Allocator* current = c10::GetCPUAllocator();
    if (current != &router()) swapped_out.store(current, std::memory_order_release);
    c10::SetCPUAllocator(&router(), /*priority=*/0);
  }
}

PooledAllocations::~PooledAllocations() {
  routed_bytes = outer_;
  std::lock_guard<std::mutex> lock(swap_mu);
  if (--swap_depth == 0 && c10::GetCPUAllocator() == &router()) {
    c10::SetCPUAllocator(swapped_out.load(std::memory_order_acquire), /*priority=*/0);
  }
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat fmt) {
  return at::detail::empty_generic(sizes, &pool_allocator(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), fmt);
}

int64_t buffer_cache_clear() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  const auto freed = static_cast<int64_t>(p.cached);
  for (auto& kv : p.free_blocks) std::free(kv.second.ptr);
  p.free_blocks.clear();
  p.cached = 0;
  return freed;
}

int64_t buffer_cache_bytes() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  return static_cast<int64_t>(p.cached);
}

}  // namespace resnet_fast::cpu
