// The 1x1 convolution as our own GEMM in bfloat16, for CPUs with AVX512-BF16 (winograd.h
// says what conv1x1_bf16_kernel computes). setup.py compiles this file on its own with the
// AVX-512 flags and -mavx512bf16; it runs only where gemm_bf16_supported() says so. Built
// without those flags (not x86-64) it is empty, and winograd.cpp defines the entry point.
//
// The float32 GEMM's shape (winograd_impl.h: 12 rows x 32 output channels of accumulators,
// the threads sharing the work as split_work says, the epilogue in registers before the one
// store), with the products as VDPBF16PS: each float32 lane adds the products of one pair of
// input channels, so the weight is packed as pairs (conv1x1_prepack: (ceil(K / 32),
// ceil(C / 2), 32, 2)) and each row's pair is broadcast as one 32-bit value. Sums are float32
// in runs of 512 channels, the runs then added (as the float32 GEMM); bias and residual are
// added in float32 and the result rounded to bfloat16 once (round to nearest even), as
// oneDNN's bf16 convolution does. VDPBF16PS treats bf16 denormals as zero, as oneDNN's bf16
// convolution on these CPUs does too.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "gemm_common.h"
#include "winograd.h"

namespace resnet_fast::cpu::AVX512BF16 {
namespace {

constexpr int64_t kKb = 32;                // output channels per column block (2 x 16 lanes)
constexpr int64_t kRows = 12;              // rows per micro-kernel call (24 accumulators)
constexpr int64_t kBlockBytes = 768 * 1024;
constexpr int64_t kRunPairs = 256;         // 512 channels per run of the sum

inline __m512 widen(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m256i load16(const uint16_t* p, int64_t n) {
  return n >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                 : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
}

inline void store16(uint16_t* p, __m512 v, int64_t n) {
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  if (n >= 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  } else {
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), h);
  }
}

// a0[r], a1[r] += sum over pairs q0 <= q < q1 of v[r][2q:2q+2] . u[q][0:32][0:2].
template <int R>
__attribute__((always_inline)) inline void accumulate(const uint16_t* v, int64_t ldv,
                                                      const uint16_t* u, int64_t q0, int64_t q1,
                                                      __m512* a0, __m512* a1) {
  for (int64_t q = q0; q < q1; ++q) {
    const __m512bh u0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(u + q * 2 * kKb));
    const __m512bh u1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(u + q * 2 * kKb + kKb));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, v + r * ldv + 2 * q, sizeof(pair));
      const __m512bh b = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      a0[r] = _mm512_dpbf16_ps(a0[r], b, u0);
      a1[r] = _mm512_dpbf16_ps(a1[r], b, u1);
    }
  }
}

// act(R x kcnt block of A U + bias (+ residual)) rounded and stored at out (rows ldo apart);
// kOneRun: pairs <= kRunPairs (sum_in_runs).
template <int R, bool kOneRun>
inline void gemm_store(const uint16_t* v, int64_t ldv, const uint16_t* u, int64_t pairs,
                       const uint16_t* bias, const uint16_t* res, bool relu, uint16_t* out,
                       int64_t ldo, int64_t kcnt) {
  prefetch_rows<R>(res ? res : out, ldo, kcnt);
  __m512 a0[R], a1[R];
  sum_in_runs<R, kOneRun>(
      pairs, kRunPairs, _mm512_setzero_ps(), a0, a1,
      [&](int64_t q0, int64_t q1, __m512* s0, __m512* s1) {
        accumulate<R>(v, ldv, u, q0, q1, s0, s1);
      },
      [](__m512 p, __m512 q) { return _mm512_add_ps(p, q); });
  const int64_t n0 = std::min<int64_t>(16, kcnt), n1 = kcnt - n0;
  const __m512 zero = _mm512_setzero_ps();
  const __m512 b0 = widen(load16(bias, n0)), b1 = n1 > 0 ? widen(load16(bias + 16, n1)) : zero;
#pragma GCC unroll 16  // as the sum: accumulators indexed by a loop live in memory
  for (int r = 0; r < R; ++r) {
    __m512 o0 = _mm512_add_ps(a0[r], b0), o1 = _mm512_add_ps(a1[r], b1);
    if (res) {
      o0 = _mm512_add_ps(o0, widen(load16(res + r * ldo, n0)));
      if (n1 > 0) o1 = _mm512_add_ps(o1, widen(load16(res + r * ldo + 16, n1)));
    }
    if (relu) {  // MAXPS returns its second operand where either is NaN: NaN stays NaN
      o0 = _mm512_max_ps(zero, o0);
      o1 = _mm512_max_ps(zero, o1);
    }
    store16(out + r * ldo, o0, n0);
    if (n1 > 0) store16(out + r * ldo + 16, o1, n1);
  }
}

}  // namespace

// As the float32 conv1x1 (winograd_impl.h), over conv1x1_rows, but without its prefetch of
// the next weight panel (conv1x1_rows' `next` unused: measured for float32 on an AVX2 host
// only). Rows are copied first where the stride skips pixels, C is odd (a row's last pair
// would read the next row's first value: the copy pads it with a zero) or rows 4 KiB apart
// would share one L1 set (C a multiple of 2048).
void conv1x1_bf16_kernel(const at::Tensor& x_t, const at::Tensor& u_t, const at::Tensor& bias_t,
                         const at::Tensor& res_t, bool relu, int64_t sh, int64_t sw,
                         const at::Tensor& out_t) {
  const int64_t C = x_t.size(1), K = out_t.size(1), Kb = u_t.size(0), pairs = u_t.size(1);
  const auto* u = static_cast<const uint16_t*>(u_t.const_data_ptr());
  const auto* bias = static_cast<const uint16_t*>(bias_t.const_data_ptr());
  const auto* res = res_t.defined() ? static_cast<const uint16_t*>(res_t.const_data_ptr())
                                    : nullptr;
  auto* out = static_cast<uint16_t*>(out_t.mutable_data_ptr());
  conv1x1_rows<uint16_t, kRows>(
      static_cast<const uint16_t*>(x_t.const_data_ptr()), x_t.size(0), C, x_t.size(2),
      x_t.size(3), out_t.size(2), out_t.size(3), sh, sw, Kb, kKb,
      sh != 1 || sw != 1 || C % 2 != 0 || C % 2048 == 0, 2 * pairs + kKb, 2,
      pairs * 2 * kKb * 2, kBlockBytes,
      [&](const uint16_t* a, int64_t lda, int64_t p, int rows, int64_t kb, int64_t) {
        const int64_t k0 = kb * kKb, o = p * K + k0;
        with_rows<kRows>(rows, [&](auto r) {
          constexpr int R = decltype(r)::value;
          (pairs <= kRunPairs ? gemm_store<R, true> : gemm_store<R, false>)(
              a, lda, u + kb * pairs * 2 * kKb, pairs, bias + k0, res ? res + o : nullptr, relu,
              out + o, K, std::min(kKb, K - k0));
        });
      });
}

}  // namespace resnet_fast::cpu::AVX512BF16
#endif
