"""Benchmark the ML-SWA attention backends (issue 5 "Performance"; PERF.md holds the earlier numbers).

One attention call of B=1, H=4, D=64, windows [256, 64, 16] over a realistic document (sentences of
10-40 tokens, sections of 5-30 sentences), for every N of the table:

* ``plan ms``: building the per-batch compact plan (shared by all layers), and its share of one
  layer's forward+backward;
* forward and forward+backward ms of dense SDPA with the bool mask (PERF.md's baseline), compact
  explicit, compact fast (the training path) and auto (what ``model.mlswa.backend: auto`` runs:
  below the crossover that is the dense backend, whose float mask is built once per batch), medians
  of ``--reps`` interleaved runs;
* peak extra memory of building the per-batch state (plan or dense mask) and one forward+backward
  (CPU: peak RSS growth in a fresh subprocess per case; CUDA: peak allocated bytes);
* the speedup of compact fast over dense, and the share of the fp32 matmul rate (2048^2, the faster of
  ``torch.mm`` and oneDNN on CPU, measured between the runs of the same row) that compact fast reaches on
  the needed FLOPs: 4 * N * keys_per_query * D * H forward, x3.5 for forward+backward.

A second table is the issue-2 view: forward and forward+backward time and peak memory side by side,
dense against compact fast, N = 1024..8192.

    python benchmarks/attention.py                 # full CPU table (a few minutes)
    python benchmarks/attention.py --quick         # N = 512..4096, 3 runs
    python benchmarks/attention.py --max-n 32768   # adds the 32768 memory-only row
    python benchmarks/attention.py --device cuda --max-n 65536 --methods dense,fast,flex,auto
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lhtcli.core import cpu_matmul, native
from lhtcli.core.attention import (
    DenseMask,
    MLSWAContext,
    build_flex_plan,
    build_mlswa_plan,
    compact_attention,
    dense_crossover,
    fast_compact_attention,
    flex_compact_attention,
    prepare_plan,
)
from lhtcli.core.positions import HierarchicalPositions, positions_from_lengths

WINDOWS = [256, 64, 16]
HEADS, DIM = 4, 64
ALL_NS = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
METHODS = ("dense", "explicit", "fast", "auto", "flex")
LABELS = {
    "dense": "dense",
    "explicit": "compact explicit",
    "fast": "compact fast",
    "auto": "auto",
    "flex": "flex",
}


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def realistic_document(n_tokens: int, seed: int = 0) -> list[list[int]]:
    """Sections -> sentence lengths totalling ``n_tokens`` (sentences 10-40 tokens, sections 5-30)."""
    rng = random.Random(seed)
    doc: list[list[int]] = []
    left = n_tokens
    while left > 0:
        section = []
        for _ in range(rng.randint(5, 30)):
            if left <= 0:
                break
            length = min(rng.randint(10, 40), left)
            section.append(length)
            left -= length
        doc.append(section)
    return doc


def realistic_positions(n: int, batch: int = 1, seed: int = 0) -> HierarchicalPositions:
    """``batch`` documents of exactly ``n`` positions ([DOC] included)."""
    return HierarchicalPositions.batch(
        [positions_from_lengths(realistic_document(n - 1, seed + b)) for b in range(batch)]
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_label(device: torch.device) -> str:
    """e.g. "cpu (AMD EPYC, 2 threads)": the machines these scripts run on change, and their numbers with them."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    name = native.cpuinfo("model name") or platform.processor() or platform.machine()
    return f"{device} ({name}, {torch.get_num_threads()} threads)"


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, reps: int = 7) -> float:
    """GFLOP/s of a 2048 x 2048 product (median): on CPU float32 the faster of torch.mm (MKL) and oneDNN,
    the two libraries the model's projections may run in (lhtcli/core/cpu_matmul.py)."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    products = [lambda: a @ b]
    if device.type == "cpu" and dtype == torch.float32 and cpu_matmul._onednn_available():
        products.append(lambda: cpu_matmul._onednn_linear(a, b))
    best = 0.0
    for product in products:
        times = []
        for _ in range(reps + 1):
            sync(device)
            start = time.perf_counter()
            product()
            sync(device)
            times.append(time.perf_counter() - start)
        best = max(best, 2 * 2048**3 / statistics.median(times[1:]) / 1e9)
    return best


def allowed_pairs(plan) -> int:
    """Exact number of allowed (query, key) pairs, from the plan's disjoint per-level band masks."""
    total = sum(int(lp.band_mask.sum()) for lp in plan.levels)
    if plan.doc_link_mask is not None:
        total += 2 * int(plan.doc_link_mask.sum())  # [DOC]'s row and its column
    return total


