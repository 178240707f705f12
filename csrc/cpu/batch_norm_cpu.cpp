// Training BatchNorm fused with (+ residual) and ReLU on CPU: bn_act_fwd and bn_act_bwd.
//
// Forward, two passes over x: per-channel batch statistics, then the apply pass fused with the
// residual add and ReLU (our scale_shift_act kernel computing (x - mean) * (w * invstd) + b).
// Backward, two passes: the per-channel sums sum(g') and sum(g' * (x - mean)) with
// g' = grad, 0 where out <= 0, then dx (and d residual = g') in one elementwise pass.
// Eager PyTorch runs BN (2 passes), add and ReLU as separate passes forward and backward.
//
// Sums: shifted by the channel's first value (so a large mean does not cancel the variance
// away), accumulated in the opmath type over blocks of at most kBlock rows and merged in double,
// in a fixed chunk order: the result does not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../checks.h"
#include "buffer_pool.h"
#include "kernels.h"

namespace resnet_fast::cpu {
namespace {

constexpr int64_t kBlock = 256;        // rows summed in opmath before a flush to double

// Geometry of x viewed as N x C x HW, in either layout.
struct Geo {
  int64_t n, c, hw;
  bool cl;  // channels_last: element (n, c, s) at (n * hw + s) * c + c_idx
  int64_t count() const { return n * hw; }
};

Geo geo_of(const at::Tensor& x, at::MemoryFormat fmt) {
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t hw = x.numel() / std::max<int64_t>(n * c, 1);
  return {n, c, hw, fmt == at::MemoryFormat::ChannelsLast};
}

// Per-channel sums S1, S2 of two terms per element: the statistics (x - K, (x - K)^2) and the
// backward (g', g' * (x - mean)). rows_fn(r0, n, a1, a2) adds the terms of n channels_last rows
// from row r0 into per-channel accumulators; plane_fn(base, n, k_c, a1, a2) those of n
// contiguous values of channel c from element base (NCHW). Accumulation in acc_t over at most
// kBlock rows / elements at a time, merged in double in a fixed order.
template <typename acc_t, typename RowsFn, typename PlaneFn>
void channel_sums(const Geo& g, RowsFn rows_fn, PlaneFn plane_fn, std::vector<double>& s1,
                  std::vector<double>& s2) {
  const int64_t C = g.c;
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  if (g.cl) {
    const int64_t rows = g.count();
    // About 4 chunks per thread, whatever the size (uneven chunk counts idle a core).
    const int64_t want = 4 * at::get_num_threads();
    // Rounded to 16 rows, not kBlock: 16x2048x7x7 has 784 rows, and 256-row chunks split
    // them 512/272 between two threads.
    const int64_t chunk_rows = std::max<int64_t>(16, ((rows + want - 1) / want + 15) / 16 * 16);
    const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
    std::vector<double> p1(chunks * C, 0.0), p2(chunks * C, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> a1(C), a2(C);
      for (int64_t k = begin; k < end; ++k) {
        double* d1 = p1.data() + k * C;
        double* d2 = p2.data() + k * C;
        const int64_t r_end = std::min(rows, (k + 1) * chunk_rows);
        for (int64_t r0 = k * chunk_rows; r0 < r_end; r0 += kBlock) {
          std::fill(a1.begin(), a1.end(), acc_t(0));
          std::fill(a2.begin(), a2.end(), acc_t(0));
          rows_fn(r0, std::min(r_end, r0 + kBlock) - r0, a1.data(), a2.data());
          for (int64_t c = 0; c < C; ++c) {
            d1[c] += a1[c];
            d2[c] += a2[c];
          }
        }
      }
    });
    for (int64_t k = 0; k < chunks; ++k) {
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += p1[k * C + c];
        s2[c] += p2[k * C + c];
      }
    }
    return;
  }
  // NCHW: a channel's values are n planes of hw contiguous elements; one channel per task.
  constexpr int64_t kPlaneBlock = 16 * kBlock;  // vector lanes each sum kPlaneBlock / width
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double d1 = 0.0, d2 = 0.0;
      for (int64_t n = 0; n < g.n; ++n) {
        const int64_t base = (n * C + c) * g.hw;
        for (int64_t s0 = 0; s0 < g.hw; s0 += kPlaneBlock) {
          acc_t a1 = 0, a2 = 0;
          plane_fn(base + s0, std::min(g.hw - s0, kPlaneBlock), c, a1, a2);
          d1 += a1;
          d2 += a2;
        }
      }
      s1[c] = d1;
      s2[c] = d2;
    }
  });
}

