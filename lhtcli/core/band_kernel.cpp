// ML-SWA on CPU (float32). Level 0: banded attention |i - j| <= w among each row's first `length`
// tokens, forward and backward, without masks or padded key windows. Levels >= 1 and [DOC]: the few
// boundary rows' extra keys, merged into level 0's output (extra_forward / extra_backward, below).
//
// Each block of QB query rows multiplies against exactly the keys its rows may reach (QB + 2w, clipped
// to the row's tokens); only the few columns at either end of a block fall outside a row's band, and
// those are skipped rather than masked. Forward returns the output and the log-sum-exp; backward
// takes the *merged* output and log-sum-exp of the whole ML-SWA softmax (the split-KV identity), so
// the gradients it returns are exact for the level-0 pairs even when higher levels add keys.
//
// Built on first use by lhtcli/core/native.py (torch.utils.cpp_extension, -O3 -march=native) into one
// module with the other kernels (bindings in native_module.cpp); matrix products go to the BLAS inside
// torch (sgemm_), the exponentials are AVX2/FMA (AVX-512 where the CPU has it).
#include <torch/types.h>  // not torch/extension.h (with pybind11): that triples the compile time
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);

namespace {

// row-major C[M x N] = alpha * op(A)[M x K] * op(B)[K x N] + beta * C
inline void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                 int ldb, float beta, float* c, int ldc) {
  const char fa = ta ? 'T' : 'N', fb = tb ? 'T' : 'N';
  sgemm_(&fb, &fa, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

// Cephes expf: exp(x) = 2^n exp(r), |r| <= ln2 / 2, exp(r) = 1 + r + r^2 P(r) with these P coefficients
constexpr float EXP_POLY[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 0.5f};
constexpr int EXP_TERMS = sizeof(EXP_POLY) / sizeof(EXP_POLY[0]);

// exp of 8 floats (Cephes polynomial, ~1 ulp); -inf -> 0
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f), half = _mm256_set1_ps(0.5f);
  const __m256 c1 = _mm256_set1_ps(0.693359375f), c2 = _mm256_set1_ps(-2.12194440e-4f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, log2e, half));
  x = _mm256_fnmadd_ps(fx, c1, x);
  x = _mm256_fnmadd_ps(fx, c2, x);
  __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(EXP_POLY[0]);
  for (int i = 1; i < EXP_TERMS; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(EXP_POLY[i]));
  y = _mm256_fmadd_ps(y, z, x);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, y);
}

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

#ifdef __AVX512F__
// exp of 16 floats: exp8's polynomial, with 2^n applied by scalef (exact, and 0 below the range)
inline __m512 exp16(__m512 x) {
  const __m512 hi = _mm512_set1_ps(88.3762626647949f), lo = _mm512_set1_ps(-88.3762626647949f);
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), half = _mm512_set1_ps(0.5f);
  const __m512 c1 = _mm512_set1_ps(0.693359375f), c2 = _mm512_set1_ps(-2.12194440e-4f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, log2e, half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, c1, x);
  x = _mm512_fnmadd_ps(fx, c2, x);
  __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(EXP_POLY[0]);
  for (int i = 1; i < EXP_TERMS; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(EXP_POLY[i]));
  y = _mm512_fmadd_ps(y, z, x);
  y = _mm512_add_ps(y, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(~under, _mm512_scalef_ps(y, fx));
}
#endif

// p[j] = exp(s[j] - m) for j in [0, n); returns the sum
inline float exp_shift(float* s, int n, float m) {
  int j = 0;
  float total = 0.f;
#ifdef __AVX512F__
  const __m512 wm = _mm512_set1_ps(m);
  __m512 wide = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), wm));
    _mm512_storeu_ps(s + j, p);
    wide = _mm512_add_ps(wide, p);
  }
  total = _mm512_reduce_add_ps(wide);
