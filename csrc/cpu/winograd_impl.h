// The Winograd kernels' bodies (winograd.h says what they compute). Included by
// winograd_avx2.cpp and winograd_avx512.cpp, each compiled with its own CPU_CAPABILITY and
// instruction-set flags (setup.py), so at::vec::Vectorized<float> is 8 or 16 lanes wide and
// every function here exists once per instruction set, in its own namespace.
//
// Work is split into blocks of tiles sized so a block's transformed input V (E x NT x Cp) and
// its products M (E x NT x Kp) stay in L2: a block is input-transformed, multiplied (E GEMMs
// of NT x Cp by Cp x Kp, in a register-blocked micro-kernel), and output-transformed with the
// bias, residual and ReLU before the next block starts. No full-size transformed tensor
// exists; each output element is written once.
//
// x, the bias, the residual and the output are float32 or bfloat16 (T): bfloat16 is widened
// exactly to float32 as it is loaded and rounded once (to nearest even, NaN kept) as the output
// is stored, so the transforms and the products are float32 in both, as are the transformed
// weights (winograd_prepack): a bfloat16 conv errs by its output's rounding, as oneDNN's bf16
// conv (float32 sums, one rounding) does, plus Winograd's float32 error, ~100x smaller.
//
// NaN and inf as in torch: the transforms mix a whole input tile into every output of the
// tile (and inf - inf is NaN), so a tile whose input holds a NaN or an inf is computed by
// direct convolution instead (direct_tile): torch's NaN and inf positions and values, not a
// tile of NaN around them. Finding such tiles costs one multiply-add per loaded vector.
//
// Tile transforms (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks"):
// F(2x2,3x3): B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5;
//   .5 -.5 .5; 0 0 1], A^T = [1 1 1 0; 0 1 -1 -1].
// F(4x4,3x3): B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0;
//   0 2 -1 -2 1 0; 0 4 0 -5 0 1], G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6;
//   1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1], A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0;
//   0 1 1 4 4 0; 0 1 -1 8 -8 1].
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "gemm_common.h"
#include "winograd.h"

