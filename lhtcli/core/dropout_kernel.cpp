// Inverted dropout on CPU (float32) in one pass: out = x * (keep ? scale : 0), with the keep mask of
// philox.h (a 15-bit uniform per value from Philox4x32-10, keep = u >= threshold), drawn in parallel and
// redrawn by the backward instead of being stored.
#include <torch/types.h>  // not torch/extension.h (with pybind11): that triples the compile time
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <optional>

#include "philox.h"

using namespace lht;

// residual + (x + bias) * keep * scale with the keep mask of (seed, threshold); bias [F] (x [..., F]) and
// residual (x's shape) are optional: the residual branch of a block, with its projection's bias, in one pass.
// The backward applies the call without them to the gradient.
torch::Tensor dropout_philox(torch::Tensor x, int64_t seed, int64_t threshold, double scale,
                             std::optional<torch::Tensor> bias, std::optional<torch::Tensor> residual) {
  auto check = [](const torch::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(),
                "dropout kernel: contiguous CPU float32 tensors");
  };
  check(x);
  TORCH_CHECK(threshold >= 0 && threshold < (1 << 15), "dropout kernel: threshold in [0, 2^15)");
  const int64_t n = x.numel(), F = bias ? bias->numel() : 0;
  if (bias) {
    check(*bias);
    TORCH_CHECK(bias->dim() == 1 && x.dim() >= 1 && x.size(-1) == F, "dropout kernel: bias [F] for x [..., F]");
  }
  if (residual) {
    check(*residual);
    TORCH_CHECK(residual->sizes() == x.sizes(), "dropout kernel: the residual must have x's shape");
  }
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const float* rp = residual ? residual->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const uint32_t k0 = uint32_t(uint64_t(seed)), k1 = uint32_t(uint64_t(seed) >> 32);
  const float sc = float(scale);
  const bool whole_bias_vectors = F % PHILOX_LANES == 0;  // then 16 aligned values share one bias run
  at::parallel_for(0, (n + PHILOX_GROUP - 1) / PHILOX_GROUP, 256, [&](int64_t begin, int64_t end) {
    u32v w[4];
    for (int64_t g = begin; g < end; ++g) {
      philox_group(uint64_t(g), k0, k1, w);
      for (int part = 0; part < 8; ++part) {
        const int64_t i = g * PHILOX_GROUP + part * PHILOX_LANES;
        if (i >= n) break;
        const f32v factor = keep_factors(w, part, uint32_t(threshold), sc);
        if (i + PHILOX_LANES <= n && (!bp || whole_bias_vectors)) {
          f32v xv, add;
          __builtin_memcpy(&xv, xp + i, sizeof(xv));
          if (bp) {
            __builtin_memcpy(&add, bp + i % F, sizeof(add));
            xv += add;
          }
          xv *= factor;
          if (rp) {
            __builtin_memcpy(&add, rp + i, sizeof(add));
            xv = add + xv;
          }
          __builtin_memcpy(op + i, &xv, sizeof(xv));
        } else {
          for (int64_t l = 0; l < std::min<int64_t>(PHILOX_LANES, n - i); ++l) {
            const float v = (bp ? xp[i + l] + bp[(i + l) % F] : xp[i + l]) * factor[l];
            op[i + l] = rp ? rp[i + l] + v : v;
          }
        }
      }
    }
  });
  return out;
}
