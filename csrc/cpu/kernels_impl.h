// The CPU kernels' bodies. Included by kernels_default.cpp and kernels_avx2.cpp, each
// compiled with its own CPU_CAPABILITY (a #define in kernels_default.cpp, setup.py's
// -DCPU_CAPABILITY=AVX2 for kernels_avx2.cpp), so every at::vec type and every function here
// exists once per instruction set, in its own namespace (as ATen does for its own kernels).
// Not a public header: include kernels.h for the entry points.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace resnet_fast::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// NaN-propagating relu, as torch.relu: a NaN stays NaN (std::max would give 0).
template <typename T>
inline T relu_scalar(T v) {
  return (v > T(0) || std::isnan(v)) ? v : T(0);
}

// The epilogue on opmath values. The flags are compile-time so the hot loop has no branches;
// kAffine=false is add_relu (no multiply by 1 and add of 0, which would also turn -0 into +0).
template <bool kAffine, bool kRes, bool kRelu, typename V>
inline V epilogue(V x, V s, V b, V r) {
  V v = x;
  if constexpr (kAffine) v = x * s + b;
  if constexpr (kRes) v = v + r;
  if constexpr (kRelu) v = at::vec::maximum(v, V(0));
  return v;
}

template <bool kAffine, bool kRes, bool kRelu, typename T>
inline T epilogue_scalar(T x, T s, T b, T r) {
  T v = x;
  if constexpr (kAffine) v = x * s + b;
  if constexpr (kRes) v = v + r;
  if constexpr (kRelu) v = relu_scalar(v);
  return v;
}

// Applies the epilogue to n contiguous elements. Scale/shift/center are either one value for
// the whole run (NCHW plane: s_ptr == nullptr, s0/b0/m0 used) or per element (channels_last
// row). The affine form is (x - center) * scale + shift: training BN passes its batch mean as
// the center (x * scale + (shift - mean * scale) would cancel digits when |mean| >> std);
// center 0 leaves x exactly as it is.
template <typename scalar_t, bool kAffine, bool kRes, bool kRelu>
void run_contiguous(const scalar_t* x, const scalar_t* r, scalar_t* out, int64_t n,
                    const at::opmath_type<scalar_t>* s_ptr,
                    const at::opmath_type<scalar_t>* b_ptr, at::opmath_type<scalar_t> s0,
                    at::opmath_type<scalar_t> b0, const at::opmath_type<scalar_t>* m_ptr = nullptr,
                    at::opmath_type<scalar_t> m0 = 0) {
  using acc_t = at::opmath_type<scalar_t>;
  using aVec = Vectorized<acc_t>;
  using Vec = Vectorized<scalar_t>;
  int64_t i = 0;
  auto s_at = [&](int64_t k) { return s_ptr ? aVec::loadu(s_ptr + k) : aVec(s0); };
  auto b_at = [&](int64_t k) { return b_ptr ? aVec::loadu(b_ptr + k) : aVec(b0); };
  auto centered = [&](aVec v, int64_t k) {
    if constexpr (kAffine) return v - (m_ptr ? aVec::loadu(m_ptr + k) : aVec(m0));
    return v;
  };
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec rv = kRes ? Vec::loadu(r + i) : Vec(0);
      epilogue<kAffine, kRes, kRelu>(centered(Vec::loadu(x + i), i), s_at(i), b_at(i), rv)
          .store(out + i);
    }
  } else {
    constexpr int64_t kHalf = aVec::size();
    for (; i + Vec::size() <= n; i += Vec::size()) {
      auto [x0, x1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(x + i));
      aVec r0(0), r1(0);
      if constexpr (kRes) std::tie(r0, r1) = at::vec::convert_to_float<scalar_t>(Vec::loadu(r + i));
      at::vec::convert_from_float<scalar_t>(
          epilogue<kAffine, kRes, kRelu>(centered(x0, i), s_at(i), b_at(i), r0),
          epilogue<kAffine, kRes, kRelu>(centered(x1, i + kHalf), s_at(i + kHalf), b_at(i + kHalf), r1))
          .store(out + i);
    }
  }
  for (; i < n; ++i) {
    const acc_t rv = kRes ? static_cast<acc_t>(r[i]) : acc_t(0);
    const acc_t xv = static_cast<acc_t>(x[i]) - (kAffine ? (m_ptr ? m_ptr[i] : m0) : acc_t(0));
    out[i] = static_cast<scalar_t>(epilogue_scalar<kAffine, kRes, kRelu>(
        kAffine ? xv : static_cast<acc_t>(x[i]), s_ptr ? s_ptr[i] : s0, b_ptr ? b_ptr[i] : b0, rv));
  }
}