namespace resnet_fast::cpu {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVl = Vec::size();
constexpr int64_t kKb = 2 * kVl;                 // output channels per micro-kernel column block
constexpr int64_t kRows = kVl == 16 ? 12 : 6;    // tiles per micro-kernel call (accumulators:
                                                 // 24 of 32 zmm, 12 of 16 ymm registers)
constexpr int64_t kBlockBytes = 768 * 1024;      // V + M of one block of tiles: within L2
constexpr int64_t kRunChannels = 512;            // a 1x1 GEMM sums in runs of this many

// cnt (<= kVl) values of T at p as float32 lanes, the rest 0: bfloat16 widened (exact).
template <typename T>
inline Vec load_f(const T* p, int64_t cnt) {
  if constexpr (std::is_same_v<T, float>) {
    return cnt == kVl ? Vec::loadu(p) : Vec::loadu(p, cnt);
  } else {
    Vec v;
    if (cnt == kVl) {
      at::vec::load_fp32_from_bf16(p, v);
    } else {
      uint16_t part[kVl] = {};  // the lanes past cnt: +0.0
      std::memcpy(part, p, cnt * sizeof(T));
      at::vec::load_fp32_from_bf16(reinterpret_cast<const T*>(part), v);
    }
    return v;
  }
}

// The first cnt lanes of v stored at p as T: bfloat16 rounded to nearest even, NaN kept.
template <typename T>
inline void store_f(T* p, Vec v, int64_t cnt) {
  if constexpr (std::is_same_v<T, float>) {
    if (cnt == kVl) {
      v.store(p);
    } else {
      v.store(p, cnt);
    }
  } else {
    // cnt of its 2 * kVl lanes: converting one vector alone with AVX-512 intrinsics measured
    // no faster (64x56x56 and 128x28x28 F(4x4), batch 16: 0.716x oneDNN's time either way)
    at::vec::convert_float_bfloat16(v, v).store(p, cnt);
  }
}

// B^T d along one dimension: A = m + 2 values in, A out.
template <int M>
inline void input_1d(const Vec* d, Vec* t) {
  if constexpr (M == 2) {
    t[0] = d[0] - d[2];
    t[1] = d[1] + d[2];
    t[2] = d[2] - d[1];
    t[3] = d[1] - d[3];
  } else {
    const Vec d42 = d[4] - d[2], d31 = d[3] - d[1];
    t[0] = at::vec::fmadd(Vec(-5.f), d[2], at::vec::fmadd(Vec(4.f), d[0], d[4]));
    t[1] = at::vec::fmadd(Vec(-4.f), d[1] + d[2], d[3] + d[4]);
    t[2] = at::vec::fmadd(Vec(4.f), d[1] - d[2], d[4] - d[3]);
    t[3] = at::vec::fmadd(Vec(2.f), d31, d42);
    t[4] = at::vec::fmadd(Vec(-2.f), d31, d42);
    t[5] = at::vec::fmadd(Vec(-5.f), d[3], at::vec::fmadd(Vec(4.f), d[1], d[5]));
  }
}

// A^T s along one dimension: A values in, M out.
template <int M>
inline void output_1d(const Vec* s, Vec* o) {
  if constexpr (M == 2) {
    o[0] = s[0] + s[1] + s[2];
    o[1] = s[1] - s[2] - s[3];
  } else {
    const Vec p12 = s[1] + s[2], m12 = s[1] - s[2], p34 = s[3] + s[4], m34 = s[3] - s[4];
    o[0] = s[0] + p12 + p34;
    o[1] = at::vec::fmadd(Vec(2.f), m34, m12);
    o[2] = at::vec::fmadd(Vec(4.f), p34, p12);
    o[3] = at::vec::fmadd(Vec(8.f), m34, m12) + s[5];
  }
}

// B^T d B for kVl channels of one tile: d from p (the tile's top-left input pixel; rows `row`
// values apart, pixels `pixel` apart), `cnt` channels (the rest read as 0), rows and columns
// outside the input (clear bits of rows_in / cols_in) read as 0; kInside: all inside and cnt
// is kVl, no checks. Stores tile element e at v + e * ve; returns `nonfinite` with d * 0
// added (NaN in a lane once a NaN or inf was read).
template <int M, bool kInside, typename T>
inline Vec input_tile(const T* p, int64_t row, int64_t pixel, int64_t cnt, unsigned rows_in,
                      unsigned cols_in, float* v, int64_t ve, Vec nonfinite) {
  constexpr int A = M + 2;
  Vec s[A][A];
  for (int r = 0; r < A; ++r) {
    Vec d[A];
    const T* pr = p + r * row;
    for (int q = 0; q < A; ++q) {
      if (kInside) {
        d[q] = load_f(pr + q * pixel, kVl);
      } else if ((rows_in >> r) & (cols_in >> q) & 1u) {
        d[q] = load_f(pr + q * pixel, cnt);
      } else {
        d[q] = Vec(0.f);
      }
      nonfinite = at::vec::fmadd(d[q], Vec(0.f), nonfinite);
    }
    input_1d<M>(d, s[r]);  // along the width
  }
  for (int q = 0; q < A; ++q) {  // along the height
    Vec col[A], tcol[A];
    for (int r = 0; r < A; ++r) col[r] = s[r][q];
    input_1d<M>(col, tcol);
    for (int r = 0; r < A; ++r) tcol[r].store(v + (r * A + q) * ve);
  }
  return nonfinite;
}

// act(A^T m A + bias (+ residual)) for kVl channels of one tile: tile element e of m at
// m + e * me; output (r, q) at out + r * row + q * pixel (the residual alike), the top-left
// mh x mw outputs of the tile, cnt channels; kWhole: all M x M and cnt is kVl.
template <int M, bool kWhole, typename T>
inline void output_tile(const float* m, int64_t me, Vec bias, const T* res, bool relu, T* out,
                        int64_t row, int64_t pixel, int64_t mh, int64_t mw, int64_t cnt) {
  constexpr int A = M + 2;
  Vec s[A][M];
  for (int r = 0; r < A; ++r) {
    Vec d[A];
    for (int q = 0; q < A; ++q) d[q] = Vec::loadu(m + (r * A + q) * me);
    output_1d<M>(d, s[r]);  // along the width
  }
  for (int q = 0; q < (kWhole ? M : mw); ++q) {
    Vec col[A], o[M];
    for (int r = 0; r < A; ++r) col[r] = s[r][q];
    output_1d<M>(col, o);  // along the height
    for (int r = 0; r < (kWhole ? M : mh); ++r) {
      const int64_t at = r * row + q * pixel;
      Vec v = o[r] + bias;
      if (res) v = v + load_f(res + at, kWhole ? kVl : cnt);
      if (relu) v = at::vec::maximum(v, Vec(0.f));  // NaN stays NaN, as torch.relu
      store_f(out + at, v, kWhole ? kVl : cnt);
    }
  }
}

// The micro-kernel's vector type and its four operations, as raw intrinsics: with
// at::vec::Vectorized accumulators GCC 13 kept storing all 2R of them to the stack on every
// iteration (2.6x slower GEMM), raw __m512/__m256 stay in registers.
#if defined(CPU_CAPABILITY_AVX512)
using Raw = __m512;
inline Raw raw_load(const float* p) { return _mm512_loadu_ps(p); }
inline Raw raw_set1(float v) { return _mm512_set1_ps(v); }
inline Raw raw_fmadd(Raw a, Raw b, Raw c) { return _mm512_fmadd_ps(a, b, c); }
inline Raw raw_add(Raw a, Raw b) { return _mm512_add_ps(a, b); }
inline Raw raw_relu(Raw a) { return _mm512_max_ps(_mm512_setzero_ps(), a); }
inline void raw_store(float* p, Raw v) { _mm512_storeu_ps(p, v); }
#else
using Raw = __m256;
inline Raw raw_load(const float* p) { return _mm256_loadu_ps(p); }
inline Raw raw_set1(float v) { return _mm256_set1_ps(v); }
inline Raw raw_fmadd(Raw a, Raw b, Raw c) { return _mm256_fmadd_ps(a, b, c); }
inline Raw raw_add(Raw a, Raw b) { return _mm256_add_ps(a, b); }
inline Raw raw_relu(Raw a) { return _mm256_max_ps(_mm256_setzero_ps(), a); }
inline void raw_store(float* p, Raw v) { _mm256_storeu_ps(p, v); }
#endif

// a0[r], a1[r] += sum_{c0 <= c < c1} v[r][c] * u[c][0:kKb] for R rows: one broadcast of v
// per row and two loads of u per c. Always inlined, so the accumulators stay in registers.
// Each c also asks for row c of the panel `pf` (same shape as u) to come into L2: the next
// weight panel, which would otherwise arrive from memory only when its sums start (at batch
// 1 a layer's weight comes from memory; the sums wait for it). Where there is no next panel
// pf is u itself: the request finds its line in cache.
template <int R>
__attribute__((always_inline)) inline void accumulate(const float* v, int64_t ldv,
                                                      const float* u, int64_t c0, int64_t c1,
                                                      Raw* a0, Raw* a1, const float* pf) {
  for (int64_t c = c0; c < c1; ++c) {
#pragma GCC unroll 2
    for (int64_t j = 0; j < kKb; j += 64 / int64_t(sizeof(float)))
      __builtin_prefetch(pf + c * kKb + j, 0, 2);
    const Raw u0 = raw_load(u + c * kKb), u1 = raw_load(u + c * kKb + kVl);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const Raw b = raw_set1(v[r * ldv + c]);
      a0[r] = raw_fmadd(b, u0, a0[r]);
      a1[r] = raw_fmadd(b, u1, a1[r]);
    }
  }
}

