// The Winograd ops on CPU (winograd.h says what the kernels compute): winograd_prepack, the
// weight transformed once, and conv_bias_act_winograd, act(conv3x3(x, w) + bias (+ residual))
// for stride 1, dilation 1, one group, on float32 or bfloat16 tensors (float32 arithmetic and
// transformed weights either way). Checks, layout and allocation are here; the arithmetic is
// in winograd_impl.h, compiled per instruction set.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "../checks.h"
#include "buffer_pool.h"
#include "kernels.h"
#include "winograd.h"

namespace resnet_fast::cpu {

int winograd_isa() {
  static const int isa = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    if (!use_avx2()) return 0;  // no AVX2, or ATEN_CPU_CAPABILITY=default
    const char* env = std::getenv("ATEN_CPU_CAPABILITY");
    if (env != nullptr && (std::strcmp(env, "avx2") == 0 || std::strcmp(env, "AVX2") == 0))
      return 256;
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return avx512 ? 512 : 256;
#else
    return 0;
#endif
  }();
  return isa;
}

bool gemm_bf16_supported() {
  static const bool ok = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    return winograd_isa() == 512 && __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
  }();
  return ok;
}

#if !(defined(__x86_64__) && defined(__GNUC__))
// Not x86-64: the kernel files compiled empty. winograd_isa() is 0 and gemm_bf16_supported()
// false, so these never run.
void AVX512BF16::conv1x1_bf16_kernel(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, bool, int64_t, int64_t,
                                     const at::Tensor&) {}
#define RESNET_FAST_NO_WINOGRAD(NS)                                                          \
  int64_t NS::winograd_k_block() { return 0; }                                               \
  void NS::winograd_weight_kernel(const at::Tensor&, int64_t, const at::Tensor&) {}          \
  void NS::winograd_conv_kernel(const at::Tensor&, const at::Tensor&, const at::Tensor&,     \
                                const at::Tensor&, const at::Tensor&, bool, int64_t, int64_t, \
                                int64_t, const at::Tensor&) {}                                \
  void NS::conv1x1_kernel(const at::Tensor&, const at::Tensor&, const at::Tensor&,           \
                          const at::Tensor&, bool, int64_t, int64_t, const at::Tensor&) {}
RESNET_FAST_NO_WINOGRAD(AVX2)
RESNET_FAST_NO_WINOGRAD(AVX512)
#undef RESNET_FAST_NO_WINOGRAD
#endif

namespace {

int64_t k_block() {
  return winograd_isa() == 512 ? AVX512::winograd_k_block() : AVX2::winograd_k_block();
}

void require_isa(const char* op) {
  TORCH_CHECK(winograd_isa() != 0, op,
              ": the Winograd kernels need a CPU with AVX2 and FMA (or AVX-512); this one has "
              "neither, or ATEN_CPU_CAPABILITY=default asks for none");
}

at::Tensor winograd_prepack_cpu(const at::Tensor& w, int64_t tile) {
  const char* op = "winograd_prepack";
  require_isa(op);
  TORCH_CHECK_VALUE(tile == 2 || tile == 4, op, ": expected tile 2 (F(2x2,3x3)) or 4 "
                    "(F(4x4,3x3)), got ", tile);
  TORCH_CHECK_VALUE(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3 && w.layout() == at::kStrided
                        && w.device().is_cpu(), op, ": expected a strided CPU weight of shape "
                    "(K, C, 3, 3), got ", Shape{w.sizes()}, " of layout ", w.layout(), " on ",
                    w.device());
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, op,
                   ": expected a float32 or bfloat16 weight, got ", DType{w.scalar_type()});
  const int64_t kb = k_block(), vl = kb / 2, K = w.size(0), C = w.size(1);
  // float32 either way: a bfloat16 weight widens exactly, and its transform is not rounded
  // back to bfloat16.
  // Every value, the zero padding included, is written by the kernel.
  at::Tensor out = at::empty({(tile + 2) * (tile + 2), (K + kb - 1) / kb, (C + vl - 1) / vl * vl,
                              kb}, w.options().dtype(at::kFloat));
  if (w.numel() == 0) return out.zero_();
  (winograd_isa() == 512 ? AVX512::winograd_weight_kernel : AVX2::winograd_weight_kernel)(
      w.to(at::kFloat).contiguous(), tile, out);
  return out;
}