template <typename scalar_t, bool kRes, bool kRelu>
void scale_shift_act_impl(const scalar_t* x, const scalar_t* r, scalar_t* out,
                          const std::vector<at::opmath_type<scalar_t>>& s,
                          const std::vector<at::opmath_type<scalar_t>>& b,
                          const std::vector<at::opmath_type<scalar_t>>& m, int64_t n_batch,
                          int64_t channels, int64_t inner, bool channels_last) {
  if (channels_last) {
    const int64_t rows = n_batch * inner;
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / channels);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t off = row * channels;
        run_contiguous<scalar_t, true, kRes, kRelu>(x + off, kRes ? r + off : nullptr, out + off,
                                              channels, s.data(), b.data(), 0, 0, m.data(), 0);
      }
    });
  } else {
    const int64_t planes = n_batch * channels;
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(inner, 1));
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % channels;
        const int64_t off = p * inner;
        run_contiguous<scalar_t, true, kRes, kRelu>(x + off, kRes ? r + off : nullptr, out + off,
                                              inner, nullptr, nullptr, s[c], b[c], nullptr, m[c]);
      }
    });
  }
}

template <typename acc_t>
std::vector<acc_t> to_opmath(const at::Tensor& p) {
  const at::Tensor c = p.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return std::vector<acc_t>(c.const_data_ptr<acc_t>(), c.const_data_ptr<acc_t>() + c.numel());
}

}  // namespace

void add_relu_kernel(const at::Tensor& x, const at::Tensor& r, const at::Tensor& out) {
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_relu_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      run_contiguous<scalar_t, false, true, true>(xp + begin, rp + begin, op + begin,
                                                  end - begin, nullptr, nullptr, acc_t(0), acc_t(0));
    });
  });
}

// relu on 16-bit floats' bits, as torch.relu: a value with its sign bit set becomes +0,
// unless it is a NaN (all exponent bits set and a nonzero mantissa: above `inf` once the sign
// is cleared) or -0.0 (torch keeps it), which stay. Branch-free, so the compiler vectorizes
// it (a branch on the sign mispredicted half the time: 5 ms for 3.2M values).
void relu_half_kernel(const at::Tensor& t) {
  const uint16_t inf = t.scalar_type() == at::kBFloat16 ? 0x7F80 : 0x7C00;
  auto* p = static_cast<uint16_t*>(t.mutable_data_ptr());
  at::parallel_for(0, t.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    uint16_t* q = p;
    for (int64_t i = begin; i < end; ++i) {
      const uint16_t b = q[i];
      // all ones where the value stays (sign clear, -0.0, or a NaN), zero where it becomes +0
      const uint16_t mag = b & 0x7FFF;
      const uint16_t keep = uint16_t(0) - uint16_t((b >> 15 == 0) | (mag == 0) | (mag > inf));
      q[i] = b & keep;
    }
  });
}

// act(the maximum of each window) of a channels_last x: each output pixel's channels as
// vectors, over the window's positions inside x (padding never wins, as in torch); a NaN in a
// window wins (at::vec::maximum), as in torch.max_pool2d; the ReLU keeps NaN. bfloat16 and
// float16 are compared as float32 (exact: every value converts exactly), converted once per
// load and once per store.
template <typename scalar_t>
void max_pool_act_impl(const scalar_t* xp, scalar_t* op, int64_t N, int64_t C, int64_t H,
                       int64_t W, int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh,
                       int64_t sw, int64_t ph, int64_t pw, bool relu) {
  using Vec = Vectorized<scalar_t>;
  using opmath_t = at::opmath_type<scalar_t>;
  using OVec = Vectorized<opmath_t>;
  constexpr bool kReduced = !std::is_same_v<scalar_t, opmath_t>;
  constexpr int64_t vl = Vec::size();
  const OVec lowest(-std::numeric_limits<opmath_t>::infinity()), zero(opmath_t(0));
  at::parallel_for(0, N * OH, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / OH, top = r % OH * sh - ph;
      const int64_t h0 = std::max<int64_t>(top, 0), h1 = std::min(top + kh, H);
      for (int64_t ow = 0; ow < OW; ++ow) {
        const int64_t left = ow * sw - pw;
        const int64_t w0 = std::max<int64_t>(left, 0), w1 = std::min(left + kw, W);
        scalar_t* o = op + (r * OW + ow) * C;
        for (int64_t c = 0; c < C; c += vl) {
          const int64_t cnt = std::min(vl, C - c);
          OVec m0 = lowest, m1 = lowest;  // m1: the upper half of a reduced-precision vector
          for (int64_t h = h0; h < h1; ++h) {
            const scalar_t* row = xp + ((n * H + h) * W) * C + c;
            for (int64_t w = w0; w < w1; ++w) {
              const Vec v = cnt == vl ? Vec::loadu(row + w * C) : Vec::loadu(row + w * C, cnt);
              if constexpr (kReduced) {
                const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(v);
                m0 = at::vec::maximum(m0, lo);
                m1 = at::vec::maximum(m1, hi);
              } else {
                m0 = at::vec::maximum(m0, v);
              }
            }
          }
          if (relu) {  // 0 where below 0; NaN and -0.0 stay, as torch.relu
            m0 = OVec::blendv(m0, zero, m0 < zero);
            if constexpr (kReduced) m1 = OVec::blendv(m1, zero, m1 < zero);
          }
          Vec out;
          if constexpr (kReduced) {
            out = at::vec::convert_from_float<scalar_t>(m0, m1);
          } else {
            out = m0;
          }
          if (cnt == vl) {
            out.store(o + c);
          } else {
            out.store(o + c, cnt);
          }
        }
      }
    }
  });
}

