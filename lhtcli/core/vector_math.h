// Shared by the elementwise kernels (CPU float32): 16-wide GCC vector types, which the compiler maps to
// AVX-512 or to pairs of AVX2 registers, a vectorised exp for non-positive arguments, and the column sums
// of a bias gradient in a fixed order.
#pragma once
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lht {

constexpr int W = 16;
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(float))));

inline vf splat(float a) { return vf{} + a; }

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) for x <= 0 (Cephes: 2^n exp(r), |r| <= ln2/2, ~1 ulp); 0 below -87.3, where the float result would
// be subnormal
inline vf exp_nonpositive(vf x) {
  const vf too_small = x < -87.3f ? splat(0.f) : splat(1.f);
  x = x < -87.3f ? splat(-87.3f) : x;
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * 1.44269504088896341f + magic) - magic;
  const vf r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 0.5f;
  const vf e = p * r * r + r + 1.f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return e * two_n * too_small;
}

// For a [rows x F] output written row by row, whose column sums are a bias gradient: calls fill(r, c0, k),
// which writes columns [c0, c0 + k) of row r and returns where they are, and puts the column sums in
// sums[F]. Column blocks are split across threads, each summing its columns over all rows in a fixed
// order (64-row partials in float, their total in double), so the sums do not depend on the thread count.
template <class Fill>
void rows_with_column_sums(int64_t rows, int64_t F, float* sums, Fill fill) {
  constexpr int64_t CHUNK = 64;
  const int64_t threads = at::get_num_threads();
  const int64_t block = std::clamp<int64_t>((F + threads * W - 1) / (threads * W) * W, W, 512);
  at::parallel_for(0, (F + block - 1) / block, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> part(block);
    std::vector<double> total(block);
    for (int64_t cb = begin; cb < end; ++cb) {
      const int64_t c0 = cb * block, k = std::min(block, F - c0);
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t r0 = 0; r0 < rows; r0 += CHUNK) {
        std::fill(part.begin(), part.end(), 0.f);
        for (int64_t r = r0; r < std::min(rows, r0 + CHUNK); ++r) {
          const float* row = fill(r, c0, k);
          for (int64_t j = 0; j < k; ++j) part[j] += row[j];
        }
        for (int64_t j = 0; j < k; ++j) total[j] += part[j];
      }
      for (int64_t j = 0; j < k; ++j) sums[c0 + j] = float(total[j]);
    }
  });
}

}  // namespace lht
