// Softmax cross-entropy of the MLM decoder's logits (CPU float32) with the decoder's bias folded in: one
// pass forward, one backward, instead of addmm's bias copy, log_softmax, the loss's gather and, backward, a
// zero-filled gradient, a scatter, log_softmax's backward and the bias gradient's reduction.
//
// Forward: logits [M, V], the product without the bias, get the bias added in place (they come back as the
// logits) and each row's log-sum-exp; the loss is the mean over rows of lse - logit[target], summed in
// double in row order. Backward: scale * (softmax - onehot(target)) and its column sums (the bias gradient).
#include <torch/types.h>  // not torch/extension.h (with pybind11): that triples the compile time
#include <ATen/Parallel.h>
#include <cmath>
#include <limits>
#include <vector>

#include "vector_math.h"

namespace {

using namespace lht;

void check_inputs(const torch::Tensor& logits, const torch::Tensor& targets) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == torch::kFloat && logits.is_contiguous() &&
                  logits.dim() == 2,
              "loss kernel: logits must be a contiguous CPU float32 [M, V] tensor");
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == torch::kLong && targets.is_contiguous() &&
                  targets.dim() == 1 && targets.size(0) == logits.size(0),
              "loss kernel: targets must be contiguous CPU int64 [M]");
}

}  // namespace

// logits [M, V] (bias added in place), bias [V], targets [M] -> (mean loss [], lse [M])
std::vector<torch::Tensor> cross_entropy_forward(torch::Tensor logits, torch::Tensor bias, torch::Tensor targets) {
  check_inputs(logits, targets);
  TORCH_CHECK(bias.device().is_cpu() && bias.scalar_type() == torch::kFloat && bias.is_contiguous() &&
                  bias.dim() == 1 && bias.size(0) == logits.size(1),
              "loss kernel: bias must be a contiguous CPU float32 [V] tensor");
  const int64_t M = logits.size(0), V = logits.size(1);
  TORCH_CHECK(M > 0 && V > 0, "loss kernel: needs at least one row and one class");
  const int64_t* tp = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < M; ++r)  // once here: the backward gets the same targets back from autograd
    TORCH_CHECK(tp[r] >= 0 && tp[r] < V, "loss kernel: target ", tp[r], " is out of bounds for ", V, " classes");
  auto lse = torch::empty({M}, logits.options());
  std::vector<double> row_loss(M);
  float* xp = logits.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* x = xp + r * V;
      int64_t j = 0;
      vf wide = splat(-std::numeric_limits<float>::infinity());
      for (; j + W <= V; j += W) {
        const vf v = load(x + j) + load(bp + j);
        store(x + j, v);
        wide = v > wide ? v : wide;
      }
      float m = -std::numeric_limits<float>::infinity();
      for (int l = 0; l < W; ++l) m = std::max(m, wide[l]);
      for (; j < V; ++j) m = std::max(m, x[j] += bp[j]);
      vf acc = splat(0.f);
      j = 0;
      for (; j + W <= V; j += W) acc += exp_nonpositive(load(x + j) - m);
      float total = sum_lanes(acc);
      for (; j < V; ++j) total += std::exp(x[j] - m);
      lp[r] = m + std::log(total);
      row_loss[r] = double(lp[r]) - double(x[tp[r]]);
    }
  });
  double sum = 0.0;
  for (int64_t r = 0; r < M; ++r) sum += row_loss[r];
  return {torch::full({}, float(sum / double(M)), logits.options()), lse};
}

// logits [M, V] (with the bias), lse [M], targets [M] -> (scale * (softmax - onehot) [M, V], its column sums [V])
std::vector<torch::Tensor> cross_entropy_backward(torch::Tensor logits, torch::Tensor lse, torch::Tensor targets,
                                                  double scale) {
  check_inputs(logits, targets);
  TORCH_CHECK(lse.scalar_type() == torch::kFloat && lse.is_contiguous() && lse.numel() == logits.size(0),
              "loss kernel: lse must be float32 [M]");
  const int64_t M = logits.size(0), V = logits.size(1);
  auto grad = torch::empty_like(logits);
  auto bias_grad = torch::empty({V}, logits.options());
  const float* xp = logits.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  float* gp = grad.data_ptr<float>();
  const float sc = float(scale);
  rows_with_column_sums(M, V, bias_grad.data_ptr<float>(), [&](int64_t r, int64_t c0, int64_t k) {
    const float* x = xp + r * V + c0;
    float* g = gp + r * V + c0;
    const vf l = splat(lp[r]);
    int64_t j = 0;
    for (; j + W <= k; j += W) store(g + j, exp_nonpositive(load(x + j) - l) * sc);
    for (; j < k; ++j) g[j] = std::exp(x[j] - lp[r]) * sc;
    const int64_t t = tp[r] - c0;
    if (t >= 0 && t < k) g[t] -= sc;
    return g;
  });
  return {grad, bias_grad};
}