// The output of an op of this file: a fresh channels_last tensor, or `into` (the in-place
// variants' residual: act(conv(x) + bias + into) is written over it) after checking it is one
// dense channels_last tensor (its shape and dtype are checked with the other arguments) that
// x, the dense input the kernel reads, does not overlap.
at::Tensor output_for(const at::Tensor& x, const std::vector<int64_t>& out_shape,
                      const at::Tensor& into, const char* op) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  if (!into.defined()) return empty_output(out_shape, x.options(), cl);
  TORCH_CHECK_VALUE(into.is_contiguous(cl), op, ": expected the residual (written in place) "
                    "dense in channels_last, got sizes ", Shape{into.sizes()}, " and strides ",
                    Shape{into.strides()});
  TORCH_CHECK_VALUE(at::get_overlap_status(into, x) == at::MemOverlapStatus::No, op,
                    ": expected the residual (written in place) apart from x, got two tensors "
                    "sharing memory");
  return into;
}

at::Tensor conv_bias_act_winograd_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                      const at::Tensor& packed, const at::Tensor& bias,
                                      at::IntArrayRef padding,
                                      const std::optional<at::Tensor>& residual, bool relu,
                                      const at::Tensor& into, const char* op) {
  require_isa(op);
  const auto out_shape = check_conv_args(x_in, weight, bias, {1, 1}, padding, {1, 1}, 1, residual,
                                         op);
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, op,
                   ": expected float32 or bfloat16 x, got ", DType{x_in.scalar_type()});
  TORCH_CHECK_VALUE(x_in.device().is_cpu() && weight.layout() == at::kStrided &&
                        weight.size(2) == 3 && weight.size(3) == 3,
                    op, ": expected CPU tensors and a strided 3x3 weight, got x on ",
                    x_in.device(), " and a weight ", Shape{weight.sizes()}, " of layout ",
                    weight.layout());
  const int64_t kb = k_block(), vl = kb / 2, C = weight.size(1), K = weight.size(0);
  const int64_t cp = (C + vl - 1) / vl * vl, kblocks = (K + kb - 1) / kb;
  TORCH_CHECK_VALUE(packed.dim() == 4 && (packed.size(0) == 16 || packed.size(0) == 36) &&
                        packed.size(1) == kblocks && packed.size(2) == cp && packed.size(3) == kb &&
                        packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
                        packed.device().is_cpu(),
                    op, ": expected winograd_prepack(weight) on this CPU (float32 of shape (16 or "
                    "36, ", kblocks, ", ", cp, ", ", kb, ")), got ", DType{packed.scalar_type()},
                    " ", Shape{packed.sizes()});
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = dense_in(x_in, cl);
  at::Tensor out = output_for(x, out_shape, into, op);
  if (out.numel() > 0) {
    (winograd_isa() == 512 ? AVX512::winograd_conv_kernel : AVX2::winograd_conv_kernel)(
        x, weight.contiguous(), packed, bias.contiguous(),
        residual.has_value() ? dense_in(*residual, cl) : at::Tensor(), relu,
        packed.size(0) == 16 ? 2 : 4, padding[0], padding[1], out);
  }
  return out;
}

at::Tensor conv_bias_act_winograd_op(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& packed, const at::Tensor& bias,
                                     at::IntArrayRef padding,
                                     const std::optional<at::Tensor>& residual, bool relu) {
  const at::Tensor out = conv_bias_act_winograd_cpu(x, weight, packed, bias, padding, residual,
                                                    relu, at::Tensor(), "conv_bias_act_winograd");
  return dense_in(out, layout_of(x));
}

void conv_bias_act_winograd_inplace(const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& packed, const at::Tensor& bias,
                                    at::IntArrayRef padding, const at::Tensor& residual,
                                    bool relu) {
  conv_bias_act_winograd_cpu(x, weight, packed, bias, padding, residual, relu, residual,
                             "conv_bias_act_winograd_");
}