// out[r][0:kKb] = sum_c v[r][c] * u[c][0:kKb] for R rows: R x 2 vector accumulators.
// pf: the panel to bring into L2 meanwhile (accumulate).
template <int R>
inline void micro_kernel(const float* v, int64_t ldv, const float* u, int64_t cp, float* out,
                         int64_t ldo, const float* pf) {
  Raw a0[R], a1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = raw_set1(0.f);
  accumulate<R>(v, ldv, u, 0, cp, a0, a1, pf);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    raw_store(out + r * ldo, a0[r]);
    raw_store(out + r * ldo + kVl, a1[r]);
  }
}

// act(rows x kKb block of A U + bias (+ residual)) stored at out (rows ldo apart), `kcnt`
// of the kKb columns: the 1x1 convolution's micro-kernel, the epilogue in registers. A's R
// rows are ldv apart; u is the weight panel (cp x kKb); kOneRun: cp <= kRunChannels
// (sum_in_runs); pf: the panel to bring into L2 meanwhile (accumulate). Whole blocks take
// the raw epilogue: with at::vec's (its NaN-checking maximum, its counted stores) unrolled,
// the one-run kernel measured 0.97-0.98x at batch 1.
template <int R, bool kOneRun>
inline void gemm_store(const float* v, int64_t ldv, const float* u, int64_t cp,
                       const float* bias, const float* res, bool relu, float* out, int64_t ldo,
                       int64_t kcnt, const float* pf) {
  prefetch_rows<R>(res ? res : out, ldo, kcnt);
  Raw a0[R], a1[R];
  sum_in_runs<R, kOneRun>(
      cp, kRunChannels, raw_set1(0.f), a0, a1,
      [&](int64_t c0, int64_t c1, Raw* s0, Raw* s1) {
        accumulate<R>(v, ldv, u, c0, c1, s0, s1, pf);
      },
      [](Raw p, Raw q) { return raw_add(p, q); });
  if (kcnt == kKb) {  // whole blocks (every ResNet layer): raw registers, unrolled
    const Raw b0 = raw_load(bias), b1 = raw_load(bias + kVl);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      Raw o0 = raw_add(a0[r], b0), o1 = raw_add(a1[r], b1);
      if (res) {
        o0 = raw_add(o0, raw_load(res + r * ldo));
        o1 = raw_add(o1, raw_load(res + r * ldo + kVl));
      }
      if (relu) {  // MAXPS returns its second operand where either is NaN: NaN stays NaN
        o0 = raw_relu(o0);
        o1 = raw_relu(o1);
      }
      raw_store(out + r * ldo, o0);
      raw_store(out + r * ldo + kVl, o1);
    }
    return;
  }
  const int64_t n0 = std::min(kVl, kcnt), n1 = kcnt - n0;
  const Vec b0 = Vec::loadu(bias, n0), b1 = n1 > 0 ? Vec::loadu(bias + kVl, n1) : Vec(0.f);
