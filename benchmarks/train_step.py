"""Whole training steps (forward + backward + AdamW step) with ML-SWA against dense attention.

The same model (same initial weights, same batch) is built once per attention backend and timed
side by side: seconds per step, tokens per second, peak memory and an estimated MFU
(``model.flops_per_token`` x tokens/s over the matmul rate measured in the same run, the better of
before and after the steps: fp32 on CPU, the faster of torch.mm and oneDNN; bf16 on CUDA with mixed
precision). Each step builds its own attention context (plan or dense mask), as training does for every
new batch.

    python benchmarks/train_step.py                        # 6 layers, d_model 256, N=4096 on CPU
    python benchmarks/train_step.py --backends auto,dense --steps 5
    python benchmarks/train_step.py --interleave --steps 7     # steadier ratio on a noisy machine
    python benchmarks/train_step.py --repeat 5 --steps 5       # fresh processes, alternating, 5 rounds
    python benchmarks/train_step.py --config configs/pretrain_hierarchical.yaml --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import _proc_status_kib, device_label, matmul_rate, realistic_document, sync  # noqa: E402

from lhtcli.config import ModelConfig, load_config  # noqa: E402
from lhtcli.core.attention import choose_backend  # noqa: E402
from lhtcli.core.positions import HierarchicalPositions, positions_from_lengths  # noqa: E402
from lhtcli.model import LHTEncoder, describe_size  # noqa: E402
from lhtcli.training.allocator import reuse_freed_memory  # noqa: E402
from lhtcli.training.optimizer import build_adamw  # noqa: E402


def mid_size_config(seq_len: int, vocab: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, d_model=256, n_heads=4, num_layers=6, d_ff=1024, max_seq_len=seq_len, dropout=0.1
    )


def make_batch(batch: int, seq_len: int, vocab: int, device: torch.device, seed: int = 0):
    """Random token ids over realistic document structure, and MLM labels on 15% of the tokens."""
    gen = torch.Generator().manual_seed(seed)
    positions = HierarchicalPositions.batch(
        [positions_from_lengths(realistic_document(seq_len - 1, seed + b)) for b in range(batch)]
    )
    ids = torch.randint(5, vocab, (batch, seq_len), generator=gen)
    labels = torch.where(torch.rand(batch, seq_len, generator=gen) < 0.15, ids, torch.full_like(ids, -100))
    return ids.to(device), positions.to(device), labels.to(device)


def build(cfg: ModelConfig, backend: str, device: torch.device):
    cfg = cfg.model_copy(deep=True)
    cfg.mlswa.backend = backend
    torch.manual_seed(0)
    model = LHTEncoder(cfg).to(device)
    return cfg, model, build_adamw(model, lr=1e-4, weight_decay=0.01)  # as `lht train` builds it


def one_step(model, opt, batch, amp, device: torch.device) -> tuple[float, float]:
    """(seconds, loss) of forward + backward + AdamW step, with a fresh attention context."""
    ids, positions, labels = batch
    sync(device)
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with amp:
        loss = model(ids, positions, labels=labels, return_logits=False).loss  # the head as training runs it
    loss.backward()
    opt.step()
    sync(device)
    return time.perf_counter() - start, float(loss.detach())


def autocast(args, device: torch.device):
    if device.type == "cuda" and args.amp == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def result(cfg: ModelConfig, backend: str, batch, times: list[float], first_loss: float, peak, device) -> dict:
    ids = batch[0]
    step_s = statistics.median(times)
    return {
        "backend": backend,
        "tokens": ids.numel(),
        "runs": choose_backend(ids.shape[1], device, backend, token_window=cfg.mlswa.window_size_per_level[0],
                               batch_size=ids.shape[0]),
        "s_per_step": step_s,
        "tokens_per_s": ids.numel() / step_s,
        "peak_gib": peak,
        "first_loss": first_loss,
    }


def time_backend(cfg: ModelConfig, backend: str, batch, args, device: torch.device) -> dict:
    cfg, model, opt = build(cfg, backend, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _proc_status_kib("VmRSS") * 1024
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        seconds, loss = one_step(model, opt, batch, autocast(args, device), device)
        if step >= args.warmup:
            times.append(seconds)
        losses.append(loss)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    else:
        peak = (_proc_status_kib("VmHWM") * 1024 - base) / 2**30
    return result(cfg, backend, batch, times, losses[0], peak, device)


def time_interleaved(cfg: ModelConfig, backends: list[str], batch, args, device: torch.device) -> list[dict]:
    """All backends in one process, taking turns step by step, so that the machine's load swings
    (10-50% on shared hosts) hit every backend alike; the ratio is then far steadier. No memory column.
    Each row also gets its per-round times (``round_s``) for the per-round speedups."""
    built = {b: build(cfg, b, device) for b in backends}
    times: dict[str, list[float]] = {b: [] for b in backends}
    first: dict[str, float] = {}
    for step in range(args.warmup + args.steps):
        for b, (_, model, opt) in built.items():
            torch.manual_seed(step)  # the same dropout masks for every backend
            seconds, loss = one_step(model, opt, batch, autocast(args, device), device)
            first.setdefault(b, loss)
            if step >= args.warmup:
                times[b].append(seconds)
    rows = [result(built[b][0], b, batch, times[b], first[b], float("nan"), device) for b in backends]
    for row in rows:
        row["round_s"] = times[row["backend"]]
    return rows


def combine_runs(results: list[dict], keep_rounds: bool) -> dict:
    """One row from ``--repeat`` runs of a backend: the median of their medians, the largest peak, and
    (several runs) each run's median as a round for the per-round speedups."""
    row = dict(results[0])
    row["s_per_step"] = statistics.median(r["s_per_step"] for r in results)
    row["tokens_per_s"] = row["tokens"] / row["s_per_step"]
    row["peak_gib"] = max(r["peak_gib"] for r in results)
    if keep_rounds:
        row["round_s"] = [r["s_per_step"] for r in results]
    return row