// The weight gradient of a stride-1 3x3 conv (one group, dilation 1) by Winograd's F(2x2,3x3),
// float32: dW[k][c] = G^T (sum over 2x2 output tiles t of (A g_t[k] A^T) * (B^T d_t[c] B)) G,
// the same bilinear form as the forward's Y = A^T ((G w G^T) * (B^T d B)) A differentiated in
// w (g_t: a tile of the output gradient, d_t: its 4x4 input window, zero outside the image).
// Per tile position e of the 16, the sum over tiles is one GEMM, (K x T) . (T x C): 2.25x
// fewer products than the direct weight gradient. The tiles go in chunks (their transforms
// at most ~16 MB) whose GEMMs accumulate into one (16, K, C) sum (baddbmm, float32).
constexpr int64_t kWgradBlock = 64;  // channels a tile transforms at a time

at::Tensor conv3x3_weight_grad_cpu(const at::Tensor& x_in, const at::Tensor& g_in,
                                   at::IntArrayRef padding) {
  const char* op = "conv3x3_weight_grad";
  TORCH_CHECK_TYPE(x_in.scalar_type() == at::kFloat && g_in.scalar_type() == at::kFloat, op,
                   ": expected float32 x and grad, got ", DType{x_in.scalar_type()}, " and ",
                   DType{g_in.scalar_type()});
  TORCH_CHECK_VALUE(x_in.dim() == 4 && g_in.dim() == 4 && x_in.layout() == at::kStrided &&
                        g_in.layout() == at::kStrided && x_in.device().is_cpu() &&
                        g_in.device().is_cpu(),
                    op, ": expected strided 4-D CPU tensors x (N, C, H, W) and grad (N, K, P, Q), "
                    "got ", Shape{x_in.sizes()}, " on ", x_in.device(), " and ",
                    Shape{g_in.sizes()}, " on ", g_in.device());
  TORCH_CHECK_VALUE(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
                    ": expected 2 paddings >= 0, got ", padding);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t K = g_in.size(1), P = g_in.size(2), Q = g_in.size(3);
  const int64_t ph = padding[0], pw = padding[1];
  TORCH_CHECK_VALUE(g_in.size(0) == N && P == H + 2 * ph - 2 && Q == W + 2 * pw - 2 && P >= 1 &&
                        Q >= 1,
                    op, ": expected grad of shape (", N, ", K, ", H + 2 * ph - 2, ", ",
                    W + 2 * pw - 2, ") for x ", Shape{x_in.sizes()}, " and padding ", padding,
                    ", got ", Shape{g_in.sizes()});
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = dense_in(x_in, cl), g = dense_in(g_in, cl);
  const int64_t th = (P + 1) / 2, tw = (Q + 1) / 2, T = N * th * tw;
  if (T == 0 || K == 0 || C == 0) return at::zeros({K, C, 3, 3}, x.options());
  // Scratch and sums from the buffer cache: fresh pages for them cost as much as the GEMMs at
  // few tiles (512 channels at 16x16: 19.1 ms with fresh zeroed sums, 6.2 reused).
  const auto plain = at::MemoryFormat::Contiguous;
  at::Tensor acc = empty_output({16, K, C}, x.options(), plain);
  // 16 MB of transforms a chunk (at least 64 tiles): 4x that measured 1.25x slower at 128x128.
  const int64_t chunk = std::min<int64_t>(
      T, std::max<int64_t>(64, (int64_t{1} << 22) / (16 * (C + K))));
  at::Tensor v = empty_output({16, chunk, C}, x.options(), plain);
  at::Tensor z = empty_output({16, chunk, K}, x.options(), plain);
  const std::vector<float> zeros(std::max(C, K), 0.f);
  const float* xp = x.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t tc = std::min(chunk, T - t0);
    at::parallel_for(0, tc, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t t = t0 + i, n = t / (th * tw), ty = t / tw % th, tx = t % tw;
        const float* d[4][4];  // the input window, rows 2ty - ph .., columns 2tx - pw ..
        for (int r = 0; r < 4; ++r) {
          for (int s = 0; s < 4; ++s) {
            const int64_t y = 2 * ty - ph + r, xx = 2 * tx - pw + s;
            d[r][s] = (y >= 0 && y < H && xx >= 0 && xx < W)
                          ? xp + ((n * H + y) * W + xx) * C : zeros.data();
          }
        }
        const int64_t plane = chunk * C;
        for (int64_t c0 = 0; c0 < C; c0 += kWgradBlock) {
          const int64_t cb = std::min(kWgradBlock, C - c0);
          float u[16][kWgradBlock];  // the window's block of channels, then B^T d
          for (int e = 0; e < 16; ++e) std::memcpy(u[e], d[e / 4][e % 4] + c0, cb * sizeof(float));
          for (int s = 0; s < 4; ++s) {  // B^T d: rows
            for (int64_t c = 0; c < cb; ++c) {
              const float d0 = u[s][c], d1 = u[4 + s][c], d2 = u[8 + s][c], d3 = u[12 + s][c];
              u[s][c] = d0 - d2;
              u[4 + s][c] = d1 + d2;
              u[8 + s][c] = d2 - d1;
              u[12 + s][c] = d1 - d3;
            }
          }
          for (int r = 0; r < 4; ++r) {  // (B^T d) B: columns
            float* o = vp + (4 * r * chunk + i) * C + c0;
            const float* w = u[4 * r];
            const float* w1 = u[4 * r + 1];
            const float* w2 = u[4 * r + 2];
            const float* w3 = u[4 * r + 3];
            for (int64_t c = 0; c < cb; ++c) {
              o[c] = w[c] - w2[c];
              o[plane + c] = w1[c] + w2[c];
              o[2 * plane + c] = w2[c] - w1[c];
              o[3 * plane + c] = w1[c] - w3[c];
            }
          }
        }
        const float* q[2][2];  // the output-gradient tile, zero past an odd edge
        for (int r = 0; r < 2; ++r) {
          for (int s = 0; s < 2; ++s) {
            const int64_t y = 2 * ty + r, xx = 2 * tx + s;
            q[r][s] = (y < P && xx < Q) ? gp + ((n * P + y) * Q + xx) * K : zeros.data();
          }
        }
        const int64_t zplane = chunk * K;
        for (int64_t k0 = 0; k0 < K; k0 += kWgradBlock) {
          const int64_t kb = std::min(kWgradBlock, K - k0);
          float a[8][kWgradBlock];  // the tile's block of channels, then A g
          for (int e = 0; e < 4; ++e) std::memcpy(a[e], q[e / 2][e % 2] + k0, kb * sizeof(float));
          for (int64_t k = 0; k < kb; ++k) {  // A g: rows (g00, g01, g10, g11 in)
            const float g00 = a[0][k], g01 = a[1][k], g10 = a[2][k], g11 = a[3][k];
            a[0][k] = g00;
            a[1][k] = g01;
            a[2][k] = g00 + g10;
            a[3][k] = g01 + g11;
            a[4][k] = g00 - g10;
            a[5][k] = g01 - g11;
            a[6][k] = -g10;
            a[7][k] = -g11;
          }
          for (int r = 0; r < 4; ++r) {  // (A g) A^T: columns
            float* o = zp + (4 * r * chunk + i) * K + k0;
            const float* a0 = a[2 * r];
            const float* a1 = a[2 * r + 1];
            for (int64_t k = 0; k < kb; ++k) {
              o[k] = a0[k];
              o[zplane + k] = a0[k] + a1[k];
              o[2 * zplane + k] = a0[k] - a1[k];
              o[3 * zplane + k] = -a1[k];
            }
          }
        }
      }
    });
    const at::Tensor zt = z.narrow(1, 0, tc).transpose(1, 2), vt = v.narrow(1, 0, tc);
    if (t0 == 0) {
      at::bmm_out(acc, zt, vt);  // the first chunk's sums written, not added to zeros
    } else {
      acc.baddbmm_(zt, vt);
    }
  }
  // G^T acc G per (k, c): 4x4 -> 3x3, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
  at::Tensor out = empty_output({K, C, 3, 3}, x.options(), plain);
  const float* pp = acc.data_ptr<float>();
  float* wp = out.data_ptr<float>();
  const int64_t KC = K * C;
  std::atomic<bool> finite{true};
  at::parallel_for(0, KC, 1024, [&](int64_t b, int64_t e) {
    bool ok = true;
    for (int64_t j = b; j < e; ++j) {
      float h[4][3];  // acc G
      for (int a = 0; a < 4; ++a) {
        const float m0 = pp[(4 * a) * KC + j], m1 = pp[(4 * a + 1) * KC + j],
                    m2 = pp[(4 * a + 2) * KC + j], m3 = pp[(4 * a + 3) * KC + j];
        h[a][0] = m0 + .5f * (m1 + m2);
        h[a][1] = .5f * (m1 - m2);
        h[a][2] = .5f * (m1 + m2) + m3;
      }
      float* o = wp + j * 9;
      for (int s = 0; s < 3; ++s) {  // G^T (acc G)
        o[s] = h[0][s] + .5f * (h[1][s] + h[2][s]);
        o[3 + s] = .5f * (h[1][s] - h[2][s]);
        o[6 + s] = .5f * (h[1][s] + h[2][s]) + h[3][s];
      }
      for (int r = 0; r < 9; ++r) ok = ok && std::isfinite(o[r]);
    }
    if (!ok) finite = false;
  });
  // A non-finite value (a NaN or infinity in x or grad reaches every sum its tile enters,
  // even times a zero, and every sum reaches some output; or an overflow): torch's own direct
  // gradient instead, so NaN and infinities land where torch puts them.
  if (!finite) {
    return std::get<1>(at::convolution_backward(
        g, x, at::empty({K, C, 3, 3}, x.options()), std::nullopt, {1, 1}, padding, {1, 1},
        false, {0, 0}, 1, {false, true, false})).contiguous();
  }
  return out;
}