#pragma GCC unroll 16  // as above: accumulators indexed by a loop would live in memory
  for (int r = 0; r < R; ++r) {
    Vec o0 = Vec(a0[r]) + b0, o1 = Vec(a1[r]) + b1;
    if (res) {
      o0 = o0 + Vec::loadu(res + r * ldo, n0);
      if (n1 > 0) o1 = o1 + Vec::loadu(res + r * ldo + kVl, n1);
    }
    if (relu) {
      o0 = at::vec::maximum(o0, Vec(0.f));  // NaN stays NaN, as torch.relu
      o1 = at::vec::maximum(o1, Vec(0.f));
    }
    o0.store(out + r * ldo, n0);
    if (n1 > 0) o1.store(out + r * ldo + kVl, n1);
  }
}

// One output tile by direct convolution (the tiles whose input is not all finite), float64
// accumulation: out = act(bias + sum x * w (+ residual)), as torch computes it elementwise.
template <typename T>
void direct_tile(const T* x, const T* w, const T* bias, const T* res, bool relu, T* out,
                 int64_t n, int64_t oh0, int64_t ow0, int64_t mh, int64_t mw,
                 int64_t C, int64_t H, int64_t W, int64_t K, int64_t OH, int64_t OW, int64_t ph,
                 int64_t pw, int64_t k_begin, int64_t k_end) {
  for (int64_t r = 0; r < mh; ++r) {
    for (int64_t q = 0; q < mw; ++q) {
      const int64_t off = ((n * OH + oh0 + r) * OW + ow0 + q) * K;
      for (int64_t k = k_begin; k < k_end; ++k) {
        double acc = 0;
        for (int64_t dy = 0; dy < 3; ++dy) {
          const int64_t ih = oh0 + r - ph + dy;
          if (ih < 0 || ih >= H) continue;
          for (int64_t dx = 0; dx < 3; ++dx) {
            const int64_t iw = ow0 + q - pw + dx;
            if (iw < 0 || iw >= W) continue;
            const T* xp = x + ((n * H + ih) * W + iw) * C;
            const T* wp = w + k * C * 9 + dy * 3 + dx;
            for (int64_t c = 0; c < C; ++c) {
              acc += double(static_cast<float>(xp[c])) * double(static_cast<float>(wp[c * 9]));
            }
          }
        }
        float v = static_cast<float>(acc) + static_cast<float>(bias[k]);
        if (res) v += static_cast<float>(res[off + k]);
        if (relu && !(v > 0.f || std::isnan(v))) v = 0.f;
        out[off + k] = static_cast<T>(v);  // bfloat16: nearest even, as torch rounds
      }
    }
  }
}