def per_round_speedup(row: dict, base: dict) -> str:
    """Median and quartiles of dense/this over the rounds (each round: the backends back to back, step by
    step with ``--interleave`` or run by run with ``--repeat``, so a load swing hits both sides of one ratio
    alike)."""
    ratios = sorted(b / r for b, r in zip(base["round_s"], row["round_s"], strict=True))
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    return f"{statistics.median(ratios):.2f}x ({q1:.2f}-{q3:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help="take the model section of this YAML config")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=None, help="default 4096 (config: model.max_seq_len)")
    parser.add_argument("--batch", type=int, default=None, help="default 1 (config: training.batch_size)")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary when the config has none")
    parser.add_argument("--backends", default="auto,dense", help="comma list of auto,compact,dense,flex")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per backend (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", default="bf16", choices=["bf16", "none"], help="CUDA mixed precision")
    parser.add_argument("--in-process", action="store_true", help="CPU: no subprocess per backend")
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="run the backends this many times, alternating (a fresh process each on CPU); adds per-round speedups",
    )
    parser.add_argument(
        "--interleave", action="store_true", help="one process, backends take turns step by step (no memory column)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        reuse_freed_memory()  # as `lht train` does (buffers reused step to step, no fresh pages)

    if args.config:
        full = load_config(args.config)
        cfg = full.model.model_copy(deep=True)
        if cfg.vocab_size is None:
            cfg.vocab_size = args.vocab
        seq_len = args.seq_len or cfg.max_seq_len
        batch_size = args.batch or full.training.batch_size
        if full.training.mixed_precision == "none":
            args.amp = "none"
    else:
        seq_len = args.seq_len or 4096
        cfg = mid_size_config(seq_len, args.vocab)
        batch_size = args.batch or 1
    cfg.max_seq_len = max(cfg.max_seq_len, seq_len)
    mixed = device.type == "cuda" and args.amp == "bf16"
    if args.child:
        batch = make_batch(batch_size, seq_len, cfg.vocab_size, device)
        print(json.dumps(time_backend(cfg, args.backends, batch, args, device)))
        return 0
    rate = matmul_rate(device, torch.bfloat16 if mixed else torch.float32)
    probe = LHTEncoder(cfg)
    # The head runs on the labelled 15% only, as in training.
    params, flops_per_token = probe.num_parameters(), probe.flops_per_token(seq_len, head_fraction=0.15)
    del probe
    print(
        f"device {device_label(device)}, torch {torch.__version__}; model "
        f"{describe_size(params)} params: {cfg.num_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.n_heads} heads, "
        f"d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, windows {cfg.mlswa.window_size_per_level}; batch "
        f"{batch_size} x N={seq_len}; {'bf16 autocast' if mixed else 'fp32'}; "
        f"median of {args.steps} steps after {args.warmup} warm-up",
        flush=True,
    )
    isolate = device.type == "cpu" and not (args.in_process or args.interleave)  # peak RSS is per process
    batch = None if isolate else make_batch(batch_size, seq_len, cfg.vocab_size, device)
    rows = []
    if args.interleave:
        rows = time_interleaved(cfg, args.backends.split(","), batch, args, device)
    runs: dict[str, list[dict]] = {}
    for _ in range(0 if args.interleave else args.repeat):
        for backend in args.backends.split(","):
            if isolate:
                child = [a for a in (argv if argv is not None else sys.argv[1:])]
                cmd = [sys.executable, __file__, *child, "--backends", backend, "--child"]
                if "--seq-len" not in child:
                    cmd += ["--seq-len", str(seq_len)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
            else:
                result = time_backend(cfg, backend, batch, args, device)
            runs.setdefault(backend, []).append(result)
            print(f"  {backend}: {result['s_per_step']:.3f} s/step", file=sys.stderr, flush=True)
    rows += [combine_runs(results, args.repeat > 1) for results in runs.values()]
    # A shared machine's load swings within minutes: MFU is against the better of the rates measured
    # before and after the steps (one slow measurement would otherwise inflate every MFU).
    rate_after = matmul_rate(device, torch.bfloat16 if mixed else torch.float32)
    print(f"matmul rate {max(rate, rate_after):.0f} GFLOP/s (before the steps {rate:.0f}, after {rate_after:.0f})")
    rate = max(rate, rate_after)

    base = next((r for r in rows if r["runs"] == "dense"), None)
    rounds = base is not None and "round_s" in base
    extra = " per-round speedup: median (quartiles) |" if rounds else ""
    print(f"\n| backend (runs) | s/step | tokens/s | est. MFU % | peak extra GiB | speedup vs dense |{extra}")
    print("|---|---|---|---|---|---|" + ("---|" if rounds else ""))
    for r in rows:
        mfu = 100 * flops_per_token * r["tokens_per_s"] / (rate * 1e9)
        speed = f"{base['s_per_step'] / r['s_per_step']:.2f}x" if base else "-"
        peak = "-" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.2f}"
        print(
            f"| {r['backend']} ({r['runs']}) | {r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{mfu:.1f} | {peak} | {speed} |" + (f" {per_round_speedup(r, base)} |" if rounds else "")
        )
    losses = {r["backend"]: r["first_loss"] for r in rows}
    spread = max(losses.values()) - min(losses.values())
    print(f"\nfirst-step loss per backend {losses} (spread {spread:.2e}: same model, exact attention)")
    return 0 if math.isfinite(spread) else 1


if __name__ == "__main__":
    sys.exit(main())