// The dtypes of the 1x1 GEMM here: float32, and bfloat16 where the CPU has AVX512-BF16.
void require_gemm_dtype(at::ScalarType t, const char* what, const char* op) {
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16, op, ": expected a float32 or "
                   "bfloat16 ", what, ", got ", DType{t});
  TORCH_CHECK(t == at::kFloat || gemm_bf16_supported(), op, ": bfloat16 needs a CPU with "
              "AVX-512 and AVX512-BF16; this one has ", winograd_isa() == 512 ? "no AVX512-BF16"
              : "no AVX-512", " (or ATEN_CPU_CAPABILITY asks for less)");
}

// The packed weight's shape for a (K, C, 1, 1) weight of dtype t: float32 (ceil(K / kb), C,
// kb); bfloat16 (ceil(K / 32), ceil(C / 2), 64), pairs of input channels side by side.
std::vector<int64_t> packed_shape(int64_t K, int64_t C, at::ScalarType t) {
  if (t == at::kBFloat16) return {(K + 31) / 32, (C + 1) / 2, 64};
  const int64_t kb = k_block();
  return {(K + kb - 1) / kb, C, kb};
}

at::Tensor conv1x1_prepack_cpu(const at::Tensor& w) {
  const char* op = "conv1x1_prepack";
  require_isa(op);
  TORCH_CHECK_VALUE(w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1 && w.layout() == at::kStrided
                        && w.device().is_cpu(), op, ": expected a strided CPU weight of shape "
                    "(K, C, 1, 1), got ", Shape{w.sizes()}, " of layout ", w.layout(), " on ",
                    w.device());
  require_gemm_dtype(w.scalar_type(), "weight", op);
  const int64_t K = w.size(0), C = w.size(1);
  const auto shape = packed_shape(K, C, w.scalar_type());
  if (w.scalar_type() == at::kBFloat16) {  // w[k][2q + t] at [k / 32][q][k % 32][t]
    return at::constant_pad_nd(w.reshape({K, C}), {0, 2 * shape[1] - C, 0, shape[0] * 32 - K})
        .view({shape[0], 32, shape[1], 2})
        .permute({0, 2, 1, 3})
        .reshape(shape);
  }
  return at::constant_pad_nd(w.reshape({K, C}), {0, 0, 0, shape[0] * shape[2] - K})
      .view({shape[0], shape[2], C})
      .permute({0, 2, 1})
      .contiguous();
}