template <int M, typename T>
void conv(const at::Tensor& x_t, const at::Tensor& w_t, const at::Tensor& u_t,
          const at::Tensor& bias_t,
          const at::Tensor& res_t, bool relu, int64_t ph, int64_t pw, const at::Tensor& out_t) {
  constexpr int A = M + 2, E = A * A;
  const int64_t N = x_t.size(0), C = x_t.size(1), H = x_t.size(2), W = x_t.size(3);
  const int64_t K = out_t.size(1), OH = out_t.size(2), OW = out_t.size(3);
  const int64_t Kb = u_t.size(1), Cp = u_t.size(2), Kp = Kb * kKb;
  const int64_t TH = (OH + M - 1) / M, TW = (OW + M - 1) / M, tiles = N * TH * TW;
  const T* x = x_t.const_data_ptr<T>();
  const float* u = u_t.const_data_ptr<float>();
  const T* w = w_t.const_data_ptr<T>();
  const T* bias = bias_t.const_data_ptr<T>();
  const T* res = res_t.defined() ? res_t.const_data_ptr<T>() : nullptr;
  T* out = out_t.mutable_data_ptr<T>();

  // Blocks of NT tiles, each within kBlockBytes, shared by the threads as split_work says.
  const Split split = split_work(
      tiles, kRows * std::max<int64_t>(1, kBlockBytes / (4 * E * (Cp + Kp)) / kRows), Kb, kKb,
      kRows);
  const int64_t NT = split.rows, blocks = split.chunks, per_group = split.per_group;

  at::parallel_for(0, blocks * split.groups, 1, [&](int64_t b0, int64_t b1) {
    float* V = thread_scratch<float>(static_cast<size_t>(E * NT * (Cp + Kp)));
    float* Mb = V + E * NT * Cp;
    char* finite = thread_scratch<char>(static_cast<size_t>(NT));  // per tile of the block
    int64_t transformed = -1;
    for (int64_t task = b0; task < b1; ++task) {
      const int64_t b = task % blocks, g = task / blocks;
      const int64_t kb0 = g * per_group, kb1 = std::min(Kb, kb0 + per_group);
      const int64_t t0 = b * NT, nt = std::min(NT, tiles - t0);
      // Input transform: V[e][i][c] for the block's tiles, kVl channels at a time.
      for (int64_t i = 0; i < nt && transformed != b; ++i) {
        const int64_t t = t0 + i, n = t / (TH * TW), th = t % (TH * TW) / TW, tw = t % TW;
        const int64_t ih0 = th * M - ph, iw0 = tw * M - pw;
        const bool inside = ih0 >= 0 && iw0 >= 0 && ih0 + A <= H && iw0 + A <= W;
        unsigned rows_in = 0, cols_in = 0;  // bit r / q: that input row / column exists
        for (int r = 0; r < A; ++r) {
          rows_in |= unsigned(ih0 + r >= 0 && ih0 + r < H) << r;
          cols_in |= unsigned(iw0 + r >= 0 && iw0 + r < W) << r;
        }
        const T* xt = x + ((n * H + ih0) * W + iw0) * C;
        Vec nonfinite(0.f);  // NaN in a lane once a NaN or inf was loaded (v * 0)
        for (int64_t c0 = 0; c0 < Cp; c0 += kVl) {
          const int64_t cnt = std::min(kVl, C - c0);
          float* v = V + i * Cp + c0;
          nonfinite =
              inside && cnt == kVl
                  ? input_tile<M, true>(xt + c0, W * C, C, kVl, 0, 0, v, NT * Cp, nonfinite)
                  : input_tile<M, false>(xt + c0, W * C, C, cnt, rows_in, cols_in, v, NT * Cp,
                                         nonfinite);
        }
        float lanes[kVl];
        nonfinite.store(lanes);
        finite[i] = std::none_of(lanes, lanes + kVl, [](float v) { return std::isnan(v); });
      }
      transformed = b;
      // The E products for this task's output channel blocks: M[e][i][k] = sum_c V[e][i][c]
      // * U[e][c][k]. The first row tile of each panel brings the task's next panel into L2.
      for (int e = 0; e < E; ++e) {
        for (int64_t kb = kb0; kb < kb1; ++kb) {
          const float* ue = u + (e * Kb + kb) * Cp * kKb;
          const float* next = kb + 1 < kb1 ? ue + Cp * kKb
                              : e + 1 < E  ? u + ((e + 1) * Kb + kb0) * Cp * kKb
                                           : ue;
          for (int64_t i = 0; i < nt; i += kRows) {  // the last call: only the rows left
            with_rows<kRows>(static_cast<int>(std::min(kRows, nt - i)), [&](auto r) {
              micro_kernel<decltype(r)::value>(V + (e * NT + i) * Cp, Cp, ue, Cp,
                                               Mb + (e * NT + i) * Kp + kb * kKb, Kp,
                                               i == 0 ? next : ue);
            });
          }
        }
      }
      // Output transform with bias, residual and ReLU, written once: this task's channels.
      const int64_t k_begin = kb0 * kKb, k_end = std::min(K, kb1 * kKb);
      for (int64_t i = 0; i < nt; ++i) {
        const int64_t t = t0 + i, n = t / (TH * TW), th = t % (TH * TW) / TW, tw = t % TW;
        const int64_t oh0 = th * M, ow0 = tw * M;
        const int64_t mh = std::min<int64_t>(M, OH - oh0), mw = std::min<int64_t>(M, OW - ow0);
        if (!finite[i]) {
          direct_tile(x, w, bias, res, relu, out, n, oh0, ow0, mh, mw, C, H, W, K, OH, OW, ph, pw,
                      k_begin, k_end);
          continue;
        }
        const bool whole = mh == M && mw == M;
        const int64_t off = ((n * OH + oh0) * OW + ow0) * K;
        for (int64_t k0 = k_begin; k0 < k_end; k0 += kVl) {
          const int64_t cnt = std::min(kVl, k_end - k0);
          const float* mt = Mb + i * Kp + k0;
          const T* rt = res ? res + off + k0 : nullptr;
          const Vec b = load_f(bias + k0, cnt);
          if (whole && cnt == kVl) {
            output_tile<M, true>(mt, NT * Kp, b, rt, relu, out + off + k0, OW * K, K, M, M, kVl);
          } else {
            output_tile<M, false>(mt, NT * Kp, b, rt, relu, out + off + k0, OW * K, K, mh, mw,
                                  cnt);
          }
        }
      }
    }
  });
}

