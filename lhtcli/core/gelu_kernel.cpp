// Bias + exact (erf) GELU on CPU (float32), forward and backward in one pass each.
//
// The forward returns y = GELU(h + bias) and, when asked, the derivative GELU'(h + bias) = Phi(z) + z phi(z);
// the backward is then grad * derivative plus the bias gradient (column sums), instead of PyTorch's
// erf-and-exp recomputation over the pre-activation. Saving the derivative in place of the pre-activation
// keeps the memory the same and makes the MLP's GELU backward a multiply.
//
// Phi comes from erfc (Numerical Recipes' Chebyshev fit, relative error < 1.2e-7 everywhere), so the far
// negative tail keeps its relative precision (~z^2 * 6e-8 from rounding z^2: 1e-5 at z = -12), where
// PyTorch's float32 erf (absolute error ~1e-7) loses it entirely.
#include <torch/types.h>  // not torch/extension.h (with pybind11): that triples the compile time
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <vector>

#include "vector_math.h"

namespace {

using namespace lht;

// y = z Phi(z) and d = Phi(z) + z phi(z) for z = h + bias
inline vf gelu_parts(vf z, vf* derivative) {
  const vf x = (z < 0.f ? -z : z) * 0.70710678118654752f;  // |z| / sqrt(2)
  const vf t = 1.f / (0.5f * x + 1.f);
  vf poly = splat(0.17087277f);
  for (float c : {-0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f, -0.18628806f, 0.09678418f, 0.37409196f,
                  1.00002368f})
    poly = poly * t + c;
  const vf gauss = exp_nonpositive(z * z * -0.5f);  // exp(-z^2 / 2): one rounding before the exp
  const vf half_erfc = 0.5f * t * gauss * exp_nonpositive(poly * t - 1.26551223f);  // Phi(-|z|)
  const vf phi = z < 0.f ? half_erfc : 1.f - half_erfc;
  *derivative = phi + z * gauss * 0.39894228040143268f;  // 1 / sqrt(2 pi)
  return z * phi;
}

void check_matrix(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() >= 1,
              "gelu kernel: ", what, " must be a contiguous CPU float32 tensor");
}

}  // namespace

// h [..., F], bias [F] -> (GELU(h + bias), its derivative or an empty tensor)
std::vector<torch::Tensor> bias_gelu_forward(torch::Tensor h, torch::Tensor bias, bool with_derivative) {
  check_matrix(h, "the input");
  check_matrix(bias, "the bias");
  const int64_t F = bias.numel();
  TORCH_CHECK(bias.dim() == 1 && h.size(-1) == F, "gelu kernel: bias [F] for an input [..., F]");
  auto y = torch::empty_like(h);
  auto d = with_derivative ? torch::empty_like(h) : torch::empty({0}, h.options());
  const float* hp = h.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* dp = with_derivative ? d.data_ptr<float>() : nullptr;
  const int64_t rows = F ? h.numel() / F : 0;
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(F, 1)), [&](int64_t begin, int64_t end) {
    float zin[W], yout[W], dout[W];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * F;
      int64_t c = 0;
      vf dv;
      for (; c + W <= F; c += W) {
        const vf yv = gelu_parts(load(hp + o + c) + load(bp + c), &dv);
        store(yp + o + c, yv);
        if (dp) store(dp + o + c, dv);
      }
      if (c < F) {  // the last partial vector through a padded copy
        const int64_t k = F - c;
        for (int64_t j = 0; j < W; ++j) zin[j] = j < k ? hp[o + c + j] + bp[c + j] : 0.f;
        store(yout, gelu_parts(load(zin), &dv));
        store(dout, dv);
        std::memcpy(yp + o + c, yout, k * sizeof(float));
        if (dp) std::memcpy(dp + o + c, dout, k * sizeof(float));
      }
    }
  });
  return {y, d};
}

// grad, derivative [..., F] -> (grad * derivative, its column sums [F] (the bias gradient))
std::vector<torch::Tensor> bias_gelu_backward(torch::Tensor grad, torch::Tensor derivative) {
  check_matrix(grad, "the gradient");
  check_matrix(derivative, "the derivative");
  TORCH_CHECK(grad.sizes() == derivative.sizes(), "gelu kernel: gradient and derivative of one shape");
  const int64_t F = grad.size(-1), rows = F ? grad.numel() / F : 0;
  auto gh = torch::empty_like(grad);
  auto gb = torch::empty({F}, grad.options());
  const float* gp = grad.data_ptr<float>();
  const float* dp = derivative.data_ptr<float>();
  float* hp = gh.data_ptr<float>();
  float* bp = gb.data_ptr<float>();
  rows_with_column_sums(rows, F, bp, [&](int64_t r, int64_t c0, int64_t k) {
    const float* g = gp + r * F + c0;
    const float* d = dp + r * F + c0;
    float* out = hp + r * F + c0;
    for (int64_t j = 0; j < k; ++j) out[j] = g[j] * d[j];
    return out;
  });
  return {gh, gb};
}
