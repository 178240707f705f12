// What our CPU GEMM-shaped kernels share, whatever their instruction set and element type
// (Winograd and the float32 1x1 GEMM in winograd_impl.h, the bfloat16 1x1 GEMM in
// gemm_bf16_avx512bf16.cpp): how the threads split the work, the row-count dispatch of the
// micro-kernels, the sum in runs, and the 1x1 convolution's loop over its rows.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

// In an anonymous namespace: each kernel file compiles these with its own instruction-set
// flags, so each must keep its own copy (with external linkage the linker would keep one,
// perhaps the AVX-512 one, for the AVX2 code too). No std:: container for the same reason:
// its out-of-line members would be shared across the files.
namespace resnet_fast::cpu {
namespace {

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// How the threads share a kernel's work: `items` rows of A (tiles, pixels), in chunks of at
// most `most` (a multiple of `step`, the micro-kernel's rows), times Kb blocks of `kb` output
// channels. They split the larger operand: whole chunks, a whole number per thread, when A
// outweighs the weight (items >= output channels: large batches); else the channel blocks,
// each thread taking every chunk and its share of the weight (batch 1 at 14x14 and 7x7:
// dealing 49 Winograd tiles in chunks left one thread 36 and the other 13, and both read the
// whole weight). Task t is chunk t % chunks of channel group t / chunks, so a thread's tasks
// share their group.
struct Split {
  int64_t rows, chunks, groups, per_group;  // rows per chunk, channel blocks per group
};

inline Split split_work(int64_t items, int64_t most, int64_t Kb, int64_t kb, int64_t step) {
  const int64_t threads = at::get_num_threads();
  const bool by_rows = items >= Kb * kb;
  int64_t chunks = (items + most - 1) / most;
  if (by_rows) chunks = round_up(chunks, threads);
  const int64_t rows = std::min(round_up((items + chunks - 1) / chunks, step),
                                round_up(items, step));
  const int64_t groups = by_rows ? 1 : std::min(Kb, threads);
  const int64_t per_group = (Kb + groups - 1) / groups;
  // Recounted: no chunk or group left empty (e.g. 5 channel blocks for 4 threads).
  return {rows, (items + rows - 1) / rows, (Kb + per_group - 1) / per_group, per_group};
}

// f(std::integral_constant<int, rows>{}) for 1 <= rows <= R: a micro-kernel instantiated for
// a last, partial row tile's rows only (at batch 1, 49 Winograd tiles would otherwise be
// multiplied as 60 rows, 16 as 24).
template <int R, typename F>
inline void with_rows(int rows, F&& f) {
  if constexpr (R > 1) {
    if (rows < R) {
      with_rows<R - 1>(rows, f);
      return;
    }
  }
  f(std::integral_constant<int, R>{});
}

// a0[r], a1[r] (R rows of two accumulator vectors, zeroed here) = the sum over n inputs,
// summed in runs of `run` by acc(i0, i1, a0, a1) and the runs then added: a long sum's
// rounding error grows with its length (C = 2048 summed straight through erred 1.7x torch's
// channels_last conv, which sums in blocks too). kOneRun: the caller knows n <= run, so the
// sum is one straight call and, with an unrolled epilogue, the accumulators never leave the
// registers. Decided here at run time, GCC 13 stored all 2R of them to the stack where the
// paths meet and the epilogue loaded them back: ~8% of a bf16 1x1 with 64 input channels.
template <int R, bool kOneRun, typename V, typename Acc, typename Add>
__attribute__((always_inline)) inline void sum_in_runs(int64_t n, int64_t run, V zero, V* a0,
                                                       V* a1, Acc&& acc, Add&& add) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = zero;
  acc(0, std::min(n, run), a0, a1);
  if (kOneRun || n <= run) return;
  V t0[R], t1[R];
  for (int r = 0; r < R; ++r) {
    t0[r] = a0[r];
    t1[r] = a1[r];
  }
  for (int64_t i0 = run; i0 < n; i0 += run) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = zero;
    acc(i0, std::min(n, i0 + run), a0, a1);
    for (int r = 0; r < R; ++r) {
      t0[r] = add(t0[r], a0[r]);
      t1[r] = add(t1[r], a1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    a0[r] = t0[r];
    a1[r] = t1[r];
  }
}

// The R lines a micro-kernel's epilogue reads (the residual, else the output it writes),
// requested before its sums, to arrive while they run; kcnt values per line.
template <int R, typename T>
inline void prefetch_rows(const T* line, int64_t ld, int64_t kcnt) {
  for (int r = 0; r < R; ++r) {
    __builtin_prefetch(line + r * ld, 1);
    __builtin_prefetch(line + r * ld + kcnt - 1, 1);
  }
}

// A thread's scratch of at least n values (Winograd's V and M of one block, a 1x1 GEMM's
// copied rows), 64-byte aligned and kept between calls: a fresh megabyte per call would be
// page-faulted in each time. Grown zeroed; freed when the thread ends.
template <typename T>
T* thread_scratch(size_t n) {
  struct Buffer {
    T* p = nullptr;
    size_t n = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  if (n > buf.n) {
    std::free(buf.p);
    const size_t bytes = round_up(static_cast<int64_t>(n * sizeof(T)), 64);
    buf.p = static_cast<T*>(std::aligned_alloc(64, bytes));
    // One literal: a formatted message would instantiate std::ostringstream's members here.
    TORCH_CHECK(buf.p != nullptr, "resnet_fast: out of memory for a kernel's scratch buffer");
    std::memset(buf.p, 0, bytes);
    buf.n = n;
  }
  return buf.p;
}

// The 1x1 convolution's loop over its work, for a micro-kernel of kRows rows and kb output
// channels: tile(a, lda, p, rows, kb, next) computes output pixels p .. p + rows - 1 (rows <=
// kRows; A's rows lda apart from a) for channel block kb, and may bring the weight panel of
// block `next` into cache meanwhile: the block this thread multiplies next, where this call
// is the first to read panel kb in the task (else kb). Work is split into chunks of rows
// (within half of `block_bytes`) and, where there are few chunks, groups of channel blocks
// (split_work); within a task the weight panel of one channel block stays in L1/L2 while
// every row of the chunk passes it, or, where a group's weight fits in half of
// `block_bytes` (`panel_bytes` each), each row tile's outputs are done in one sequential
// pass. Rows are read in place (C values apart) unless `copy` (the stride skips pixels, rows
// 4 KiB apart would share one L1 set, or the kernel reads C rounded up to `pad`): then a
// chunk is first copied, rows `lda` values apart, values C .. round_up(C, pad) - 1 zero.
template <typename T, int64_t kRows, typename Tile>
void conv1x1_rows(const T* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH,
                  int64_t OW, int64_t sh, int64_t sw, int64_t Kb, int64_t kb, bool copy,
                  int64_t lda, int64_t pad, int64_t panel_bytes, int64_t block_bytes,
                  Tile&& tile) {
  const int64_t P = N * OH * OW, ld = copy ? lda : C;
  const Split split = split_work(
      P, std::max<int64_t>(kRows, block_bytes / 2 / (int64_t(sizeof(T)) * ld) / kRows * kRows),
      Kb, kb, kRows);
  const int64_t rows = split.rows, chunks = split.chunks, per_group = split.per_group;
  const bool panels_fit = per_group * panel_bytes <= block_bytes / 2;
  at::parallel_for(0, chunks * split.groups, 1, [&](int64_t t0, int64_t t1) {
    int64_t copied = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t chunk = t % chunks, g = t / chunks;
      const int64_t p0 = chunk * rows, np = std::min(rows, P - p0);
      const T* a = x + p0 * C;
      if (copy) {
        T* A = thread_scratch<T>(static_cast<size_t>(rows * ld));
        if (copied != chunk) {
          for (int64_t i = 0; i < np; ++i) {
            const int64_t p = p0 + i, n = p / (OH * OW), oh = p % (OH * OW) / OW, ow = p % OW;
            std::memcpy(A + i * ld, x + ((n * H + oh * sh) * W + ow * sw) * C, C * sizeof(T));
            std::fill(A + i * ld + C, A + i * ld + round_up(C, pad), T(0));
          }
          copied = chunk;
        }
        a = A;
      }
      const int64_t kb0 = g * per_group, kb1 = std::min(Kb, kb0 + per_group);
      auto run = [&](int64_t k, int64_t i) {
        const int64_t next = i == 0 && k + 1 < kb1 ? k + 1 : k;
        tile(a + i * ld, ld, p0 + i, static_cast<int>(std::min(kRows, np - i)), k, next);
      };
      if (panels_fit) {
        for (int64_t i = 0; i < np; i += kRows)
          for (int64_t k = kb0; k < kb1; ++k) run(k, i);
      } else {  // each weight panel read once per chunk
        for (int64_t k = kb0; k < kb1; ++k)
          for (int64_t i = 0; i < np; i += kRows) run(k, i);
      }
    }
  });
}

}  // namespace
}  // namespace resnet_fast::cpu
