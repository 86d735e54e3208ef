"""Fused CPU fast paths of the encoder: the math of the reference model in ``lhtcli/model.py``, in fewer
passes over memory (most of them one native kernel pass, ``lhtcli/core/*_kernel.cpp``).

``LHTEncoder(cfg)`` runs :func:`lhtcli.fused.encoder.forward` (``fused=True``, the default); ``fused=False``
runs the reference ``forward``. Both read the same parameters, so a checkpoint serves either. Each op
decides for itself, through :func:`~lhtcli.fused.kernel.kernel_for`, whether a tensor may take the native
kernel (CPU, contiguous float32, the module built); otherwise it runs PyTorch's ops, so the fused path
also serves CUDA and half precision. ``tests/test_fused.py`` holds each piece against the reference.

| module          | replaces in the reference model                          |
| --------------- | -------------------------------------------------------- |
| ``dropout``     | ``nn.Dropout`` (Philox masks redrawn in the backward)    |
| ``qkv``         | q/k/v view, permute and RoPE of ``MLSWASelfAttention``   |
| ``residual``    | output projection + dropout + residual add + LayerNorm   |
| ``gelu``        | ``F.gelu(fc(x))`` in ``MLP`` and ``MLMHead``             |
| ``loss``        | the MLM head's decoder and cross-entropy                 |
| ``encoder``     | ``LHTEncoder.forward``: the blocks' plumbing, and the last layer on labelled rows only |
"""

from lhtcli.fused.kernel import kernel_for

__all__ = ["kernel_for"]
