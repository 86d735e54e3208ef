// Inverted dropout on CPU (float32) in one pass: out = x * (keep ? scale : 0) with keep read from 15-bit
// random integers (bits & 0x7fff >= threshold), the integers lhtcli.model.Dropout draws from torch's
// generator. The same call applies the mask to the output gradient, so the backward saves only the
// 2-byte integers. Bit-identical to the PyTorch expression it replaces (x * (keep * scale)): each value is
// multiplied by exactly 0 or scale.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

torch::Tensor dropout_apply(torch::Tensor x, torch::Tensor bits, int64_t threshold, double scale) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "dropout kernel: a contiguous CPU float32 tensor");
  TORCH_CHECK(bits.scalar_type() == torch::kShort && bits.is_contiguous() && bits.numel() == x.numel(),
              "dropout kernel: one contiguous int16 per value");
  TORCH_CHECK(threshold >= 0 && threshold < (1 << 15), "dropout kernel: threshold in [0, 2^15)");
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const int16_t* bp = bits.data_ptr<int16_t>();
  float* op = out.data_ptr<float>();
  const float sc = float(scale);
  at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    const __m256i low15 = _mm256_set1_epi32(0x7fff), below = _mm256_set1_epi32(int(threshold) - 1);
    const __m256 vs = _mm256_set1_ps(sc);
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
      const __m256i b = _mm256_and_si256(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i*)(bp + i))), low15);
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(b, below));  // b >= threshold
      const __m256 factor = _mm256_and_ps(keep, vs);  // scale or +0
      _mm256_storeu_ps(op + i, _mm256_mul_ps(_mm256_loadu_ps(xp + i), factor));
    }
    for (; i < end; ++i) op[i] = xp[i] * (((bp[i] & 0x7fff) >= threshold) ? sc : 0.f);
  });
  return out;
}
