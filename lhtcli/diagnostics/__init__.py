"""Diagnostics of a model: exact attention statistics, gradient health, MLM predictions.

Import the submodules directly (they import torch): ``attention_stats``, ``gradients``,
``predictions``, ``training_viz``, ``sample_document``, ``loading``.
"""