at::Tensor conv_bias_act_1x1_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                 const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                                 at::IntArrayRef stride,
                                 const std::optional<at::Tensor>& residual, bool relu,
                                 const at::Tensor& into, const char* op) {
  require_isa(op);
  const auto out_shape = check_conv_args(x_in, weight, bias, stride, {0, 0}, {1, 1}, 1, residual,
                                         op);
  const at::ScalarType t = x_in.scalar_type();
  require_gemm_dtype(t, "x", op);
  TORCH_CHECK_VALUE(x_in.device().is_cpu() && weight.layout() == at::kStrided &&
                        weight.size(2) == 1 && weight.size(3) == 1,
                    op, ": expected CPU tensors and a strided 1x1 weight, got x on ",
                    x_in.device(), " and a weight ", Shape{weight.sizes()}, " of layout ",
                    weight.layout());
  const int64_t C = weight.size(1);
  const auto shape = packed_shape(weight.size(0), C, t);
  TORCH_CHECK_VALUE(packed.sizes() == at::IntArrayRef(shape) && packed.scalar_type() == t &&
                        packed.is_contiguous() && packed.device().is_cpu(),
                    op, ": expected conv1x1_prepack(weight) on this CPU (", DType{t},
                    " of shape ", Shape{shape}, "), got ", DType{packed.scalar_type()}, " ",
                    Shape{packed.sizes()});
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = dense_in(x_in, cl);
  at::Tensor out = output_for(x, out_shape, into, op);
  if (out.numel() == 0) return out;
  // No bias (a downsample conv): zeros, K values, to keep one epilogue.
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::zeros({weight.size(0)},
                                                                         x.options());
  if (C == 0) {  // no input channels: the epilogue on a sum of nothing
    at::Tensor v = b.view({1, -1, 1, 1}).expand(out_shape);
    if (residual.has_value()) v = v.add(*residual);
    out.copy_(relu ? at::relu(v) : v);
    return out;
  }
  (t == at::kBFloat16 ? AVX512BF16::conv1x1_bf16_kernel
                      : winograd_isa() == 512 ? AVX512::conv1x1_kernel : AVX2::conv1x1_kernel)(
      x, packed, b,
      residual.has_value() ? dense_in(*residual, cl) : at::Tensor(), relu, stride[0], stride[1],
      out);
  return out;
}

at::Tensor conv_bias_act_1x1_op(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, const std::optional<at::Tensor>& residual,
                                bool relu) {
  const at::Tensor out = conv_bias_act_1x1_cpu(x, weight, packed, bias, stride, residual, relu,
                                               at::Tensor(), "conv_bias_act_1x1");
  return dense_in(out, layout_of(x));
}

void conv_bias_act_1x1_inplace(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, const at::Tensor& residual, bool relu) {
  conv_bias_act_1x1_cpu(x, weight, packed, bias, stride, residual, relu, residual,
                        "conv_bias_act_1x1_");
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fast, CPU, m) {
  m.impl("winograd_prepack", &winograd_prepack_cpu);
  m.impl("conv_bias_act_winograd", &conv_bias_act_winograd_op);
  m.impl("conv_bias_act_winograd_", &conv_bias_act_winograd_inplace);
  m.impl("conv3x3_weight_grad", &conv3x3_weight_grad_cpu);
  m.impl("conv1x1_prepack", &conv1x1_prepack_cpu);
  m.impl("conv_bias_act_1x1", &conv_bias_act_1x1_op);
  m.impl("conv_bias_act_1x1_", &conv_bias_act_1x1_inplace);
}

}  // namespace resnet_fast::cpu
