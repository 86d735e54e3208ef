"""Whole-document attention maps (``lht map``) at 16k tokens: time and peak memory (issue 19, item 3).

    python benchmarks/docmap.py                                  # N=16384, H=4, windows 256,64,16 and 32,8,4
    python benchmarks/docmap.py --seq-len 4096 --windows 32,8,4

For one layer of rotated queries and keys ([1, N, H, 64], random with a trained model's spread) it
times what ``lht map`` does per layer: the exact row log-sum-exps (``mlswa_row_stats``), then the
sentence x sentence and section x section maps (``pooled_attention``: every allowed pair's exact
probability, block by block), each alone and both in one pass (``pooled_attention_maps``, what
``lht map`` runs). Memory: peak RSS growth over that work (``/proc/self/clear_refs``
reset once the inputs exist), next to what a dense [H, N, N] float64 probability tensor would need.
A float64 dense reference checks the sentence map on a short document first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import _proc_status_kib, device_label, realistic_positions  # noqa: E402

from lhtcli.core.pairs import pooled_attention, pooled_attention_maps  # noqa: E402
from lhtcli.core.positions import HierarchicalPositions  # noqa: E402
from lhtcli.core.probing import mlswa_attention_probs, mlswa_row_stats  # noqa: E402


def unit_ids(positions: HierarchicalPositions, level: int) -> tuple[torch.Tensor, int]:
    """[1, N] unit per token: 0 = [DOC], then one per sentence (level 1) or section (level 2)."""
    starts = (positions.level_enums[level] != 0).long()
    ids = torch.cumsum(starts, -1)
    return ids, int(ids.max()) + 1


def reference_error(windows: list[int], heads: int, d: int, spread: float) -> float:
    positions = realistic_positions(512, seed=3)
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 512, heads, d, generator=gen, dtype=torch.float64) * spread for _ in range(2))
    units, count = unit_ids(positions, 1)
    pooled = pooled_attention(q, k, positions, windows, None, units, count)
    probs = mlswa_attention_probs(q, k, positions, windows)[0]  # [N, H, N]
    onehot = torch.nn.functional.one_hot(units[0], count).double()
    dense = torch.einsum("qu,qhk,kv->huv", onehot, probs, onehot)
    return float((pooled - dense).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--windows", default="256,64,16;32,8,4", help="';'-separated window sets")
    parser.add_argument("--spread", type=float, default=0.5, help="std of q and k entries")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 is steadier on a machine shared with other jobs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, heads, d = args.seq_len, args.heads, args.head_dim
    positions = realistic_positions(n)
    sentence_units, num_sentences = unit_ids(positions, 1)
    section_units, num_sections = unit_ids(positions, 2)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, n, heads, d, generator=gen) * args.spread for _ in range(2))

    print(f"# lht map per layer, float64 maths, {device_label(torch.device('cpu'))}, torch {torch.__version__}")
    print(f"# N={n} tokens ({num_sentences - 1} sentences, {num_sections - 1} sections), {heads} heads x {d}; "
          f"a dense [H, N, N] float64 tensor would need {heads * n * n * 8 / 2**30:.1f} GiB\n")
    print("| windows | row lse | sentence map | section map | both maps in one pass | lse + both (lht map) "
          "| CPU time of both maps | peak extra memory | error vs dense (N=512) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in args.windows.split(";"):
        windows = [int(w) for w in spec.split(",")]
        err = reference_error(windows, heads, d, args.spread)
        with open("/proc/self/clear_refs", "w") as fh:  # resets the peak RSS (VmHWM) to the current RSS
            fh.write("5")
        base_kib = _proc_status_kib("VmRSS")
        t0 = time.perf_counter()
        stats = mlswa_row_stats(q, k, positions, windows)
        t1 = time.perf_counter()
        sent = pooled_attention(q, k, positions, windows, None, sentence_units, num_sentences, lse=stats.lse)
        t2 = time.perf_counter()
        sec = pooled_attention(q, k, positions, windows, None, section_units, num_sections, lse=stats.lse)
        t3 = time.perf_counter()
        cpu = time.process_time()
        pooled_attention_maps(q, k, positions, windows, None,
                              [(sentence_units, num_sentences), (section_units, num_sections)], lse=stats.lse)
        t4 = time.perf_counter()
        cpu = time.process_time() - cpu
        peak_mib = (_proc_status_kib("VmHWM") - base_kib) / 1024
        rows = float(sent.sum(-1).sum(-1).mean())  # every real row sums to 1: the map's total is N
        assert abs(rows - n) < 1e-6 * n and abs(float(sec.sum(-1).sum(-1).mean()) - n) < 1e-6 * n
        print(f"| {spec} | {t1 - t0:.2f} s | {t2 - t1:.2f} s | {t3 - t2:.2f} s | {t4 - t3:.2f} s | "
              f"{t1 - t0 + t4 - t3:.2f} s | {cpu:.2f} s | {peak_mib:,.0f} MiB | {err:.1e} |")


if __name__ == "__main__":
    main()