void max_pool_act_kernel(const at::Tensor& x, const at::Tensor& out, int64_t kh, int64_t kw,
                         int64_t sh, int64_t sw, int64_t ph, int64_t pw, bool relu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool_act_cpu", [&] {
    max_pool_act_impl<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                x.size(0), x.size(1), x.size(2), x.size(3), out.size(2),
                                out.size(3), kh, kw, sh, sw, ph, pw, relu);
  });
}

void scale_shift_act_kernel(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& residual, bool relu, bool channels_last,
                            const at::Tensor& out, const at::Tensor& center) {
  const int64_t n_batch = x.size(0), channels = x.size(1);
  const int64_t inner = x.numel() / (n_batch * channels);
  const bool has_res = residual.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_shift_act_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto s = to_opmath<acc_t>(scale);
    const auto b = to_opmath<acc_t>(shift);
    const auto m = center.defined() ? to_opmath<acc_t>(center)
                                    : std::vector<acc_t>(static_cast<size_t>(channels), acc_t(0));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    auto go = [&](auto res_tag, auto relu_tag) {
      scale_shift_act_impl<scalar_t, decltype(res_tag)::value, decltype(relu_tag)::value>(
          xp, rp, op, s, b, m, n_batch, channels, inner, channels_last);
    };
    if (has_res && relu) go(std::true_type{}, std::true_type{});
    else if (has_res) go(std::true_type{}, std::false_type{});
    else if (relu) go(std::false_type{}, std::true_type{});
    else go(std::false_type{}, std::false_type{});
  });
}

// Training BatchNorm's inner loops, float32 (the hot dtype; others take the generic loops in
// batch_norm_cpu.cpp). "rows": `rows` consecutive channels_last pixels of C channels, per-channel
// accumulators a1/a2 (float, caller-zeroed, at most a few hundred rows per call so float
// accumulation stays exact to ~1e-7). "plane": n contiguous values of one channel (NCHW).
// bwd=false: a1 += x - k, a2 += (x - k)^2 (k: the shift). bwd=true: g' = relu ? (o <= 0 ? 0 : g)
// : g, a1 += g', a2 += g' * (x - k) (k: the mean).

namespace {
// 0 where o <= 0, else g: a NaN o passes g, as torch.relu's backward (threshold_backward)
// does: vector and scalar.
inline Vectorized<float> relu_mask(Vectorized<float> g, Vectorized<float> o) {
  return Vectorized<float>::blendv(g, Vectorized<float>(0), o <= Vectorized<float>(0));
}
inline float relu_mask(float g, float o) { return o <= 0.f ? 0.f : g; }

// The two terms summed per element, for V = Vectorized<float> or float; g and o are read only
// in the backward (kBwd) and with the ReLU mask (kRelu).
template <bool kBwd, bool kRelu, typename V>
inline void bn_terms(V x, V k, V g, V o, V& t1, V& t2) {
  const V d = x - k;
  if constexpr (kBwd) {
    if constexpr (kRelu) g = relu_mask(g, o);
    t1 = g;
    t2 = g * d;
  } else {
    t1 = d;
    t2 = d * d;
  }
}

template <bool kBwd, bool kRelu>
void bn_sums_rows_impl(const float* x, const float* g, const float* o, int64_t rows, int64_t C,
                       const float* k, float* a1, float* a2) {
  using V = Vectorized<float>;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t off = r * C;
    int64_t c = 0;
    for (; c + V::size() <= C; c += V::size()) {
      V t1, t2;
      bn_terms<kBwd, kRelu>(V::loadu(x + off + c), V::loadu(k + c),
                            kBwd ? V::loadu(g + off + c) : V(0),
                            kRelu ? V::loadu(o + off + c) : V(0), t1, t2);
      (V::loadu(a1 + c) + t1).store(a1 + c);
      (V::loadu(a2 + c) + t2).store(a2 + c);
    }
    for (; c < C; ++c) {
      float t1, t2;
      bn_terms<kBwd, kRelu>(x[off + c], k[c], kBwd ? g[off + c] : 0.f, kRelu ? o[off + c] : 0.f,
                            t1, t2);
      a1[c] += t1;
      a2[c] += t2;
    }
  }
}

