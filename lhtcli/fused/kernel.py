"""The one place that decides whether a tensor may take the native CPU kernels."""

from __future__ import annotations

import torch

from lhtcli.core import native


def kernel_for(x: torch.Tensor):
    """The native module when it is at hand for this contiguous float32 CPU tensor, else None (CUDA, half
    precision or autocast, strided views: PyTorch's ops). It is never built for the elementwise kernels
    alone: training builds it when its batches run the compact path, or a cached build is loaded."""
    if (
        x.device.type != "cpu"
        or x.dtype != torch.float32
        or not x.is_contiguous()
        or torch.is_autocast_enabled("cpu")
        or not native.ready()
    ):
        return None
    return native.band_kernel()
