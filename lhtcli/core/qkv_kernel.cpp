// The attention inputs from the packed q/k/v projection (CPU float32), forward and backward in one pass each.
//
// Forward: qkv [B, N, 3, H, D], the projection without its bias, -> q, k, v head-major [3, B, H, N, D], the
// bias added and q and k rotated (RoPE) pair by pair, (x0, x1) -> (x0 c - x1 s, x0 s + x1 c), when rotations
// are given. Head-major is the attention kernels' layout: a block of one head's keys is then contiguous
// rather than rows 3HD floats apart. Backward: dq, dk, dv ([B, H, N, D], any layout with contiguous rows) ->
// the packed gradient [B, N, 3, H, D], dq and dk rotated back (c, -s), and its column sums, the bias
// gradient. The rotations (cos, sin) [B, N, D/2, 2] are read once per token for all heads. This replaces
// addmm's bias copy, PyTorch's complex multiplies and the bias gradient's separate reduction.
#include <torch/types.h>  // not torch/extension.h (with pybind11): that triples the compile time
#include <ATen/Parallel.h>
#include <optional>
#include <vector>

#include "vector_math.h"

namespace {

using namespace lht;

// out[0, d) = (x + bias) rotated by the token's (cos, sin) pairs rot[0, d) (sign -1 rotates back); no
// rotation when rot is null, no bias when bias is null; d even
inline void rotate(const float* x, const float* bias, const float* rot, float* out, int64_t d, float sign) {
  const vi even = {0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14};
  const vi odd = even + 1;
  const vi swap = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
  const vf alternate = {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1};
  int64_t j = 0;
  for (; j + W <= d; j += W) {
    vf v = load(x + j);
    if (bias) v += load(bias + j);
    if (!rot) {
      store(out + j, v);
      continue;
    }
    const vf r = load(rot + j);
    const vf c = __builtin_shuffle(r, even), s = __builtin_shuffle(r, odd) * (alternate * sign);
    store(out + j, v * c + __builtin_shuffle(v, swap) * s);
  }
  for (; j < d; j += 2) {
    const float x0 = x[j] + (bias ? bias[j] : 0.f), x1 = x[j + 1] + (bias ? bias[j + 1] : 0.f);
    if (!rot) {
      out[j] = x0;
      out[j + 1] = x1;
      continue;
    }
    const float c = rot[j], s = sign * rot[j + 1];
    out[j] = x0 * c - x1 * s;
    out[j + 1] = x0 * s + x1 * c;
  }
}

void check(const torch::Tensor& x, int64_t dim, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == dim,
              "qkv kernel: ", what, " must be a contiguous CPU float32 tensor of ", dim, " dimensions");
}

void check_rotations(const std::optional<torch::Tensor>& rot, int64_t B, int64_t N, int64_t D) {
  if (!rot) return;
  check(*rot, 4, "the rotations");
  TORCH_CHECK(rot->size(0) == B && rot->size(1) == N && rot->size(2) * 2 == D && rot->size(3) == 2,
              "qkv kernel: rotations [B, N, D/2, 2] for q, k of [B, N, H, D]");
}

}  // namespace

// qkv [B, N, 3, H, D], bias [3 H D], rot [B, N, D/2, 2] (cos, sin) or None -> [3, B, H, N, D]
torch::Tensor qkv_heads(torch::Tensor qkv, torch::Tensor bias, std::optional<torch::Tensor> rot) {
  check(qkv, 5, "qkv");
  check(bias, 1, "the bias");
  const int64_t B = qkv.size(0), N = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  TORCH_CHECK(qkv.size(2) == 3 && D % 2 == 0 && bias.size(0) == 3 * H * D,
              "qkv kernel: qkv [B, N, 3, H, D] with D even and a bias of 3 H D");
  check_rotations(rot, B, N, D);
  auto out = torch::empty({3, B, H, N, D}, qkv.options());
  const float* xp = qkv.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const float* rp = rot ? rot->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / N, n = t % N;
      for (int64_t part = 0; part < 3; ++part)
        for (int64_t h = 0; h < H; ++h)
          rotate(xp + ((t * 3 + part) * H + h) * D, bp + (part * H + h) * D, part < 2 && rp ? rp + t * D : nullptr,
                 op + (((part * B + b) * H + h) * N + n) * D, D, 1.f);
    }
  });
  return out;
}

// dq, dk, dv [B, H, N, D] (rows contiguous), rot [B, N, D/2, 2] or None -> (packed gradient [B, N, 3, H, D],
// its column sums [3 H D])
std::vector<torch::Tensor> qkv_heads_backward(torch::Tensor dq, torch::Tensor dk, torch::Tensor dv,
                                              std::optional<torch::Tensor> rot) {
  for (const auto* g : {&dq, &dk, &dv})
    TORCH_CHECK(g->device().is_cpu() && g->scalar_type() == torch::kFloat && g->dim() == 4 && g->stride(3) == 1 &&
                    g->sizes() == dq.sizes(),
                "qkv kernel: dq, dk, dv must be CPU float32 [B, H, N, D] of one shape with contiguous rows");
  const int64_t B = dq.size(0), H = dq.size(1), N = dq.size(2), D = dq.size(3);
  check_rotations(rot, B, N, D);
  auto packed = torch::empty({B, N, 3, H, D}, dq.options());
  auto bias_grad = torch::empty({3 * H * D}, dq.options());
  const float* rp = rot ? rot->data_ptr<float>() : nullptr;
  const float* gp[3] = {dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>()};
  int64_t gs[3][3];  // batch, head and token strides of dq, dk, dv
  for (int part = 0; part < 3; ++part)
    for (int axis = 0; axis < 3; ++axis) gs[part][axis] = (part == 0 ? dq : part == 1 ? dk : dv).stride(axis);
  float* op = packed.data_ptr<float>();
  const int64_t F = 3 * H * D;
  rows_with_column_sums(B * N, F, bias_grad.data_ptr<float>(), [&](int64_t t, int64_t c0, int64_t k) {
    const int64_t b = t / N, n = t % N;
    float* row = op + t * F;
    for (int64_t c = c0; c < c0 + k;) {  // the heads the columns cross, piece by piece
      const int64_t part = c / (H * D), h = (c / D) % H, d0 = c % D, d1 = std::min(D, d0 + (c0 + k - c));
      const float* src = gp[part] + b * gs[part][0] + h * gs[part][1] + n * gs[part][2];
      rotate(src + d0, nullptr, part < 2 && rp ? rp + t * D + d0 : nullptr, row + c, d1 - d0, -1.f);
      c += d1 - d0;
    }
    return row + c0;
  });
  return {packed, bias_grad};
}