// act(conv1x1(x, w) + bias (+ residual)) as a GEMM: out (P x K) = A (P x C) U (C x K) +
// bias (+ residual), A the input pixels (stride s: every s-th row and column), each row tile
// by gemm_store, as conv1x1_rows shares and orders the work. Rows are copied first where the
// stride skips pixels or rows 4 KiB apart would share one L1 set (C a multiple of 1024).
void conv1x1(const at::Tensor& x_t, const at::Tensor& u_t, const at::Tensor& bias_t,
             const at::Tensor& res_t, bool relu, int64_t sh, int64_t sw,
             const at::Tensor& out_t) {
  const int64_t C = x_t.size(1), K = out_t.size(1), Kb = u_t.size(0);
  const float* u = u_t.const_data_ptr<float>();
  const float* bias = bias_t.const_data_ptr<float>();
  const float* res = res_t.defined() ? res_t.const_data_ptr<float>() : nullptr;
  float* out = out_t.mutable_data_ptr<float>();
  conv1x1_rows<float, kRows>(
      x_t.const_data_ptr<float>(), x_t.size(0), C, x_t.size(2), x_t.size(3), out_t.size(2),
      out_t.size(3), sh, sw, Kb, kKb, sh != 1 || sw != 1 || C % 1024 == 0, C + kVl, 1,
      C * kKb * 4, kBlockBytes,
      [&](const float* a, int64_t lda, int64_t p, int rows, int64_t kb, int64_t next) {
        const int64_t k0 = kb * kKb, o = p * K + k0;
        with_rows<kRows>(rows, [&](auto r) {
          constexpr int R = decltype(r)::value;
          (C <= kRunChannels ? gemm_store<R, true> : gemm_store<R, false>)(
              a, lda, u + kb * C * kKb, C, bias + k0, res ? res + o : nullptr, relu, out + o, K,
              std::min(kKb, K - k0), u + next * C * kKb);
        });
      });
}

}  // namespace

