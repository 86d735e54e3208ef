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

// the sum of a vector's lanes, in lane order
inline float sum_lanes(vf v) {
  float total = 0.f;
  for (int l = 0; l < W; ++l) total += v[l];
  return total;
}

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

// For a [rows x F] output written row by row, whose column sums are a bias gradient: calls fill(r, 0, F),
// which writes row r and returns where it is, and puts the column sums in sums[F]. Rows go in fixed chunks
// of 64, each thread taking whole chunks (contiguous memory) and leaving each chunk's float column partials;
// their totals, in double and in chunk order, do not depend on the thread count. (fill's column range
// arguments let a caller be written for column blocks too.)
template <class Fill>
void rows_with_column_sums(int64_t rows, int64_t F, float* sums, Fill fill) {
  constexpr int64_t CHUNK = 64;
  const int64_t chunks = (rows + CHUNK - 1) / CHUNK;
  std::vector<float> partials(chunks * F);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* part = partials.data() + chunk * F;
      std::fill(part, part + F, 0.f);
      for (int64_t r = chunk * CHUNK; r < std::min(rows, (chunk + 1) * CHUNK); ++r) {
        const float* row = fill(r, int64_t(0), F);
        for (int64_t j = 0; j < F; ++j) part[j] += row[j];
      }
    }
  });
  at::parallel_for(0, F, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double total = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partials[chunk * F + j];
      sums[j] = float(total);
    }
  });
}

}  // namespace lht
