// Dropout's keep masks from Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11), counter-based: value i's bits depend only on (seed, i), so any kernel can draw or redraw any
// value's mask, in any order. Shared by the dropout pass and the fused residual + LayerNorm pass.
//
// Layout: one group of 16 Philox blocks (one per vector lane) covers 128 values. Value
// i = 128 g + 16 (2 word + half) + lane reads half `half` (low first) of word `word` of block 16 g + lane;
// its uniform is that 16-bit half's low 15 bits, and it is kept when the uniform is >= threshold.
#pragma once
#include <cstdint>
#include <cstring>

namespace lht {

constexpr int PHILOX_LANES = 16;                  // Philox blocks drawn together, one per vector lane
constexpr int64_t PHILOX_GROUP = 8 * PHILOX_LANES;  // values per group: 16 blocks x 4 words x 2 halves
typedef uint32_t u32v __attribute__((vector_size(PHILOX_LANES * 4)));
typedef uint64_t u64v __attribute__((vector_size(PHILOX_LANES * 8)));
typedef float f32v __attribute__((vector_size(PHILOX_LANES * 4)));
typedef int32_t i32v __attribute__((vector_size(PHILOX_LANES * 4)));

// c * m as (high, low) 32-bit halves of the 64-bit products
inline void mul_hi_lo(u32v c, uint32_t m, u32v* hi, u32v* lo) {
  const u64v p = __builtin_convertvector(c, u64v) * uint64_t(m);
  *hi = __builtin_convertvector(p >> 32, u32v);
  *lo = __builtin_convertvector(p, u32v);
}

// Philox4x32-10 of the counters (block, 0, 0, 0) for blocks 16g .. 16g + 15 under key (k0, k1)
inline void philox_group(uint64_t g, uint32_t k0, uint32_t k1, u32v w[4]) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  u32v lane;
  for (int l = 0; l < PHILOX_LANES; ++l) lane[l] = uint32_t(l);
  const uint64_t first = g * PHILOX_LANES;  // blocks of one group never straddle a 2^32 boundary
  u32v c0 = lane + uint32_t(first), c1 = u32v{} + uint32_t(first >> 32), c2 = u32v{}, c3 = u32v{};
  for (int round = 0; round < 10; ++round) {
    u32v hi0, lo0, hi1, lo1;
    mul_hi_lo(c0, M0, &hi0, &lo0);
    mul_hi_lo(c2, M1, &hi1, &lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

// Per-value factors (scale or +0) of the 16 values 128 g + 16 part .. + 15, from their group's words
inline f32v keep_factors(const u32v w[4], int part, uint32_t threshold, float scale) {
  const u32v u = (w[part / 2] >> (16 * (part % 2))) & 0x7fffu;
  const i32v keep = (i32v)(u >= threshold);  // all ones or zero per lane
  const i32v bits = keep & (i32v{} + __builtin_bit_cast(int32_t, scale));
  f32v factor;
  std::memcpy(&factor, &bits, sizeof(factor));
  return factor;
}

// The dropout factors of any value range, one Philox group drawn at a time (and reused while the values
// stay inside it).
class KeepMask {
 public:
  KeepMask(int64_t seed, int64_t threshold, double scale)
      : k0_(uint32_t(uint64_t(seed))), k1_(uint32_t(uint64_t(seed) >> 32)), threshold_(uint32_t(threshold)),
        scale_(float(scale)) {}

  // factors of values i .. i + 15 for i a multiple of 16
  f32v aligned16(int64_t i) {
    draw(i / PHILOX_GROUP);
    return keep_factors(w_, int((i % PHILOX_GROUP) / PHILOX_LANES), threshold_, scale_);
  }

  // factor of value i
  float at(int64_t i) {
    draw(i / PHILOX_GROUP);
    const int64_t o = i % PHILOX_GROUP;
    const int part = int(o / PHILOX_LANES), lane = int(o % PHILOX_LANES);
    const uint32_t u = (w_[part / 2][lane] >> (16 * (part % 2))) & 0x7fffu;
    return u >= threshold_ ? scale_ : 0.f;
  }

 private:
  void draw(int64_t g) {
    if (g != group_) {
      philox_group(uint64_t(g), k0_, k1_, w_);
      group_ = g;
    }
  }
  uint32_t k0_, k1_, threshold_;
  float scale_;
  int64_t group_ = -1;
  u32v w_[4];
};

}  // namespace lht
