"""Throughput of ``lht train`` on 1 process against N DDP processes (torchrun), same global batch.

    python benchmarks/distributed.py                       # default config, CPU, 1 vs 2 processes
    python benchmarks/distributed.py --steps 60 --nproc 2
    python benchmarks/distributed.py --device cuda --nproc 1   # on a GPU machine: nccl on 1 GPU

Both runs use the built-in default config with the same global batch and seed (the single process
accumulates N micro-batches of batch / N sequences, each rank takes one), so their losses agree;
the table shows the tokens/s each reaches and the ratio, i.e. the DDP overhead (or gain). On a
2-core CPU, 2 processes of 1 thread each do the same work as 1 process of 2 threads, so expect a
ratio near or below 1: the point is correctness plus the cost of gradient all-reduce. With
``--nproc 1`` the second run is a 1-rank torchrun job (DDP on).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lht_runs import markdown_table, run_train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="processes of the DDP run")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.batch % args.nproc:
        parser.error("--batch must be a multiple of --nproc")

    common = [f"training.num_steps={args.steps}", "training.log_every=5", f"training.eval_every={args.steps}",
              f"training.save_every={args.steps}", "training.log_viz_every=0", "training.time_limit_minutes=null",
              f"device={args.device}"]
    print(f"# lht train, default config, {args.steps} steps, global batch {args.batch}, device {args.device}, "
          f"{os.cpu_count()} CPU cores\n")
    # The same batches in both runs: N ranks each take every N-th micro-batch of the one seeded stream,
    # so one process must take them all, N micro-batches per step.
    per_rank = args.batch // args.nproc
    single = run_train(f"1 process (no DDP), {args.nproc} micro-batches of {per_rank}",
                       [*common, f"training.batch_size={per_rank}", f"training.grad_accum_steps={args.nproc}"])
    # Split the cores between ranks as `lht train --nproc` does.
    threads = str(max(1, (os.cpu_count() or 1) // args.nproc))
    ddp = run_train(f"{args.nproc} process(es), torchrun + DDP, {threads} thread(s) each",
                    [*common, f"training.batch_size={per_rank}"],
                    nproc=args.nproc, env={"OMP_NUM_THREADS": threads})
    print(markdown_table([single, ddp], single))
    print(f"\nloss difference at step {single.steps}: {abs(single.final_loss - ddp.final_loss):.2e} "
          f"(same global batch and seed: should be ~0)")


if __name__ == "__main__":
    main()
