// RoPE on the packed q/k/v projection (CPU float32), forward and backward in one pass each.
//
// Forward: q and k of qkv [B, N, 3, H, D] rotated pair by pair, (x0, x1) -> (x0 c - x1 s, x0 s + x1 c), into a
// new [B, N, 2, H, D] (v stays a view of qkv). Backward: the packed gradient [B, N, 3, H, D] from dq and dk
// rotated back (c, -s) and dv copied, written once. The rotations (cos, sin) [B, N, D/2, 2] are read once per
// token for all heads. PyTorch's complex multiply did the same in several passes with a broadcast.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>

namespace {

constexpr int W = 16;  // floats per vector: 8 (re, im) pairs
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(float))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// out[0, d) = x rotated by the token's (cos, sin) pairs rot[0, d); sign -1 rotates back
inline void rotate(const float* x, const float* rot, float* out, int64_t d, float sign) {
  const vi even = {0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14};
  const vi odd = even + 1;
  const vi swap = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
  const vf alternate = {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1};
  int64_t j = 0;
  for (; j + W <= d; j += W) {
    const vf r = load(rot + j), v = load(x + j);
    const vf c = __builtin_shuffle(r, even), s = __builtin_shuffle(r, odd) * (alternate * sign);
    store(out + j, v * c + __builtin_shuffle(v, swap) * s);
  }
  for (; j < d; j += 2) {
    const float c = rot[j], s = sign * rot[j + 1], x0 = x[j], x1 = x[j + 1];
    out[j] = x0 * c - x1 * s;
    out[j + 1] = x0 * s + x1 * c;
  }
}

void check(const torch::Tensor& x, int64_t dim, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == dim,
              "rotary kernel: ", what, " must be a contiguous CPU float32 tensor of ", dim, " dimensions");
}

}  // namespace

// qkv [B, N, 3, H, D], rot [B, N, D/2, 2] (cos, sin) -> rotated q and k [B, N, 2, H, D]
torch::Tensor rotary_qk(torch::Tensor qkv, torch::Tensor rot) {
  check(qkv, 5, "qkv");
  check(rot, 4, "the rotations");
  const int64_t B = qkv.size(0), N = qkv.size(1), H = qkv.size(3), D = qkv.size(4);
  TORCH_CHECK(qkv.size(2) == 3 && D % 2 == 0 && rot.size(0) == B && rot.size(1) == N && rot.size(2) * 2 == D &&
                  rot.size(3) == 2,
              "rotary kernel: qkv [B, N, 3, H, D] with rotations [B, N, D/2, 2]");
  auto out = torch::empty({B, N, 2, H, D}, qkv.options());
  const float* xp = qkv.data_ptr<float>();
  const float* rp = rot.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t row = 0; row < 2 * H; ++row)  // q's heads, then k's: the first 2H rows of the token
        rotate(xp + (t * 3 * H + row) * D, rp + t * D, op + (t * 2 * H + row) * D, D, 1.f);
  });
  return out;
}

// dq, dk, dv [B, N, H, D] (contiguous), rot [B, N, D/2, 2] -> the packed gradient [B, N, 3, H, D]
torch::Tensor rotary_qkv_backward(torch::Tensor dq, torch::Tensor dk, torch::Tensor dv, torch::Tensor rot) {
  for (const auto* g : {&dq, &dk, &dv}) check(*g, 4, "the gradients");
  check(rot, 4, "the rotations");
  const int64_t B = dq.size(0), N = dq.size(1), H = dq.size(2), D = dq.size(3);
  TORCH_CHECK(dk.sizes() == dq.sizes() && dv.sizes() == dq.sizes() && rot.size(0) == B && rot.size(1) == N &&
                  rot.size(2) * 2 == D && rot.size(3) == 2,
              "rotary kernel: dq, dk, dv [B, N, H, D] with rotations [B, N, D/2, 2]");
  auto packed = torch::empty({B, N, 3, H, D}, dq.options());
  const float* qp = dq.data_ptr<float>();
  const float* kp = dk.data_ptr<float>();
  const float* vp = dv.data_ptr<float>();
  const float* rp = rot.data_ptr<float>();
  float* op = packed.data_ptr<float>();
  const int64_t token = H * D;
  at::parallel_for(0, B * N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* dst = op + t * 3 * token;
      for (int64_t h = 0; h < H; ++h) {
        rotate(qp + t * token + h * D, rp + t * D, dst + h * D, D, -1.f);
        rotate(kp + t * token + h * D, rp + t * D, dst + token + h * D, D, -1.f);
      }
      std::memcpy(dst + 2 * token, vp + t * token, token * sizeof(float));
    }
  });
  return packed;
}
