"""Training slowdown from the in-training visualisations (``training.log_viz_every``).

    python benchmarks/viz_overhead.py                  # default config, 160 steps, figures every 50 vs none
    python benchmarks/viz_overhead.py --every 50,200 --steps 200

Each run is a real ``lht train`` with TensorBoard logging; the visualisation steps render the
heatmap, the gradient-flow chart, the prediction table and the entropy statistics and write them
to the event file. Throughput counts every step including those, so the ratio is the slowdown a
user sees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lht_runs import markdown_table, run_train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=160, help="optimizer steps per run")
    parser.add_argument("--every", default="50", help="comma list of log_viz_every values to compare with 0")
    args = parser.parse_args()
    common = [f"training.num_steps={args.steps}", "training.log_every=10", f"training.eval_every={args.steps}",
              f"training.save_every={args.steps}", "training.time_limit_minutes=null", "logging.backend=tensorboard"]
    print(f"# lht train, default config, {args.steps} steps, TensorBoard logging\n")
    results = [run_train("no visualisations", [*common, "training.log_viz_every=0"])]
    for every in (int(v) for v in args.every.split(",")):
        results.append(run_train(f"log_viz_every={every}", [*common, f"training.log_viz_every={every}"]))
    print(markdown_table(results, results[0]))
    for r in results[1:]:
        slowdown = results[0].tokens_per_second / r.tokens_per_second - 1
        print(f"\n{r.label}: {slowdown:+.1%} time per token against no visualisations")


if __name__ == "__main__":
    main()