void conv1x1_kernel(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
                    const at::Tensor& residual, bool relu, int64_t stride_h, int64_t stride_w,
                    const at::Tensor& out) {
  conv1x1(x, packed, bias, residual, relu, stride_h, stride_w, out);
}

int64_t winograd_k_block() { return kKb; }

// U = G f G^T per (k, c), in float64 then rounded once. Work goes by output channel block
// and chunks of kCc input channels. A chunk's filters are first copied with the output
// channel innermost (in[tap][c][k]), so every step after runs across kKb contiguous output
// channels (the compiler's vectors, widened to float64 and narrowed once), and each tile
// element's kCc x kKb floats are written as one contiguous run, the zero padding included
// (out need not be zeroed first); F(2x2), whose G is halves and ones, as sums and halvings.
// A 512 x 512 weight in F(2x2): 2.1 ms, 256 x 256 0.46 (AVX2 EPYC, 2 threads), where vectors
// across output channels loaded and stored one float at a time took 5.3 and 1.2: a plan
// rebuilt after every optimizer step pays it per step, twice for a trained 3x3 (its input
// gradient's flipped weight too).
void winograd_weight_kernel(const at::Tensor& w_t, int64_t m, const at::Tensor& out_t) {
  constexpr int64_t kCc = 16;
  static const double G4[6][3] = {{1. / 4, 0, 0},         {-1. / 6, -1. / 6, -1. / 6},
                                  {-1. / 6, 1. / 6, -1. / 6}, {1. / 24, 1. / 12, 1. / 6},
                                  {1. / 24, -1. / 12, 1. / 6}, {0, 0, 1}};
  const int A = static_cast<int>(m) + 2, E = A * A;
  const int64_t K = w_t.size(0), C = w_t.size(1), Kb = out_t.size(1), Cp = out_t.size(2);
  const float* w = w_t.const_data_ptr<float>();
  float* out = out_t.mutable_data_ptr<float>();
  at::parallel_for(0, Kb * ((Cp + kCc - 1) / kCc), 1, [&](int64_t t0, int64_t t1) {
    float in[9][kCc][kKb];     // [tap][input channel of the chunk][output channel]
    float stage[36][kCc][kKb];  // [tile element][input channel of the chunk][output channel]
    double gf[6][3][kKb];       // G f for one input channel
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t kb = t % Kb, c0 = t / Kb * kCc, cc = std::min(kCc, Cp - c0);
      const int64_t k0 = kb * kKb, kn = std::min(K, k0 + kKb) - k0;
      const int64_t cn = std::max<int64_t>(0, std::min(C, c0 + cc) - c0);
      std::memset(in, 0, sizeof(in));  // the padding (channels past K and C) transforms to 0
      for (int64_t k = 0; k < kn; ++k) {
        const float* src = w + ((k0 + k) * C + c0) * 9;
        for (int64_t c = 0; c < cn; ++c) {
          for (int j = 0; j < 9; ++j) in[j][c][k] = src[c * 9 + j];
        }
      }
      for (int64_t c = 0; c < cc; ++c) {
        // F(2x2): G's rows f0, (f0 + f1 + f2) / 2, (f0 - f1 + f2) / 2, f2, both sides (bitwise
        // the products by G's halves, ones and zeros, except that an infinite weight no longer
        // turns to NaN through a zero: neither matches torch's direct conv there).
        if (m == 2) {
          for (int j = 0; j < 3; ++j) {
            for (int64_t l = 0; l < kKb; ++l) {
              const double f0 = in[j][c][l], f1 = in[3 + j][c][l], f2 = in[6 + j][c][l];
              gf[0][j][l] = f0;
              gf[1][j][l] = .5 * (f0 + f1 + f2);
              gf[2][j][l] = .5 * (f0 - f1 + f2);
              gf[3][j][l] = f2;
            }
          }
          for (int i = 0; i < 4; ++i) {
            float* st = stage[i * 4][c];
            for (int64_t l = 0; l < kKb; ++l) {
              const double h0 = gf[i][0][l], h1 = gf[i][1][l], h2 = gf[i][2][l];
              st[l] = static_cast<float>(h0);
              st[kCc * kKb + l] = static_cast<float>(.5 * (h0 + h1 + h2));
              st[2 * kCc * kKb + l] = static_cast<float>(.5 * (h0 - h1 + h2));
              st[3 * kCc * kKb + l] = static_cast<float>(h2);
            }
          }
          continue;
        }
        for (int i = 0; i < A; ++i) {  // F(4x4): G's products in full
          for (int j = 0; j < 3; ++j) {
            const double a = G4[i][0], b = G4[i][1], d = G4[i][2];
            for (int64_t l = 0; l < kKb; ++l) {
              gf[i][j][l] = a * static_cast<double>(in[j][c][l]) +
                            b * static_cast<double>(in[3 + j][c][l]) +
                            d * static_cast<double>(in[6 + j][c][l]);
            }
          }
        }
        for (int i = 0; i < A; ++i) {
          for (int j = 0; j < A; ++j) {  // (G f G^T)[i][j]
            const double a = G4[j][0], b = G4[j][1], d = G4[j][2];
            float* st = stage[i * A + j][c];
            for (int64_t l = 0; l < kKb; ++l) {
              st[l] = static_cast<float>(gf[i][0][l] * a + gf[i][1][l] * b + gf[i][2][l] * d);
            }
          }
        }
      }
      for (int e = 0; e < E; ++e) {
        std::memcpy(out + ((e * Kb + kb) * Cp + c0) * kKb, stage[e], cc * kKb * sizeof(float));
      }
    }
  });
}

void winograd_conv_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                          const at::Tensor& bias, const at::Tensor& residual, bool relu,
                          int64_t m, int64_t pad_h, int64_t pad_w, const at::Tensor& out) {
  auto run = [&](auto type) {
    using T = decltype(type);
    (m == 2 ? conv<2, T> : conv<4, T>)(x, weight, packed, bias, residual, relu, pad_h, pad_w, out);
  };
  if (x.scalar_type() == at::kBFloat16) {
    run(c10::BFloat16());
  } else {
    run(float());
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace resnet_fast::cpu
