"""Exact per-row attention entropy of every layer of a research-scale model (issue 5, target 5).

    python benchmarks/entropy.py                          # 12 layers, 12 heads, N=8192, windows [256, 64, 16]
    python benchmarks/entropy.py --seq-len 4096 --layers 4

For each layer it takes that layer's rotated queries and keys ([1, N, H, 64], the shapes a
``capture=True`` forward of ``configs/pretrain_hierarchical.yaml`` records) and computes, in float64,
the entropy, allowed-key count and per-level attention mass of every query row
(``lhtcli.core.probing.mlswa_row_stats``, sharing one plan across layers as ``lht entropy`` does).
The queries and keys are random with the spread of a trained model's (their scores have a standard
deviation of a few units), one layer at a time, so the memory column is what the diagnostic itself
needs beyond one layer's inputs. A float64 dense reference checks the first rows of the first layer.

Time: the plan once, then every layer's statistics; memory: the peak RSS growth over the whole loop
(`/proc/self/clear_refs` reset after the inputs of the first layer exist).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import _proc_status_kib, device_label, realistic_positions  # noqa: E402

from lhtcli.core.attention import build_mlswa_plan  # noqa: E402
from lhtcli.core.probing import mlswa_attention_probs, mlswa_row_stats  # noqa: E402


def layer_qk(layer: int, heads: int, n: int, d: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + layer)
    q = torch.randn(1, n, heads, d, generator=gen) * spread
    k = torch.randn(1, n, heads, d, generator=gen) * spread
    return q, k


def reference_check(q, k, positions, windows, rows: int = 64) -> float:
    """Max |entropy - dense float64 entropy| over the first ``rows`` query rows of one layer."""
    probs = mlswa_attention_probs(q.double(), k.double(), positions, windows, rows=list(range(rows)))
    dense = -(probs * torch.where(probs > 0, probs.log(), torch.zeros_like(probs))).sum(-1)  # [B, R, H]
    stats = mlswa_row_stats(q, k, positions, windows)
    return float((stats.entropy[:, :rows] - dense).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--windows", default="256,64,16")
    parser.add_argument("--spread", type=float, default=0.5, help="std of q and k entries")
    args = parser.parse_args()
    windows = [int(w) for w in args.windows.split(",")]
    n, heads, d = args.seq_len, args.heads, args.head_dim
    torch.manual_seed(0)
    positions = realistic_positions(n)
    err = reference_check(*layer_qk(0, heads, min(n, 2048), d, args.spread),
                          realistic_positions(min(n, 2048)), windows)

    q, k = layer_qk(0, heads, n, d, args.spread)
    with open("/proc/self/clear_refs", "w") as fh:  # resets the peak RSS (VmHWM) to the current RSS
        fh.write("5")
    base_kib = _proc_status_kib("VmRSS")
    start = time.perf_counter()
    plan = build_mlswa_plan(positions, windows)
    plan_s = time.perf_counter() - start
    per_layer, mean_entropy = [], []
    for layer in range(args.layers):
        if layer:
            q, k = layer_qk(layer, heads, n, d, args.spread)  # stands in for the next layer's capture
        t0 = time.perf_counter()
        stats = mlswa_row_stats(q, k, positions, windows, plan=plan)
        per_layer.append(time.perf_counter() - t0)
        mean_entropy.append(float(stats.entropy.mean()))
        del stats
    total = plan_s + sum(per_layer)
    peak_mib = (_proc_status_kib("VmHWM") - base_kib) / 1024

    print(f"# exact row statistics (entropy, key counts, level mass), float64, {device_label(torch.device('cpu'))}, "
          f"torch {torch.__version__}")
    print(f"# {args.layers} layers x {heads} heads x N={n} rows, head dim {d}, windows {windows}, "
          f"{int(plan.batch_size)} sequence(s)\n")
    print("| what | value |")
    print("|---|---|")
    print(f"| plan build (once) | {plan_s:.2f} s |")
    print(f"| per layer (median) | {sorted(per_layer)[len(per_layer) // 2]:.2f} s |")
    print(f"| all {args.layers} layers, plan included | {total:.2f} s |")
    print(f"| rows per second | {args.layers * heads * n / total:,.0f} |")
    print(f"| peak extra memory | {peak_mib:,.0f} MiB |")
    print(f"| max abs error vs dense float64 (64 rows, N={min(n, 2048)}) | {err:.2e} nats |")
    print(f"| mean entropy (layer 0) | {mean_entropy[0]:.3f} nats |")


if __name__ == "__main__":
    main()
