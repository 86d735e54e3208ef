// A block's residual branch and the LayerNorm after it (CPU float32), one pass each way.
//
// Forward: x = residual + dropout(y + bias) (y the bias-free output projection, dropout's mask from philox.h)
// and the LayerNorm of x that feeds the next sublayer, normed = (x - mean) * rstd * gamma + beta, row by
// row while the row is in L1. Backward: the gradient reaching x is the one from later residuals plus
// LayerNorm's, rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = grad_normed * gamma; it goes to the
// residual as is and to y through the redrawn mask, and the bias, gamma and beta gradients are column sums
// in a fixed order, all in one pass over the rows. This replaces four passes forward and backward (dropout, LayerNorm, the add that
// accumulates the two gradients of x, the bias gradient's reduction) and PyTorch's LayerNorm kernels.
#include <torch/types.h>  // not torch/extension.h (with pybind11): that triples the compile time
#include <ATen/Parallel.h>
#include <cmath>
#include <optional>
#include <vector>

#include "philox.h"
#include "vector_math.h"

namespace {

using namespace lht;

void check_float(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(),
              "norm kernel: ", what, " must be a contiguous CPU float32 tensor");
}

void check_vector(const torch::Tensor& t, int64_t F, const char* what) {
  check_float(t, what);
  TORCH_CHECK(t.dim() == 1 && t.numel() == F, "norm kernel: ", what, " must be [F] for rows [..., F]");
}

}  // namespace

// y, residual [..., F]; bias, gamma, beta [F] -> (x, normed, stats [rows, 2] = (mean, rstd) per row)
std::vector<torch::Tensor> residual_norm_forward(torch::Tensor y, torch::Tensor bias, torch::Tensor residual,
                                                 int64_t seed, int64_t threshold, double scale, torch::Tensor gamma,
                                                 torch::Tensor beta, double eps) {
  check_float(y, "y");
  check_float(residual, "the residual");
  TORCH_CHECK(y.dim() >= 1 && residual.sizes() == y.sizes(), "norm kernel: the residual must have y's shape");
  TORCH_CHECK(threshold >= 0 && threshold < (1 << 15), "norm kernel: threshold in [0, 2^15)");
  const int64_t F = y.size(-1), rows = F ? y.numel() / F : 0;
  check_vector(bias, F, "the bias");
  check_vector(gamma, F, "the norm weight");
  check_vector(beta, F, "the norm bias");
  auto x = torch::empty_like(y);
  auto normed = torch::empty_like(y);
  auto stats = torch::empty({rows, 2}, y.options());
  const float *yp = y.data_ptr<float>(), *rp = residual.data_ptr<float>(), *bp = bias.data_ptr<float>();
  const float *gp = gamma.data_ptr<float>(), *ep = beta.data_ptr<float>();
  float *xp = x.data_ptr<float>(), *np = normed.data_ptr<float>(), *sp = stats.data_ptr<float>();
  const bool vectors = F % W == 0;  // then every row starts a whole mask vector
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(F, 1)), [&](int64_t begin, int64_t end) {
    KeepMask mask(seed, threshold, scale);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * F;
      const float *yr = yp + o, *rr = rp + o;
      float *xr = xp + o, *nr = np + o;
      vf acc = splat(0.f);
      float total = 0.f;
      int64_t c = 0;
      if (vectors)
        for (; c < F; c += W) {
          const vf v = load(rr + c) + (load(yr + c) + load(bp + c)) * mask.aligned16(o + c);
          store(xr + c, v);
          acc += v;
        }
      for (; c < F; ++c) total += (xr[c] = rr[c] + (yr[c] + bp[c]) * mask.at(o + c));
      const float mean = (sum_lanes(acc) + total) / float(F);
      // the variance from the row in L1 again, about the mean (no cancellation of sum x^2 - F mean^2)
      vf dev = splat(0.f);
      float dev_tail = 0.f;
      c = 0;
      for (; c + W <= F; c += W) {
        const vf d = load(xr + c) - mean;
        dev += d * d;
      }
      for (; c < F; ++c) dev_tail += (xr[c] - mean) * (xr[c] - mean);
      const float rstd = 1.f / std::sqrt((sum_lanes(dev) + dev_tail) / float(F) + float(eps));
      c = 0;
      for (; c + W <= F; c += W) store(nr + c, (load(xr + c) - mean) * rstd * load(gp + c) + load(ep + c));
      for (; c < F; ++c) nr[c] = (xr[c] - mean) * rstd * gp[c] + ep[c];
      sp[2 * r] = mean;
      sp[2 * r + 1] = rstd;
    }
  });
  return {x, normed, stats};
}