#endif
  __m256 vm = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
    _mm256_storeu_ps(s + j, p);
    acc = _mm256_add_ps(acc, p);
  }
  total += hsum(acc);
  for (; j < n; ++j) {
    float p = std::exp(s[j] - m);
    s[j] = p;
    total += p;
  }
  return total;
}

// Query rows per block: the keys of a block span QB + 2w rows (576 at w = 256: 1.12x the 513 allowed).
constexpr int QB = 64;

// max of s[0, n) (a scalar chain would wait on every compare's latency)
inline float row_max(const float* s, int n) {
  int j = 0;
  float m = -std::numeric_limits<float>::infinity();
#ifdef __AVX512F__
  __m512 wide = _mm512_set1_ps(m);
  for (; j + 16 <= n; j += 16) wide = _mm512_max_ps(wide, _mm512_loadu_ps(s + j));
  m = _mm512_reduce_max_ps(wide);
#endif
  __m256 acc = _mm256_set1_ps(m);
  for (; j + 8 <= n; j += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(s + j));
  float buf[8];
  _mm256_storeu_ps(buf, acc);
  for (int t = 0; t < 8; ++t) m = std::max(m, buf[t]);
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t j = 0;
  float total = 0.f;
#ifdef __AVX512F__
  if (n >= 16) {
    __m512 wide = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) wide = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), wide);
    total = _mm512_reduce_add_ps(wide);
  }
#endif
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
  total += hsum(acc);
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}
// y[0, n) += a * x[0, n)
inline void axpy(float a, const float* x, float* y, int64_t n) {
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 wa = _mm512_set1_ps(a);
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(y + j, _mm512_fmadd_ps(wa, _mm512_loadu_ps(x + j), _mm512_loadu_ps(y + j)));
#endif
  const __m256 va = _mm256_set1_ps(a);
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
  for (; j < n; ++j) y[j] += a * x[j];
}
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// The allowed local key range of query row i: [i - w, i + w] clipped to [0, n), minus k_lo.
inline void row_range(int64_t i, int64_t w, int64_t n, int64_t k_lo, int* a, int* b) {
  int64_t lo = std::max<int64_t>(i - w, 0), hi = std::min<int64_t>(i + w + 1, n);
  *a = int(lo - k_lo);
  *b = int(hi - k_lo);
}

// The keys a block of query rows [q0, q0 + rows) reaches, clipped to the row's n tokens.
struct Block {
  int rows;
  int64_t k_lo;
  int nk;
};

// Block geometry and its scaled scores s = scale * Q K^T [rows x nk]; q and k point at row 0 of one
// (batch, head).
inline Block block_scores(const float* q, int64_t qsn, const float* k, int64_t ksn, int64_t q0, int64_t n,
                          int64_t window, int64_t dim, float scale, float* s) {
  Block blk;
  blk.rows = int(std::min<int64_t>(QB, n - q0));
  blk.k_lo = std::max<int64_t>(q0 - window, 0);
  blk.nk = int(std::min<int64_t>(q0 + blk.rows + window, n) - blk.k_lo);
  gemm(false, true, blk.rows, blk.nk, int(dim), scale, q + q0 * qsn, int(qsn), k + blk.k_lo * ksn, int(ksn), 0.f,
       s, blk.nk);
  return blk;
}

void check_tensors(const std::vector<torch::Tensor>& xs) {
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat, "band kernel: CPU float32 tensors only");
    TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "band kernel: [B, H, N, D] tensors with a contiguous last dim");
    TORCH_CHECK(x.sizes() == xs[0].sizes(), "band kernel: q, k, v (and grads) must have one shape");
  }
}

void check_inputs(const std::vector<torch::Tensor>& xs, const torch::Tensor& lengths) {
  check_tensors(xs);
  TORCH_CHECK(lengths.scalar_type() == torch::kLong && lengths.dim() == 1 && lengths.size(0) == xs[0].size(0),
              "band kernel: lengths must be int64 [B]");
}