class Case:
    """Inputs of one N and the prepared per-batch state of every method.

    q, k and v are laid out as in the model: head-major views [B, H, N, D] of one token-major
    projection [B, N, 3, H, D]; the output gradient is token-major too (the model reshapes the
    attention output to [B, N, H * D])."""

    def __init__(self, n: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
        self.n, self.device, self.dtype = n, device, dtype
        self.positions = realistic_positions(n, seed=seed).to(device)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.qkv = torch.randn(1, n, 3, HEADS, DIM, generator=gen).to(device=device, dtype=dtype)
        self.qkv.requires_grad_(True)
        grad = torch.randn(1, n, HEADS, DIM, generator=gen).to(device=device, dtype=dtype)
        self.grad_out = grad.transpose(1, 2)
        self.prepared: dict[str, object] = {}
        self.prepare_ms: dict[str, float] = {}

    def prepare(self, method: str) -> None:
        """Build (and time) the per-batch state a method needs: plan, dense mask, or block mask."""
        sync(self.device)
        start = time.perf_counter()
        if method in ("explicit", "fast"):
            plan = build_mlswa_plan(self.positions, WINDOWS)
            if method == "fast":
                prepare_plan(plan, self.dtype)
            state: object = plan
        elif method == "dense":  # the baseline of PERF.md: SDPA with the bool mask
            state = DenseMask.from_positions(self.positions, WINDOWS).mask[:, None]
        elif method == "auto":
            state = MLSWAContext(self.positions, WINDOWS, "auto")
            plan = state.prepared(len(WINDOWS) - 1)
            if state.backend == "compact":
                prepare_plan(plan, self.dtype)
            elif state.backend == "dense":
                plan.additive(self.dtype)
        elif method == "flex":
            state = build_flex_plan(self.positions, WINDOWS)
        else:
            raise ValueError(f"unknown method {method!r}")
        sync(self.device)
        self.prepare_ms[method] = (time.perf_counter() - start) * 1e3
        self.prepared[method] = state

    def fn(self, method: str) -> Callable[[], torch.Tensor]:
        state = self.prepared[method]
        if method == "dense":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=state)
        if method == "explicit":
            return lambda q, k, v: compact_attention(q, k, v, state).out
        if method == "fast":
            return lambda q, k, v: fast_compact_attention(q, k, v, state)
        if method == "auto":
            return lambda q, k, v: state.attend(q, k, v, len(WINDOWS) - 1)
        return lambda q, k, v: flex_compact_attention(q, k, v, state)

    def heads(self) -> list[torch.Tensor]:
        """q, k, v split as the model splits them (unbind: its backward is one stack, not three
        zero-filled copies of the packed gradient)."""
        return [t.transpose(1, 2) for t in self.qkv.unbind(2)]

    def run(self, method: str, mode: str) -> float:
        """One call in ms; mode "fwd" (no grad) or "fwdbwd"."""
        fn = self.fn(method)
        self.qkv.grad = None
        sync(self.device)
        start = time.perf_counter()
        if mode == "fwd":
            with torch.no_grad():
                fn(*self.heads())
        else:
            fn(*self.heads()).backward(self.grad_out)
        sync(self.device)
        return (time.perf_counter() - start) * 1e3


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_memory_here(n: int, method: str, mode: str, device: torch.device, dtype: torch.dtype) -> float:
    """Peak extra MiB of building the per-batch state (plan, dense mask) and one call, over the inputs.

    A warm-up call at N=256 first pages in the kernels' code and thread pools, so that the number is
    the method's own working memory."""
    warm = Case(256, device, dtype)
    warm.prepare(method)
    warm.run(method, mode)
    del warm
    case = Case(n, device, dtype)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        case.prepare(method)
        case.run(method, mode)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with open("/proc/self/clear_refs", "w") as fh:  # resets the peak RSS (VmHWM) to the current RSS
        fh.write("5")
    base = _proc_status_kib("VmRSS")
    case.prepare(method)
    case.run(method, mode)
    return (_proc_status_kib("VmHWM") - base) / 1024