// grad_x (the gradient of x from later residuals; none when x had no other use) and grad_normed [..., F],
// x and stats from the forward -> (grad of the residual = the whole gradient of x, grad of y, grad of bias,
// gamma and beta)
std::vector<torch::Tensor> residual_norm_backward(std::optional<torch::Tensor> grad_x, torch::Tensor grad_normed,
                                                  torch::Tensor x, torch::Tensor stats, torch::Tensor gamma,
                                                  int64_t seed, int64_t threshold, double scale) {
  check_float(grad_normed, "the gradient of the norm");
  check_float(x, "x");
  check_float(stats, "stats");
  TORCH_CHECK(x.dim() >= 1 && grad_normed.sizes() == x.sizes(), "norm kernel: gradient and x of one shape");
  if (grad_x) {
    check_float(*grad_x, "the gradient of x");
    TORCH_CHECK(grad_x->sizes() == x.sizes(), "norm kernel: gradient and x of one shape");
  }
  const int64_t F = x.size(-1), rows = F ? x.numel() / F : 0;
  check_vector(gamma, F, "the norm weight");
  TORCH_CHECK(stats.numel() == 2 * rows, "norm kernel: stats must be [rows, 2]");
  auto total = torch::empty_like(x);
  auto grad_y = torch::empty_like(x);
  auto grad_bias = torch::empty({F}, x.options());
  auto grad_gamma = torch::empty({F}, x.options());
  auto grad_beta = torch::empty({F}, x.options());
  const float* gxp = grad_x ? grad_x->data_ptr<float>() : nullptr;
  const float *gnp = grad_normed.data_ptr<float>(), *xp = x.data_ptr<float>(), *sp = stats.data_ptr<float>();
  const float* gp = gamma.data_ptr<float>();
  float *tp = total.data_ptr<float>(), *dyp = grad_y.data_ptr<float>();
  // Rows in fixed chunks, each row read once while in L1; every chunk leaves its float column partials of
  // the three parameter gradients, summed below in chunk order (so the sums do not depend on the threads).
  constexpr int64_t CHUNK = 64;
  const int64_t chunks = (rows + CHUNK - 1) / CHUNK;
  std::vector<float> partials(chunks * 3 * F);
  const bool vectors = F % W == 0;  // then every row starts a whole mask vector
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    KeepMask mask(seed, threshold, scale);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* p_bias = partials.data() + chunk * 3 * F;
      float *p_gamma = p_bias + F, *p_beta = p_bias + 2 * F;
      std::fill(p_bias, p_bias + 3 * F, 0.f);
      for (int64_t r = chunk * CHUNK; r < std::min(rows, (chunk + 1) * CHUNK); ++r) {
        const int64_t o = r * F;
        const float *gn = gnp + o, *xr = xp + o, *gx = gxp ? gxp + o : nullptr;
        float *t = tp + o, *dy = dyp + o;
        const float mean = sp[2 * r], rstd = sp[2 * r + 1];
        // the two row means LayerNorm's gradient needs, before any column can be written
        vf va = splat(0.f), vb = splat(0.f);
        float a = 0.f, b = 0.f;
        int64_t c = 0;
        for (; c + W <= F; c += W) {
          const vf g = load(gn + c) * load(gp + c);
          va += g;
          vb += g * ((load(xr + c) - mean) * rstd);
        }
        for (; c < F; ++c) {
          const float g = gn[c] * gp[c];
          a += g;
          b += g * ((xr[c] - mean) * rstd);
        }
        a = (sum_lanes(va) + a) / float(F);
        b = (sum_lanes(vb) + b) / float(F);
        c = 0;
        if (vectors)
          for (; c < F; c += W) {
            const vf xhat = (load(xr + c) - mean) * rstd, g = load(gn + c);
            vf v = (g * load(gp + c) - a - xhat * b) * rstd;
            if (gx) v += load(gx + c);
            store(t + c, v);
            const vf d = v * mask.aligned16(o + c);
            store(dy + c, d);
            store(p_bias + c, load(p_bias + c) + d);
            store(p_gamma + c, load(p_gamma + c) + g * xhat);
            store(p_beta + c, load(p_beta + c) + g);
          }
        for (; c < F; ++c) {
          const float xhat = (xr[c] - mean) * rstd;
          const float v = (gn[c] * gp[c] - a - xhat * b) * rstd + (gx ? gx[c] : 0.f);
          t[c] = v;
          dy[c] = v * mask.at(o + c);
          p_bias[c] += dy[c];
          p_gamma[c] += gn[c] * xhat;
          p_beta[c] += gn[c];
        }
      }
    }
  });
  float* sums[3] = {grad_bias.data_ptr<float>(), grad_gamma.data_ptr<float>(), grad_beta.data_ptr<float>()};
  at::parallel_for(0, 3 * F, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double sum = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partials[chunk * 3 * F + j];
      sums[j / F][j % F] = float(sum);
    }
  });
  return {total, grad_y, grad_bias, grad_gamma, grad_beta};
}
