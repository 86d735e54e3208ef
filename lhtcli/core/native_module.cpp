// The Python bindings of the native CPU kernels (one module, built by lhtcli/core/native.py).
#include <torch/csrc/utils/pybind.h>  // the bindings and tensor casters without the whole C++ API: half the compile time
#include <torch/types.h>
#include <optional>
#include <vector>

// band_kernel.cpp: ML-SWA attention
std::vector<torch::Tensor> band_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor lengths,
                                        int64_t window, double scale);
std::vector<torch::Tensor> band_backward(torch::Tensor grad_out, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                         torch::Tensor out, torch::Tensor lse, torch::Tensor lengths, int64_t window,
                                         double scale);
void extra_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out, torch::Tensor lse,
                   torch::Tensor row_batch, torch::Tensor row_pos, torch::Tensor offsets, torch::Tensor keys,
                   double scale);
void extra_backward(torch::Tensor grad_out, torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out,
                    torch::Tensor lse, torch::Tensor row_batch, torch::Tensor row_pos, torch::Tensor offsets,
                    torch::Tensor keys, double scale, torch::Tensor dq, torch::Tensor dk, torch::Tensor dv);
// dropout_kernel.cpp
torch::Tensor dropout_philox(torch::Tensor x, int64_t seed, int64_t threshold, double scale,
                             std::optional<torch::Tensor> bias, std::optional<torch::Tensor> residual);
// norm_kernel.cpp
std::vector<torch::Tensor> residual_norm_forward(torch::Tensor y, torch::Tensor bias, torch::Tensor residual,
                                                 int64_t seed, int64_t threshold, double scale, torch::Tensor gamma,
                                                 torch::Tensor beta, double eps);
std::vector<torch::Tensor> residual_norm_backward(std::optional<torch::Tensor> grad_x, torch::Tensor grad_normed,
                                                  torch::Tensor x, torch::Tensor stats, torch::Tensor gamma,
                                                  int64_t seed, int64_t threshold, double scale);
// gelu_kernel.cpp
std::vector<torch::Tensor> bias_gelu_forward(torch::Tensor h, torch::Tensor bias, bool with_derivative);
std::vector<torch::Tensor> bias_gelu_backward(torch::Tensor grad, torch::Tensor derivative);
// qkv_kernel.cpp
torch::Tensor qkv_heads(torch::Tensor qkv, torch::Tensor bias, std::optional<torch::Tensor> rot);
std::vector<torch::Tensor> qkv_heads_backward(torch::Tensor dq, torch::Tensor dk, torch::Tensor dv,
                                              std::optional<torch::Tensor> rot);
// loss_kernel.cpp
std::vector<torch::Tensor> cross_entropy_forward(torch::Tensor logits, torch::Tensor bias, torch::Tensor targets);
std::vector<torch::Tensor> cross_entropy_backward(torch::Tensor logits, torch::Tensor lse, torch::Tensor targets,
                                                  double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("band_forward", &band_forward);
  m.def("band_backward", &band_backward);
  m.def("extra_forward", &extra_forward);
  m.def("extra_backward", &extra_backward);
  m.def("dropout_philox", &dropout_philox, py::arg("x"), py::arg("seed"), py::arg("threshold"), py::arg("scale"),
        py::arg("bias") = py::none(), py::arg("residual") = py::none());
  m.def("residual_norm_forward", &residual_norm_forward);
  m.def("residual_norm_backward", &residual_norm_backward);
  m.def("bias_gelu_forward", &bias_gelu_forward);
  m.def("bias_gelu_backward", &bias_gelu_backward);
  m.def("qkv_heads", &qkv_heads);
  m.def("qkv_heads_backward", &qkv_heads_backward);
  m.def("cross_entropy_forward", &cross_entropy_forward);
  m.def("cross_entropy_backward", &cross_entropy_backward);
}