def measure_memory(n: int, method: str, mode: str, device: torch.device, dtype: torch.dtype, timeout: float):
    """CPU: in a fresh subprocess (peak RSS is per process); CUDA: in this process."""
    if device.type == "cuda":
        return measure_memory_here(n, method, mode, device, dtype)
    cmd = [
        sys.executable,
        __file__,
        "--memory-case",
        f"{n},{method},{mode}",
        "--dtype",
        str(dtype).split(".")[1],
        "--windows",
        ",".join(str(w) for w in WINDOWS),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
        return float(json.loads(done.stdout.strip().splitlines()[-1])["extra_mib"])
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError) as exc:
        print(f"  memory case N={n} {method} {mode} failed: {str(exc)[:200]}", file=sys.stderr)
        return float("nan")


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value >= 1000 and digits <= 1:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--ns", default=None, help="comma-separated N values (default 256..max-n)")
    parser.add_argument("--max-n", type=int, default=16384)
    parser.add_argument(
        "--timed-max-n", type=int, default=None, help="rows above are memory-only (CPU: 16384)"
    )
    parser.add_argument("--dense-max-n", type=int, default=None, help="largest N for dense (CPU: 16384)")
    parser.add_argument("--explicit-max-n", type=int, default=16384)
    parser.add_argument("--methods", default=None, help="comma list of dense,explicit,fast,auto,flex")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per cell (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--memory-timeout", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true", help="N = 512..4096, 3 runs, fewer memory cases")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    parser.add_argument(
        "--from-json", default=None, help="print the tables of saved --json files (comma list)"
    )
    parser.add_argument("--windows", default=None, help="window per level, e.g. 32,8,4 (default 256,64,16)")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.windows:
        WINDOWS[:] = [int(w) for w in args.windows.split(",")]
    if args.from_json:
        return _print_saved(args.from_json.split(","))
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    if args.memory_case:
        n, method, mode = args.memory_case.split(",")
        print(json.dumps({"extra_mib": measure_memory_here(int(n), method, mode, device, dtype)}))
        return 0

    cuda = device.type == "cuda"
    if args.quick:
        args.reps = min(args.reps, 3)
        ns = [512, 1024, 2048, 4096]
    elif args.ns:
        ns = [int(x) for x in args.ns.split(",")]
    else:
        ns = [n for n in ALL_NS if n <= args.max_n]
    timed_max = args.timed_max_n or (max(ns) if cuda else 16384)
    dense_max = args.dense_max_n or (16384 if cuda else 16384)
    methods = (
        args.methods.split(",")
        if args.methods
        else (["dense", "explicit", "fast", "auto"] + (["flex"] if cuda else []))
    )
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}")

    def active(method: str, n: int) -> bool:
        if method == "dense":
            return n <= dense_max
        if method == "explicit":
            return n <= args.explicit_max_n
        return True

    rate = matmul_rate(device, torch.float32)
    crossover = dense_crossover(WINDOWS[0], device.type == "cpu" and native.ready())
    kernel = "native" if device.type == "cpu" and native.ready() else "flash"
    print(
        f"device {device_label(device)}, torch {torch.__version__}, {args.dtype}; "
        f"B=1 H={HEADS} D={DIM} windows {WINDOWS}; fp32 matmul 2048^2: {rate:.0f} GFLOP/s; "
        f"medians of {args.reps} interleaved runs; level-0 kernel: {kernel}; auto = dense up to N={crossover}"
    )
    results: dict[int, dict] = {}
    for n in ns:
        row: dict = {"n": n, "times": {}, "memory": {}}
        results[n] = row
        case = Case(n, device, dtype)
        case.prepare("fast")
        plan = case.prepared["fast"]
        row["keys_per_query"] = allowed_pairs(plan) / n
        row["plan_ms"] = case.prepare_ms["fast"]
        row["flops_fwd"] = 4 * n * row["keys_per_query"] * DIM * HEADS
        todo = [m for m in methods if active(m, n)]
        if n <= timed_max:
            for m in todo:
                if m != "fast":
                    case.prepare(m)
            row["auto_backend"] = case.prepared["auto"].backend if "auto" in todo else None
            samples = {(m, mode): [] for m in todo for mode in ("fwd", "fwdbwd")}
            plan_ms, rates = [], []
            for rep in range(args.warmup + args.reps):
                for m in todo:
                    for mode in ("fwd", "fwdbwd"):
                        ms = case.run(m, mode)
                        if rep >= args.warmup:
                            samples[(m, mode)].append(ms)
                plan_ms.append(_time_plan(case))
                rates.append(matmul_rate(device, torch.float32, reps=1))
            for (m, mode), values in samples.items():
                row["times"][f"{m}:{mode}"] = statistics.median(values)
            row["plan_ms"] = statistics.median(plan_ms)
            row["matmul_gflops"] = statistics.median(rates)
        else:
            row["plan_ms"] = statistics.median([_time_plan(case) for _ in range(3)])
        del case
        if not args.no_memory:
            mem_methods = (
                ["fast", "dense"]
                if args.quick
                else [m for m in ("fast", "dense", "explicit") if m in methods]
            )
            modes = ["fwdbwd", "fwd"] if 1024 <= n <= 8192 else ["fwdbwd"]
            for m in mem_methods:
                if not active(m, n) or (m == "explicit" and n > 16384):
                    continue
                for mode in modes:
                    if m == "explicit" and mode == "fwd":
                        continue
                    row["memory"][f"{m}:{mode}"] = measure_memory(
                        n, m, mode, device, dtype, args.memory_timeout
                    )
        _print_progress(row)

    print()
    print(_main_table(results, methods, rate))
    print()
    print(_issue2_table(results))
    fast_wins = [n for n in ns if _speedup(results[n]) is not None and _speedup(results[n]) > 1]
    if fast_wins:
        print(
            f"\ncompact fast beats dense (fwd+bwd) from N={min(fast_wins)} in this run; "
            f"auto switches above N={crossover}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"matmul_gflops": rate, "rows": list(results.values())}, indent=1)
        )
    return 0


