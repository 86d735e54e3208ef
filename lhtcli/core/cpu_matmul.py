"""Which fp32 GEMM library runs the model's bias-free projections on CPU: MKL (``torch.mm``) or oneDNN.

PyTorch's CPU matmuls go to MKL, whose kernels are tuned for Intel CPUs; oneDNN generates its kernels for
the instruction set it finds. On an AMD EPYC (Zen 4) the model's forward products ``x @ W^T`` and
input-gradient products ``dY @ W`` ran 15-40% faster in oneDNN (e.g. [4096, 256] x [256, 1024]: 11.5 vs
15.9 ms), while MKL stayed faster for the weight gradients ``dY^T @ X``; on the Intel CPUs measured
earlier oneDNN was no faster anywhere. So by default AMD CPUs run the forward and input-gradient products
in oneDNN and the weight gradients in MKL, and every other CPU keeps ``torch.mm`` throughout. The choice is
fixed per machine (never taken by timing a run), so a seed repeats a run bit for bit on one machine. Both
are exact fp32 products (float32 accumulation, no reduced-precision mode), differing only in summation order.

``LHT_CPU_MATMUL=auto|mkl|onednn`` (default ``auto``) overrides the choice.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lhtcli.config import cpu_matmul_setting
from lhtcli.core import native


@cache
def _cpu_vendor() -> str:
    return native.cpuinfo("vendor_id")


@cache
def _onednn_available() -> bool:
    """oneDNN's linear op is there and gives torch.mm's product (it is an internal op of PyTorch's compiler:
    a torch in the supported range that changed it falls back to MKL instead of failing mid-training)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    x = torch.arange(12, dtype=torch.float32).view(3, 4) / 8
    weight = torch.arange(20, dtype=torch.float32).view(5, 4).t().contiguous().t() / 16  # a transposed view
    try:
        return torch.allclose(_onednn_linear(x, weight), x @ weight.t())
    except RuntimeError:
        return False


def library() -> str:
    """``"onednn"`` or ``"mkl"`` (meaning ``torch.mm``): what runs the forward and input-gradient products."""
    wanted = cpu_matmul_setting()
    if wanted == "mkl" or not _onednn_available():
        return "mkl"
    if wanted == "onednn":
        return "onednn"
    return "onednn" if _cpu_vendor() == "AuthenticAMD" else "mkl"


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T in oneDNN (weight may be a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, None, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias), its products in the library chosen above for CPU float32."""
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or weight.dim() != 2
        or torch.is_autocast_enabled("cpu")
        or x.numel() == 0
        or library() != "onednn"
    ):
        return F.linear(x, weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _OneDNNLinear.apply(x, weight)
    return _onednn_linear(x, weight)


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T and dx = dy W in oneDNN; dW = dy^T x in MKL (faster there for the long reduction)."""

    @staticmethod
    def forward(ctx, x, weight):
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        return _onednn_linear(x, weight)

    @staticmethod
    @once_differentiable  # no graph through the oneDNN call: a second derivative must fail loudly
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t())
        if ctx.needs_input_grad[1]:
            grad_weight = grad.reshape(-1, weight.shape[0]).t().mm(x.reshape(-1, weight.shape[1]))
        return grad_x, grad_weight
