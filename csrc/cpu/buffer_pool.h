// A cache of large CPU output buffers. On CPU a fresh 100 MB tensor costs more than the
// arithmetic done on it: the allocator hands back new pages and each is faulted in on first
// touch (measured here: a 103 MB clone 30 ms, of which ~2/3 page faults). Like the CUDA
// caching allocator, buffers of freed outputs are kept and handed to the next output that fits
// (the smallest free buffer at least its size and at most 1/4 larger); new buffers are 2 MiB
// aligned and advised for transparent huge pages.
//
// RESNET_FAST_CPU_CACHE_MB caps the bytes kept (default 1024; 0 disables the cache; outputs
// under 1 MiB always use the default allocator); past it the least recently freed buffers are
// freed first, so a stream of changing input sizes keeps the buffers of the sizes in use.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>

#include <cstdint>

namespace resnet_fast::cpu {

// An uninitialized CPU tensor like at::empty(sizes, options.memory_format(fmt)), its storage
// from the cache: resizable, handed back to the cache when the last owner frees it.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat fmt);

// Whether empty_output of this many bytes takes its buffer from the cache (else it is the
// default allocator's).
bool pooled(size_t bytes);

// Serves the next allocation of exactly `bytes` that the calling thread makes through the
// CPU allocator (c10::GetCPUAllocator), while the guard lives, from the cache, as empty_output
// does: so the output that one of torch's own ops allocates (oneDNN's convolution allocates
// its output before it computes) needs no fresh pages. Everything else (other sizes, other
// threads, raw scratch memory) goes to the allocator that was installed, as without the guard.
// For the guard's life the process's CPU allocator is a router that does this; the allocator
// found at the first of overlapping guards (on any thread) is put back when the last ends. An
// allocator registered with a higher priority than the default's is left in place.
class PooledAllocations {
 public:
  explicit PooledAllocations(size_t bytes);
  ~PooledAllocations();
  PooledAllocations(const PooledAllocations&) = delete;
  PooledAllocations& operator=(const PooledAllocations&) = delete;

 private:
  size_t outer_;  // the enclosing guard's request on this thread (0: none)
};

// Frees every cached buffer; returns the bytes released.
int64_t buffer_cache_clear();
// Bytes currently held in the cache (not counting buffers owned by live tensors).
int64_t buffer_cache_bytes();

}  // namespace resnet_fast::cpu