def _print_saved(paths: list[str]) -> int:
    """Merge saved runs (a later file's row replaces an earlier one of the same N) and print them."""
    rows: dict[int, dict] = {}
    methods: list[str] = []
    rate = None
    for path in paths:
        data = json.loads(Path(path).read_text())
        rate = rate or data["matmul_gflops"]
        for row in data["rows"]:
            rows[row["n"]] = row
            for key in row["times"]:
                name = key.split(":")[0]
                if name not in methods:
                    methods.append(name)
    results = dict(sorted(rows.items()))
    methods = [m for m in METHODS if m in methods]
    print(_main_table(results, methods, rate))
    print()
    print(_issue2_table(results))
    return 0


def _time_plan(case: Case) -> float:
    sync(case.device)
    start = time.perf_counter()
    prepare_plan(build_mlswa_plan(case.positions, WINDOWS), case.dtype)
    sync(case.device)
    return (time.perf_counter() - start) * 1e3


def _speedup(row: dict) -> float | None:
    dense, fast = row["times"].get("dense:fwdbwd"), row["times"].get("fast:fwdbwd")
    return dense / fast if dense and fast else None


def _print_progress(row: dict) -> None:
    cells = ", ".join(f"{k} {v:.1f} ms" for k, v in row["times"].items())
    mem = ", ".join(f"{k} {v:.0f} MiB" for k, v in row["memory"].items())
    print(f"N={row['n']}: plan {row['plan_ms']:.1f} ms; {cells}; {mem}", file=sys.stderr, flush=True)


def _main_table(results: dict[int, dict], methods: list[str], rate: float) -> str:
    headers = ["N", "keys/q", "plan ms", "plan % of f+b"]
    for m in methods:
        headers += [f"{LABELS[m]} fwd", f"{LABELS[m]} f+b"]
    headers += ["peak MiB f+b (fast / dense / explicit)", "speedup f+b vs dense", "% matmul f+b (fast)"]
    rows = []
    for n, row in results.items():
        t = row["times"]
        fast_fb = t.get("fast:fwdbwd")
        share = 100 * row["plan_ms"] / fast_fb if fast_fb else None
        cells = [str(n), f"{row['keys_per_query']:.0f}", fmt(row["plan_ms"]), fmt(share)]
        for m in methods:
            auto = f" ({row.get('auto_backend')})" if m == "auto" and t.get("auto:fwdbwd") else ""
            cells += [fmt(t.get(f"{m}:fwd")), fmt(t.get(f"{m}:fwdbwd")) + auto]
        mem = row["memory"]
        cells.append(" / ".join(fmt(mem.get(f"{m}:fwdbwd"), 0) for m in ("fast", "dense", "explicit")))
        speed = _speedup(row)
        cells.append(f"{speed:.1f}x" if speed else "-")
        row_rate = row.get("matmul_gflops", rate)
        pct = 100 * 3.5 * row["flops_fwd"] / (fast_fb / 1e3) / (row_rate * 1e9) if fast_fb else None
        cells.append(fmt(pct))
        rows.append(cells)
    note = "times in ms (median); memory = peak extra MiB of the per-batch state (plan or mask) plus one call"
    return note + "\n" + markdown(headers, rows)


def _issue2_table(results: dict[int, dict]) -> str:
    headers = ["N", "method", "fwd ms", "fwd peak MiB", "fwd+bwd ms", "fwd+bwd peak MiB"]
    rows = []
    for n, row in results.items():
        if not 1024 <= n <= 8192:
            continue
        for m in ("dense", "fast"):
            t, mem = row["times"], row["memory"]
            if f"{m}:fwdbwd" not in t:
                continue
            rows.append(
                [
                    str(n),
                    LABELS[m],
                    fmt(t.get(f"{m}:fwd")),
                    fmt(mem.get(f"{m}:fwd"), 0),
                    fmt(t.get(f"{m}:fwdbwd")),
                    fmt(mem.get(f"{m}:fwdbwd"), 0),
                ]
            )
    return "issue 2: forward and forward+backward, time and peak extra memory\n" + markdown(headers, rows)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