void check_lse(const torch::Tensor& lse, const torch::Tensor& q) {
  TORCH_CHECK(lse.scalar_type() == torch::kFloat && lse.dim() == 3 && lse.size(0) == q.size(0) &&
                  lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "band kernel: lse must be float32 [B, H, N]");
}

}  // namespace

// q, k, v: [B, H, N, D] float32, last dim contiguous; lengths [B] int64. Returns (out [B, N, H, D], lse [B, H, N]).
std::vector<torch::Tensor> band_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths,
                                        int64_t window, double scale) {
  check_inputs({q, k, v}, lengths);
  lengths = lengths.contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  auto out = torch::empty({B, N, H, D}, q.options());  // the blocks write every real row whole
  auto lse = torch::full({B, H, N}, NEG_INF, q.options());
  auto len = lengths.accessor<int64_t, 1>();
  for (int64_t b = 0; b < B; ++b)
    if (len[b] < N) out.select(0, b).narrow(0, len[b], N - len[b]).zero_();
  const int64_t nqb = (N + QB - 1) / QB;
  const float* qp = q.data_ptr<float>(); const float* kp = k.data_ptr<float>(); const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>(); float* lp = lse.data_ptr<float>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qsn = q.stride(2);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), ksn = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vsn = v.stride(2);
  const int64_t width = QB + 2 * window;
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(QB * width), o(QB * D), inv(QB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (H * nqb), h = (task / nqb) % H, blk = task % nqb;
      const int64_t n = len[b], q0 = blk * QB;
      if (q0 >= n) continue;
      const Block g = block_scores(qp + b * qsb + h * qsh, qsn, kp + b * ksb + h * ksh, ksn, q0, n, window, D,
                                   float(scale), s.data());
      const int rows = g.rows, nk = g.nk;
      const int64_t k_lo = g.k_lo;
      const float* vb = vp + b * vsb + h * vsh + k_lo * vsn;
      float* lrow = lp + (b * H + h) * N + q0;
      for (int r = 0; r < rows; ++r) {
        float* sr = s.data() + r * nk;
        int a, e;
        row_range(q0 + r, window, n, k_lo, &a, &e);
        std::fill(sr, sr + a, 0.f);
        std::fill(sr + e, sr + nk, 0.f);
        const float m = row_max(sr + a, e - a);
        const float total = exp_shift(sr + a, e - a, m);
        lrow[r] = m + std::log(total);
        inv[r] = 1.f / total;
      }
      gemm(false, false, rows, int(D), nk, 1.f, s.data(), nk, vb, int(vsn), 0.f, o.data(), int(D));
      for (int r = 0; r < rows; ++r) {
        float* dst = op + ((b * N + q0 + r) * H + h) * D;
        const float* src = o.data() + r * D;
        for (int64_t c = 0; c < D; ++c) dst[c] = src[c] * inv[r];
      }
    }
  });
  return {out, lse};
}