template <bool kBwd, bool kRelu>
void bn_sums_plane_impl(const float* x, const float* g, const float* o, int64_t n, float k,
                        float* a1, float* a2) {
  using V = Vectorized<float>;
  V s1(0), s2(0);
  const V kv(k);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    V t1, t2;
    bn_terms<kBwd, kRelu>(V::loadu(x + i), kv, kBwd ? V::loadu(g + i) : V(0),
                          kRelu ? V::loadu(o + i) : V(0), t1, t2);
    s1 = s1 + t1;
    s2 = s2 + t2;
  }
  float r1 = at::vec::vec_reduce_all<float>([](V a, V b) { return a + b; }, s1);
  float r2 = at::vec::vec_reduce_all<float>([](V a, V b) { return a + b; }, s2);
  for (; i < n; ++i) {
    float t1, t2;
    bn_terms<kBwd, kRelu>(x[i], k, kBwd ? g[i] : 0.f, kRelu ? o[i] : 0.f, t1, t2);
    r1 += t1;
    r2 += t2;
  }
  *a1 += r1;
  *a2 += r2;
}

// dx = a * g' + b * (x - m) + kk; dr = g' (when dr != nullptr).
template <bool kRelu>
void bn_bwd_run(const float* x, const float* g, const float* o, float* dx, float* dr, int64_t n,
                const float* m, const float* a, const float* b, const float* kk, float m0,
                float a0, float b0, float k0) {
  using V = Vectorized<float>;
  auto at_ = [](const float* p, float v0, int64_t i) { return p ? V::loadu(p + i) : V(v0); };
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    V gv = V::loadu(g + i);
    if constexpr (kRelu) gv = relu_mask(gv, V::loadu(o + i));
    const V d = V::loadu(x + i) - at_(m, m0, i);
    (at_(a, a0, i) * gv + at_(b, b0, i) * d + at_(kk, k0, i)).store(dx + i);
    if (dr) gv.store(dr + i);
  }
  for (; i < n; ++i) {
    const float gv = kRelu ? relu_mask(g[i], o[i]) : g[i];
    const float d = x[i] - (m ? m[i] : m0);
    dx[i] = (a ? a[i] : a0) * gv + (b ? b[i] : b0) * d + (kk ? kk[i] : k0);
    if (dr) dr[i] = gv;
  }
}
}  // namespace

void bn_sums_rows_f32(const float* x, const float* g, const float* o, int64_t rows, int64_t C,
                      const float* k, float* a1, float* a2, bool bwd, bool relu) {
  if (!bwd) bn_sums_rows_impl<false, false>(x, g, o, rows, C, k, a1, a2);
  else if (relu) bn_sums_rows_impl<true, true>(x, g, o, rows, C, k, a1, a2);
  else bn_sums_rows_impl<true, false>(x, g, o, rows, C, k, a1, a2);
}

void bn_sums_plane_f32(const float* x, const float* g, const float* o, int64_t n, float k,
                       float* a1, float* a2, bool bwd, bool relu) {
  if (!bwd) bn_sums_plane_impl<false, false>(x, g, o, n, k, a1, a2);
  else if (relu) bn_sums_plane_impl<true, true>(x, g, o, n, k, a1, a2);
  else bn_sums_plane_impl<true, false>(x, g, o, n, k, a1, a2);
}

void bn_bwd_elemt_f32(const float* x, const float* g, const float* o, float* dx, float* dr,
                      int64_t n, const float* m, const float* a, const float* b, const float* kk,
                      float m0, float a0, float b0, float k0, bool relu) {
  if (relu) bn_bwd_run<true>(x, g, o, dx, dr, n, m, a, b, kk, m0, a0, b0, k0);
  else bn_bwd_run<false>(x, g, o, dx, dr, n, m, a, b, kk, m0, a0, b0, k0);
}

}  // namespace CPU_CAPABILITY
}  // namespace resnet_fast::cpu
