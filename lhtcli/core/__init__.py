"""Core of lht: hierarchical positions and exact ML-SWA attention.

Every public attention function here takes token-major ``[B, N, H, D]`` tensors (see the layout
note in :mod:`lhtcli.core.attention`).
"""

from lhtcli.core.attention import (
    AttentionResult,
    MLSWAPlan,
    build_mlswa_plan,
    compact_attention,
    dense_attention,
    mlswa_attention,
)
from lhtcli.core.mask import mlswa_dense_mask, pair_level_map
from lhtcli.core.positions import (
    HierarchicalPositions,
    TokenizedSequence,
    build_sequences,
    positions_from_lengths,
)
from lhtcli.core.probing import (
    AttentionRowStats,
    mlswa_attention_entropy,
    mlswa_attention_probs,
    mlswa_level_mass,
    mlswa_row_stats,
)

__all__ = [
    "AttentionResult",
    "AttentionRowStats",
    "HierarchicalPositions",
    "MLSWAPlan",
    "TokenizedSequence",
    "build_mlswa_plan",
    "build_sequences",
    "compact_attention",
    "dense_attention",
    "mlswa_attention",
    "mlswa_attention_entropy",
    "mlswa_attention_probs",
    "mlswa_dense_mask",
    "mlswa_level_mass",
    "mlswa_row_stats",
    "pair_level_map",
    "positions_from_lengths",
]