// Gradients of the level-0 pairs within the merged softmax (out, lse are the merged ones).
std::vector<torch::Tensor> band_backward(torch::Tensor grad_out, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                         torch::Tensor out, torch::Tensor lse, torch::Tensor lengths, int64_t window,
                                         double scale) {
  check_inputs({grad_out, q, k, v, out}, lengths);
  check_lse(lse, q);
  lengths = lengths.contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  // Head-major gradients: each block's products write rows D floats apart, and one thread's head is one
  // contiguous range (token-major rows H * D apart scaled worse across threads)
  auto dq = torch::empty({B, H, N, D}, q.options());  // real rows are written whole below
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lengths[b].item<int64_t>();
    if (n < N) dq.select(0, b).narrow(1, n, N - n).zero_();
  }
  // dk and dv accumulate over blocks; each task zeroes its head's rows just before the first block
  // reaching them (while they are in cache) instead of a separate pass over both tensors
  auto dk = torch::empty({B, H, N, D}, q.options());
  auto dv = torch::empty({B, H, N, D}, q.options());
  auto len = lengths.accessor<int64_t, 1>();
  const int64_t nqb = (N + QB - 1) / QB;
  const float* qp = q.data_ptr<float>(); const float* kp = k.data_ptr<float>(); const float* vp = v.data_ptr<float>();
  const float* gp = grad_out.data_ptr<float>(); const float* op = out.data_ptr<float>(); const float* lp = lse.data_ptr<float>();
  float* dqp = dq.data_ptr<float>(); float* dkp = dk.data_ptr<float>(); float* dvp = dv.data_ptr<float>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qsn = q.stride(2);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), ksn = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vsn = v.stride(2);
  const int64_t gsb = grad_out.stride(0), gsh = grad_out.stride(1), gsn = grad_out.stride(2);
  const int64_t osb = out.stride(0), osh = out.stride(1), osn = out.stride(2);
  const int64_t lsb = lse.stride(0), lsh = lse.stride(1), lsn = lse.stride(2);
  const int64_t rs = D;  // row stride of the head-major gradients
  const int64_t width = QB + 2 * window;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(QB * width), dp(QB * width), delta(QB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, n = len[b];
      int64_t zeroed = 0;  // dk, dv rows [0, zeroed) of this head are initialised
      const int64_t head = (b * H + h) * N * D;  // offset of this head's gradient rows
      auto zero_rows = [&](int64_t end_row) {
        if (end_row <= zeroed) return;
        std::fill(dkp + head + zeroed * D, dkp + head + end_row * D, 0.f);
        std::fill(dvp + head + zeroed * D, dvp + head + end_row * D, 0.f);
        zeroed = end_row;
      };
      for (int64_t blk = 0; blk < nqb; ++blk) {
        const int64_t q0 = blk * QB;
        if (q0 >= n) break;
        const Block g = block_scores(qp + b * qsb + h * qsh, qsn, kp + b * ksb + h * ksh, ksn, q0, n, window, D,
                                     float(scale), p.data());
        const int rows = g.rows, nk = g.nk;
        const int64_t k_lo = g.k_lo;
        const float* qb = qp + b * qsb + h * qsh + q0 * qsn;
        const float* kb = kp + b * ksb + h * ksh + k_lo * ksn;
        const float* vb = vp + b * vsb + h * vsh + k_lo * vsn;
        const float* gb = gp + b * gsb + h * gsh + q0 * gsn;
        const float* ob = op + b * osb + h * osh + q0 * osn;
        for (int r = 0; r < rows; ++r) {
          float* pr = p.data() + r * nk;
          int a, e;
          row_range(q0 + r, window, n, k_lo, &a, &e);
          const float l = lp[b * lsb + h * lsh + (q0 + r) * lsn];
          std::fill(pr, pr + a, 0.f);
          std::fill(pr + e, pr + nk, 0.f);
          exp_shift(pr + a, e - a, l);
          delta[r] = dot(gb + r * gsn, ob + r * osn, D);
        }
        zero_rows(k_lo + nk);
        // dV += P^T dO ; dP = dO V^T
        gemm(true, false, nk, int(D), rows, 1.f, p.data(), nk, gb, int(gsn), 1.f, dvp + head + k_lo * rs, int(rs));
        gemm(false, true, rows, nk, int(D), 1.f, gb, int(gsn), vb, int(vsn), 0.f, dp.data(), nk);
        for (int r = 0; r < rows; ++r) {
          float* pr = p.data() + r * nk;
          float* dr = dp.data() + r * nk;
          int j = 0;
#ifdef __AVX512F__
          const __m512 wdl = _mm512_set1_ps(delta[r]), wsc = _mm512_set1_ps(float(scale));
          for (; j + 16 <= nk; j += 16)
            _mm512_storeu_ps(pr + j, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(pr + j),
                                                                 _mm512_sub_ps(_mm512_loadu_ps(dr + j), wdl)), wsc));
#endif
          const __m256 dl = _mm256_set1_ps(delta[r]), sc = _mm256_set1_ps(float(scale));
          for (; j + 8 <= nk; j += 8) {
            __m256 ds = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(pr + j), _mm256_sub_ps(_mm256_loadu_ps(dr + j), dl)), sc);
            _mm256_storeu_ps(pr + j, ds);
          }
          for (; j < nk; ++j) pr[j] = pr[j] * (dr[j] - delta[r]) * float(scale);
        }
        // dQ = dS K ; dK += dS^T Q
        gemm(false, false, rows, int(D), nk, 1.f, p.data(), nk, kb, int(ksn), 0.f, dqp + head + q0 * rs, int(rs));
        gemm(true, false, nk, int(D), rows, 1.f, p.data(), nk, qb, int(qsn), 1.f, dkp + head + k_lo * rs, int(rs));
      }
      zero_rows(N);  // padding rows
    }
  });
  return {dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)};  // [B, N, H, D] views
}

