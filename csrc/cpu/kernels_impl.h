// The CPU kernels' bodies. Included by kernels_default.cpp and kernels_avx2.cpp, each of
// which defines CPU_CAPABILITY first, so every at::vec type and every function here exists
// once per instruction set, in its own namespace (as ATen does for its own kernels).
// Not a public header: include kernels.h for the entry points.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
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

}  // namespace CPU_CAPABILITY
}  // namespace resnet_fast::cpu