// Generic (any dtype) rows_fn / plane_fn from a per-element term(e, c) -> (t1, t2).
template <typename acc_t, typename Term>
auto generic_sums(const Geo& g, Term term) {
  const int64_t C = g.c;
  auto rows_fn = [=](int64_t r0, int64_t n, acc_t* a1, acc_t* a2) {
    for (int64_t r = r0; r < r0 + n; ++r) {
      for (int64_t c = 0; c < C; ++c) {
        const auto t = term(r * C + c, c);
        a1[c] += t.first;
        a2[c] += t.second;
      }
    }
  };
  auto plane_fn = [=](int64_t base, int64_t n, int64_t c, acc_t& a1, acc_t& a2) {
    for (int64_t e = base; e < base + n; ++e) {
      const auto t = term(e, c);
      a1 += t.first;
      a2 += t.second;
    }
  };
  return std::make_pair(rows_fn, plane_fn);
}

// f(e, c) for every element e (channel c), parallel, in x's layout.
template <typename F>
void for_each_element(const Geo& g, F f) {
  if (g.cl) {
    const int64_t C = g.c;
    at::parallel_for(0, g.count(), std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t c = 0; c < C; ++c) f(r * C + c, c);
      }
    });
    return;
  }
  at::parallel_for(0, g.n * g.c, std::max<int64_t>(1, 32768 / std::max<int64_t>(g.hw, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % g.c;
      for (int64_t s = 0; s < g.hw; ++s) f(p * g.hw + s, c);
    }
  });
}

// The float32 rows_fn / plane_fn: the vectorized loops of kernels_impl.h for this CPU.
auto f32_sums(const Geo& g, const float* x, const float* gr, const float* o, const float* k,
              bool bwd, bool relu) {
  const bool avx2 = use_avx2();
  const int64_t C = g.c;
  auto rows_fn = [=](int64_t r0, int64_t n, float* a1, float* a2) {
    const int64_t off = r0 * C;
    (avx2 ? AVX2::bn_sums_rows_f32 : DEFAULT::bn_sums_rows_f32)(
        x + off, gr ? gr + off : nullptr, o ? o + off : nullptr, n, C, k, a1, a2, bwd, relu);
  };
  auto plane_fn = [=](int64_t base, int64_t n, int64_t c, float& a1, float& a2) {
    (avx2 ? AVX2::bn_sums_plane_f32 : DEFAULT::bn_sums_plane_f32)(
        x + base, gr ? gr + base : nullptr, o ? o + base : nullptr, n, k[c], &a1, &a2, bwd, relu);
  };
  return std::make_pair(rows_fn, plane_fn);
}

