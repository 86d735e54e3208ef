"""Step time of the default model (cpu_small.yaml) at several training masking rates, interleaved.

The MLM head and the last layer run on the masked rows only, so a higher ``training.mlm_probability``
costs time per step. One process, the rates taking turns step by step (forward + backward + AdamW,
8 x 512 tokens of a realistic document structure), median step time and speed relative to the first rate.

    python benchmarks/masking_rate.py                      # rates 0.15, 0.3, 0.4, 0.5; 10 timed steps
    python benchmarks/masking_rate.py --rates 0.15,0.4 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import device_label, realistic_document  # noqa: E402

from lhtcli.config import default_config_path, load_config  # noqa: E402
from lhtcli.core.positions import HierarchicalPositions, positions_from_lengths  # noqa: E402
from lhtcli.model import LHTEncoder  # noqa: E402
from lhtcli.training.allocator import reuse_freed_memory  # noqa: E402
from lhtcli.training.optimizer import build_adamw  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="0.15,0.3,0.4,0.5")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per rate (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=6780, help="the default run's trained vocabulary")
    args = parser.parse_args(argv)
    reuse_freed_memory()  # as `lht train` does
    cfg = load_config(default_config_path(), [f"model.vocab_size={args.vocab}"])
    batch, n = cfg.training.batch_size, cfg.model.max_seq_len
    gen = torch.Generator().manual_seed(0)
    documents = [realistic_document(n - 1, b) for b in range(batch)]
    positions = HierarchicalPositions.batch([positions_from_lengths(d) for d in documents])
    ids = torch.randint(5, args.vocab, (batch, n), generator=gen)
    rates = [float(r) for r in args.rates.split(",")]
    runs = {}
    for rate in rates:
        torch.manual_seed(0)
        model = LHTEncoder(cfg.model).train()
        labels = torch.where(torch.rand(batch, n, generator=gen) < rate, ids, torch.full_like(ids, -100))
        runs[rate] = (model, build_adamw(model, lr=1e-3, weight_decay=0.01), labels)
    times: dict[float, list[float]] = {rate: [] for rate in rates}
    for step in range(args.warmup + args.steps):
        for rate, (model, opt, labels) in runs.items():
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            model(ids, positions, labels=labels, return_logits=False).loss.backward()
            opt.step()
            if step >= args.warmup:
                times[rate].append(time.perf_counter() - start)
    print(f"device {device_label(torch.device('cpu'))}; default model, {batch} x {n} tokens, vocabulary {args.vocab}")
    print()
    print("| training mlm_probability | ms/step | speed vs the first rate |")
    print("|---:|---:|---:|")
    for rate in rates:
        ratios = sorted(a / b for a, b in zip(times[rates[0]], times[rate], strict=True))
        print(f"| {rate:g} | {statistics.median(times[rate]) * 1000:.0f} | {statistics.median(ratios):.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
