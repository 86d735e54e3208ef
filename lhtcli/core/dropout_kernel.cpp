// Inverted dropout on CPU (float32) in one pass: out = x * (keep ? scale : 0), keep = u >= threshold for a
// 15-bit uniform u per value. The u come from Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC'11), counter-based: value i's bits depend only on (seed, i), so they are drawn in parallel,
// in any order, and redrawn by the backward instead of being stored. One 128-bit Philox block gives the
// 16-bit words of values 8c .. 8c + 7 (low half of word 0 first); u is a word's low 15 bits.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <optional>

namespace {

constexpr uint32_t PHILOX_M0 = 0xD2511F53u, PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u, PHILOX_W1 = 0xBB67AE85u;
constexpr int LANES = 16;           // Philox blocks drawn together, one per vector lane
constexpr int64_t GROUP = 8 * LANES;  // values per group: 16 blocks x 4 words x 2 halves
typedef uint32_t u32v __attribute__((vector_size(LANES * 4)));
typedef uint64_t u64v __attribute__((vector_size(LANES * 8)));
typedef float f32v __attribute__((vector_size(LANES * 4)));
typedef int32_t i32v __attribute__((vector_size(LANES * 4)));

// c * m as (high, low) 32-bit halves of the 64-bit products
inline void mul_hi_lo(u32v c, uint32_t m, u32v* hi, u32v* lo) {
  const u64v p = __builtin_convertvector(c, u64v) * uint64_t(m);
  *hi = __builtin_convertvector(p >> 32, u32v);
  *lo = __builtin_convertvector(p, u32v);
}

// Philox4x32-10 of the counters (block, 0, 0, 0) for blocks 16g .. 16g + 15 under key (k0, k1)
inline void philox_group(uint64_t g, uint32_t k0, uint32_t k1, u32v w[4]) {
  u32v lane;
  for (int l = 0; l < LANES; ++l) lane[l] = uint32_t(l);
  const uint64_t first = g * LANES;  // blocks of one group never straddle a 2^32 boundary
  u32v c0 = lane + uint32_t(first), c1 = u32v{} + uint32_t(first >> 32), c2 = u32v{}, c3 = u32v{};
  for (int round = 0; round < 10; ++round) {
    u32v hi0, lo0, hi1, lo1;
    mul_hi_lo(c0, PHILOX_M0, &hi0, &lo0);
    mul_hi_lo(c2, PHILOX_M1, &hi1, &lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += PHILOX_W0;
    k1 += PHILOX_W1;
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

}  // namespace

// residual + (x + bias) * keep * scale with the keep mask of (seed, threshold); bias [F] (x [..., F]) and
// residual (x's shape) are optional: the residual branch of a block, with its projection's bias, in one pass.
// The backward applies the call without them to the gradient. Value i = 128 g + 16 (2 word + half) + lane reads
// half `half` (low first) of word `word` of Philox block 16 g + lane.
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
  const bool whole_bias_vectors = F % LANES == 0;  // then 16 aligned values share one bias run
  at::parallel_for(0, (n + GROUP - 1) / GROUP, 256, [&](int64_t begin, int64_t end) {
    u32v w[4];
    for (int64_t g = begin; g < end; ++g) {
      philox_group(uint64_t(g), k0, k1, w);
      for (int part = 0; part < 8; ++part) {
        const int64_t i = g * GROUP + part * LANES;
        if (i >= n) break;
        const u32v u = (w[part / 2] >> (16 * (part % 2))) & 0x7fffu;
        const i32v keep = (i32v)(u >= uint32_t(threshold));  // all ones or zero per lane
        f32v factor;
        const i32v bits = keep & (i32v{} + __builtin_bit_cast(int32_t, sc));
        __builtin_memcpy(&factor, &bits, sizeof(factor));  // scale or +0
        if (i + LANES <= n && (!bp || whole_bias_vectors)) {
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
          for (int64_t l = 0; l < std::min<int64_t>(LANES, n - i); ++l) {
            const float v = (bp ? xp[i + l] + bp[(i + l) % F] : xp[i + l]) * factor[l];
            op[i + l] = rp ? rp[i + l] + v : v;
          }
        }
      }
    }
  });
  return out;
}