at::ScalarType stat_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_fwd_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, bool relu,
    double eps) {
  TORCH_CHECK(x_in.device().is_cpu(), "batch_norm_act (cpu): expected CPU tensors, got ",
              x_in.device());
  check_bn_fwd_args(x_in, weight, bias, residual);
  const auto fmt = layout_of(x_in);
  const at::Tensor x = dense_in(x_in, fmt);
  const Geo g = geo_of(x, fmt);
  const auto st = stat_type(x);
  at::Tensor mean = at::empty({g.c}, x.options().dtype(st));
  at::Tensor var = at::empty({g.c}, x.options().dtype(st));
  at::Tensor out = empty_output(x.sizes(), x.options(), fmt);
  if (g.c == 0) return {out, mean, var};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    // Shift: each channel's first value (element (0, c, 0)).
    std::vector<acc_t> shift(g.c);
    for (int64_t c = 0; c < g.c; ++c) shift[c] = static_cast<acc_t>(xp[g.cl ? c : c * g.hw]);
    std::vector<double> s1, s2;
    if constexpr (std::is_same_v<scalar_t, float>) {
      const auto [rows_fn, plane_fn] = f32_sums(g, reinterpret_cast<const float*>(xp), nullptr,
                                                nullptr, reinterpret_cast<const float*>(shift.data()),
                                                false, false);
      channel_sums<float>(g, rows_fn, plane_fn, s1, s2);
    } else {
      const auto [rows_fn, plane_fn] = generic_sums<acc_t>(g, [&](int64_t e, int64_t c) {
        const acc_t d = static_cast<acc_t>(xp[e]) - shift[c];
        return std::pair<acc_t, acc_t>(d, d * d);
      });
      channel_sums<acc_t>(g, rows_fn, plane_fn, s1, s2);
    }
    const double n = static_cast<double>(g.count());
    auto* mp = mean.data_ptr<acc_t>();
    auto* vp = var.data_ptr<acc_t>();
    for (int64_t c = 0; c < g.c; ++c) {
      const double m = s1[c] / n;
      mp[c] = static_cast<acc_t>(shift[c] + m);
      vp[c] = static_cast<acc_t>(std::max(s2[c] / n - m * m, 0.0));
    }
  });
  // Apply, fused with the add and ReLU: (x - mean) * (w * invstd) + b, x - mean first so a
  // large mean cannot cancel digits away.
  const at::Tensor invstd = var.add(eps).rsqrt();
  const at::Tensor scale = weight.has_value() ? weight->to(st).mul(invstd) : invstd;
  const at::Tensor shift = bias.has_value() ? bias->to(st) : at::zeros_like(mean);
  const at::Tensor r = residual.has_value() ? dense_in(*residual, fmt) : at::Tensor();
  scale_shift_act(x, scale, shift, r, relu, g.cl, out, mean);
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& out_in,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var,
    double eps, bool relu, bool residual_grad) {
  check_bn_bwd_args(grad_in, x_in, out_in, weight);
  const auto fmt = layout_of(x_in);
  const at::Tensor x = dense_in(x_in, fmt);
  const at::Tensor grad = dense_in(grad_in, fmt);
  const at::Tensor out = dense_in(out_in, fmt);
  const Geo g = geo_of(x, fmt);
  const auto st = stat_type(x);
  TORCH_CHECK(mean.scalar_type() == st && var.scalar_type() == st && mean.numel() == g.c &&
                  var.numel() == g.c,
              "batch_norm_act backward: expected mean and var of shape (", g.c, ",) in ", st,
              " (what the forward returned), got ", mean.sizes(), " ", mean.scalar_type(),
              " and ", var.sizes(), " ", var.scalar_type());
  // Pooled buffers (buffer_pool.h): fresh pages would cost more than the pass itself.
  at::Tensor dx = empty_output(x.sizes(), x.options(), fmt);
  at::Tensor dres = residual_grad ? empty_output(x.sizes(), x.options(), fmt)
                                  : at::empty({0}, x.options());
  at::Tensor dweight = at::empty({g.c}, x.options().dtype(st));
  at::Tensor dbias = at::empty({g.c}, x.options().dtype(st));
  if (g.c == 0 || x.numel() == 0) return {dx, dweight.zero_(), dbias.zero_(), dres};

  const at::Tensor invstd_t = var.add(eps).rsqrt().contiguous();
  const at::Tensor w_t = weight.has_value() ? weight->to(st).contiguous()
                                            : at::ones({g.c}, x.options().dtype(st));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* op = out.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* ip = invstd_t.const_data_ptr<acc_t>();
    const acc_t* wp = w_t.const_data_ptr<acc_t>();
    // g' = grad, 0 where out <= 0 (a NaN output passes its gradient, as torch.relu's
    // backward, threshold_backward, does).
    auto masked = [&](int64_t e) -> acc_t {
      const acc_t gv = static_cast<acc_t>(gp[e]);
      return (relu && static_cast<acc_t>(op[e]) <= acc_t(0)) ? acc_t(0) : gv;
    };
    std::vector<double> sg, sgx;
    if constexpr (std::is_same_v<scalar_t, float>) {
      const auto [rows_fn, plane_fn] = f32_sums(
          g, reinterpret_cast<const float*>(xp), reinterpret_cast<const float*>(gp),
          relu ? reinterpret_cast<const float*>(op) : nullptr,
          reinterpret_cast<const float*>(mp), true, relu);
      channel_sums<float>(g, rows_fn, plane_fn, sg, sgx);
    } else {
      const auto [rows_fn, plane_fn] = generic_sums<acc_t>(g, [&](int64_t e, int64_t c) {
        const acc_t gm = masked(e);
        return std::pair<acc_t, acc_t>(gm, gm * (static_cast<acc_t>(xp[e]) - mp[c]));
      });
      channel_sums<acc_t>(g, rows_fn, plane_fn, sg, sgx);
    }
    // dx = w * invstd * (g' - sg / n - xhat * sgx * invstd / n), xhat = (x - mean) * invstd,
    // as dx = a * g' + b * (x - mean) + k per channel (x - mean first: no cancellation).
    const double n = static_cast<double>(g.count());
    std::vector<acc_t> a(g.c), b(g.c), k(g.c);
    auto* dwp = dweight.data_ptr<acc_t>();
    auto* dbp = dbias.data_ptr<acc_t>();
    for (int64_t c = 0; c < g.c; ++c) {
      const double inv = ip[c], w = wp[c];
      dbp[c] = static_cast<acc_t>(sg[c]);
      dwp[c] = static_cast<acc_t>(sgx[c] * inv);
      const double ac = w * inv;
      const double bc = -ac * inv * inv * sgx[c] / n;
      a[c] = static_cast<acc_t>(ac);
      b[c] = static_cast<acc_t>(bc);
      k[c] = static_cast<acc_t>(-ac * sg[c] / n);
    }
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    scalar_t* drp = residual_grad ? dres.data_ptr<scalar_t>() : nullptr;
    if constexpr (std::is_same_v<scalar_t, float>) {
      const auto elemt = use_avx2() ? AVX2::bn_bwd_elemt_f32 : DEFAULT::bn_bwd_elemt_f32;
      // (The casts only compile the branch for other dtypes; it runs for float alone.)
      const float* xf = reinterpret_cast<const float*>(xp);
      const float* gf = reinterpret_cast<const float*>(gp);
      const float* o = relu ? reinterpret_cast<const float*>(op) : nullptr;
      const float* mf = reinterpret_cast<const float*>(mp);
      float* dxf = reinterpret_cast<float*>(dxp);
      float* drf = reinterpret_cast<float*>(drp);
      const float* af = reinterpret_cast<const float*>(a.data());
      const float* bf = reinterpret_cast<const float*>(b.data());
      const float* kf = reinterpret_cast<const float*>(k.data());
      if (g.cl) {
        const int64_t C = g.c;
        at::parallel_for(0, g.count(), std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)),
                         [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t off = r * C;
            elemt(xf + off, gf + off, o ? o + off : nullptr, dxf + off, drf ? drf + off : nullptr,
                  C, mf, af, bf, kf, 0, 0, 0, 0, relu);
          }
        });
      } else {
        at::parallel_for(0, g.n * g.c, std::max<int64_t>(1, 32768 / std::max<int64_t>(g.hw, 1)),
                         [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) {
            const int64_t c = p % g.c, off = p * g.hw;
            elemt(xf + off, gf + off, o ? o + off : nullptr, dxf + off, drf ? drf + off : nullptr,
                  g.hw, nullptr, nullptr, nullptr, nullptr, mf[c], af[c], bf[c], kf[c], relu);
          }
        });
      }
      return;
    }
    for_each_element(g, [&](int64_t e, int64_t c) {
      const acc_t gm = masked(e);
      dxp[e] = static_cast<scalar_t>(a[c] * gm + b[c] * (static_cast<acc_t>(xp[e]) - mp[c]) + k[c]);
      if (drp != nullptr) drp[e] = static_cast<scalar_t>(gm);
    });
  });
  return {dx, dweight, dbias, dres};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("bn_act_fwd", &bn_act_fwd_cpu);
  m.impl("bn_act_bwd", &bn_act_bwd_cpu);
}

}  // namespace resnet_fast::cpu