// ---------------------------------------------------------------------------------------------
// Levels >= 1 and the [DOC] rule: the few rows (sentence and section starts, [DOC]) that see keys
// beyond their level-0 band. Their extra keys come as lists (the plan's ExtraKeys, built once per batch):
// row r of batch row_batch[r] at position row_pos[r] sees keys[offsets[r] .. offsets[r + 1]), positions
// disjoint from its level-0 band. Done here, the merge costs microseconds instead of a few hundred
// small tensor operations per layer.
// ---------------------------------------------------------------------------------------------
namespace {

struct ExtraKeys {
  const int64_t* row_batch;
  const int64_t* row_pos;
  const int64_t* offsets;
  const int64_t* keys;
  int64_t rows;
};

ExtraKeys extra_keys(const torch::Tensor& row_batch, const torch::Tensor& row_pos, const torch::Tensor& offsets,
                     const torch::Tensor& keys) {
  for (const auto* t : {&row_batch, &row_pos, &offsets, &keys})
    TORCH_CHECK(t->scalar_type() == torch::kLong && t->dim() == 1 && t->is_contiguous() && t->device().is_cpu(),
                "extra keys: contiguous CPU int64 vectors");
  TORCH_CHECK(row_pos.numel() == row_batch.numel() && offsets.numel() == row_batch.numel() + 1,
              "extra keys: one batch row and position per row, rows + 1 offsets");
  return {row_batch.data_ptr<int64_t>(), row_pos.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
          keys.data_ptr<int64_t>(), row_batch.numel()};
}

// Strided [B, H, N, D] float32 view: the address of row (b, h, n).
struct Rows {
  float* base;
  int64_t sb, sh, sn;
  float* at(int64_t b, int64_t h, int64_t n) const { return base + b * sb + h * sh + n * sn; }
};

Rows rows_of(const torch::Tensor& x) {
  return {x.data_ptr<float>(), x.stride(0), x.stride(1), x.stride(2)};
}

}  // namespace

