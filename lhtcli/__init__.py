"""lht: pretrain and inspect Learned Hierarchical Transformers with ML-SWA attention."""

__version__ = "0.1.0"