// Merge each listed row's extra keys into (out, lse), in place: out [B, H, N, D] and lse [B, H, N] hold
// the level-0 partial on entry and the whole ML-SWA softmax on return.
void extra_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out, torch::Tensor lse,
                   torch::Tensor row_batch, torch::Tensor row_pos, torch::Tensor offsets, torch::Tensor keys,
                   double scale) {
  check_tensors({q, k, v, out});
  check_lse(lse, q);
  const ExtraKeys ek = extra_keys(row_batch, row_pos, offsets, keys);
  const int64_t H = q.size(1), D = q.size(3);
  const Rows qr = rows_of(q), kr = rows_of(k), vr = rows_of(v), orow = rows_of(out);
  float* lp = lse.data_ptr<float>();
  const int64_t lsb = lse.stride(0), lsh = lse.stride(1), lsn = lse.stride(2);
  at::parallel_for(0, ek.rows * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> s;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / H, h = task % H, b = ek.row_batch[r], i = ek.row_pos[r];
      const int64_t* key = ek.keys + ek.offsets[r];
      const int64_t nk = ek.offsets[r + 1] - ek.offsets[r];
      if (nk == 0) continue;
      s.resize(nk);
      const float* qi = qr.at(b, h, i);
      float* l = lp + b * lsb + h * lsh + i * lsn;
      float m = *l;
      for (int64_t j = 0; j < nk; ++j) {
        s[j] = float(scale) * dot(qi, kr.at(b, h, key[j]), D);
        m = std::max(m, s[j]);
      }
      const float w0 = std::exp(*l - m);  // the level-0 partial's share (0 when it had no key)
      const float total = w0 + exp_shift(s.data(), int(nk), m);
      float* o = orow.at(b, h, i);
      const float inv = 1.f / total;
      for (int64_t c = 0; c < D; ++c) o[c] *= w0 * inv;
      for (int64_t j = 0; j < nk; ++j) axpy(s[j] * inv, vr.at(b, h, key[j]), o, D);
      *l = m + std::log(total);
    }
  });
}

// Add the gradients of the extra pairs into dq, dk, dv ([B, H, N, D], in place); out and lse are the
// merged ones. One task per (batch, head) owns its keys' gradient rows, so no two threads add to one row.
void extra_backward(torch::Tensor grad_out, torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out,
                    torch::Tensor lse, torch::Tensor row_batch, torch::Tensor row_pos, torch::Tensor offsets,
                    torch::Tensor keys, double scale, torch::Tensor dq, torch::Tensor dk, torch::Tensor dv) {
  check_tensors({grad_out, q, k, v, out, dq, dk, dv});
  check_lse(lse, q);
  const ExtraKeys ek = extra_keys(row_batch, row_pos, offsets, keys);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  const Rows gr = rows_of(grad_out), qr = rows_of(q), kr = rows_of(k), vr = rows_of(v), orow = rows_of(out);
  const Rows dqr = rows_of(dq), dkr = rows_of(dk), dvr = rows_of(dv);
  const float* lp = lse.data_ptr<float>();
  const int64_t lsb = lse.stride(0), lsh = lse.stride(1), lsn = lse.stride(2);
  const float sc = float(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p, dp;  // one row's probabilities and dO . v over its extra keys
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      for (int64_t r = 0; r < ek.rows; ++r) {
        if (ek.row_batch[r] != b) continue;
        const int64_t i = ek.row_pos[r];
        const int64_t* key = ek.keys + ek.offsets[r];
        const int64_t nk = ek.offsets[r + 1] - ek.offsets[r];
        if (nk == 0) continue;
        const float* g = gr.at(b, h, i);
        const float* qi = qr.at(b, h, i);
        float* dqi = dqr.at(b, h, i);
        const float l = lp[b * lsb + h * lsh + i * lsn];
        const float delta = dot(g, orow.at(b, h, i), D);
        p.resize(nk);
        dp.resize(nk);
        for (int64_t e = 0; e < nk; ++e) {
          p[e] = sc * dot(qi, kr.at(b, h, key[e]), D);
          dp[e] = dot(g, vr.at(b, h, key[e]), D);
        }
        exp_shift(p.data(), int(nk), l);  // the merged softmax's probabilities, all exps at once
        for (int64_t e = 0; e < nk; ++e) {
          const int64_t j = key[e];
          const float* kj = kr.at(b, h, j);
          const float ds = sc * p[e] * (dp[e] - delta);
          axpy(ds, kj, dqi, D);
          axpy(ds, qi, dkr.at(b, h, j), D);
          axpy(p[e], g, dvr.at(b, h, j), D);
        }
      }
    }
  });
}
