"""lht against Hugging Face encoders of the same size: one training step (forward, backward, AdamW).

Models of the same shape (6 layers, d_model 256, 4 heads, d_ff 1024, vocabulary 8000, dropout 0.1),
built from configs with random weights (nothing is downloaded), one sequence of N tokens, 15% of them
MLM targets:

* ``lht``: ML-SWA, windows [w, 64, 16] (tokens, sentences, sections; w = 256 by default) over a
  realistic document structure, the attention backend ``auto`` picks, the MLM head on the targets only
  (as ``lht train`` runs it);
* ``bert``: ``BertForMaskedLM`` with SDPA attention (full N x N attention);
* ``longformer``: ``LongformerForMaskedLM`` with ``attention_window = 2w`` (w each side, as lht's
  token window) and global attention on the first token, as lht's ``[DOC]``;
* ``modernbert``: ``ModernBertForMaskedLM`` with local attention ``2w`` in every layer
  (``layer_types`` all sliding) and ``sparse_prediction`` (its MLM head on the targets only). Its MLP
  is gated (GLU), so the same ``intermediate_size`` gives it 1.5x lht's MLP weights.

The models take turns step by step in one process (interleaved rounds), so a swing of the machine's
load hits all of them alike; each cell is the median over the rounds. Needs ``transformers``
(``pip install 'lhtcli[peers]'``).

    python benchmarks/peers.py                                  # N = 1024, 4096, 8192 on CPU
    python benchmarks/peers.py --ns 1024 --steps 2 --models lht,bert
    python benchmarks/peers.py --device cuda --amp bf16 --json peers.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import device_label, realistic_document, sync  # noqa: E402

from lhtcli.config import ModelConfig  # noqa: E402
from lhtcli.core.attention import choose_backend  # noqa: E402
from lhtcli.core.positions import HierarchicalPositions, positions_from_lengths  # noqa: E402
from lhtcli.model import LHTEncoder  # noqa: E402
from lhtcli.training.allocator import reuse_freed_memory  # noqa: E402
from lhtcli.training.optimizer import build_adamw  # noqa: E402

MODELS = ("lht", "bert", "longformer", "modernbert")
SHAPE = {"d_model": 256, "n_heads": 4, "num_layers": 6, "d_ff": 1024}


def lht_model(n: int, vocab: int, window: int, shape: dict, dropout: float):
    cfg = ModelConfig(vocab_size=vocab, d_model=shape["d_model"], n_heads=shape["n_heads"],
                      num_layers=shape["num_layers"], d_ff=shape["d_ff"], max_seq_len=n, dropout=dropout)
    cfg.mlswa.window_size_per_level = [window, 64, 16]
    cfg.mlswa.layer_max_level = [2] * shape["num_layers"]
    return LHTEncoder(cfg)


def hf_model(name: str, n: int, vocab: int, window: int, shape: dict, dropout: float):
    """A randomly initialised Hugging Face masked-LM of the same shape (built from its config)."""
    import transformers as tf

    common = {"vocab_size": vocab, "hidden_size": shape["d_model"], "num_attention_heads": shape["n_heads"],
              "num_hidden_layers": shape["num_layers"], "intermediate_size": shape["d_ff"], "pad_token_id": 0}
    if name == "bert":
        config = tf.BertConfig(**common, max_position_embeddings=n, hidden_dropout_prob=dropout,
                               attention_probs_dropout_prob=dropout)
        return tf.BertForMaskedLM._from_config(config, attn_implementation="sdpa")
    if name == "longformer":
        config = tf.LongformerConfig(**common, max_position_embeddings=n + 2, attention_window=2 * window,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        return tf.LongformerForMaskedLM(config)
    if name == "modernbert":
        config = tf.ModernBertConfig(**common, max_position_embeddings=n, local_attention=2 * window,
                                     layer_types=["sliding_attention"] * shape["num_layers"],
                                     mlp_dropout=dropout, attention_dropout=dropout, embedding_dropout=dropout,
                                     sparse_prediction=True, bos_token_id=1, cls_token_id=1, eos_token_id=2,
                                     sep_token_id=2)
        return tf.ModernBertForMaskedLM._from_config(config, attn_implementation="sdpa")
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def make_inputs(n: int, vocab: int, device: torch.device, seed: int = 0):
    """One sequence: ids, MLM labels on 15% of the tokens (never the first), and lht's positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (1, n), generator=gen)
    targets = torch.rand(1, n, generator=gen) < 0.15
    targets[:, 0] = False
    labels = torch.where(targets, ids, torch.full_like(ids, -100))
    positions = HierarchicalPositions.batch([positions_from_lengths(realistic_document(n - 1, seed))])
    return ids.to(device), labels.to(device), positions.to(device)


class Contender:
    """A model, its AdamW and how to run one training step on the shared inputs."""

    def __init__(self, name: str, n: int, args, device: torch.device) -> None:
        self.name = name
        torch.manual_seed(0)
        if name == "lht":
            self.model = lht_model(n, args.vocab, args.window, SHAPE, args.dropout).to(device)
            self.opt = build_adamw(self.model, lr=1e-4, weight_decay=0.01)  # as `lht train` builds it
        else:
            self.model = hf_model(name, n, args.vocab, args.window, SHAPE, args.dropout).to(device)
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
        self.model.train()
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def loss(self, ids, labels, positions):
        if self.name == "lht":
            return self.model(ids, positions, labels=labels, return_logits=False).loss
        mask = torch.ones_like(ids)
        if self.name == "longformer":
            global_mask = torch.zeros_like(ids)
            global_mask[:, 0] = 1  # the first token is global, as lht's [DOC]
            return self.model(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask,
                              labels=labels).loss
        return self.model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def step(self, inputs, amp, device: torch.device) -> float:
        sync(device)
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with amp:
            loss = self.loss(*inputs)
        loss.backward()
        self.opt.step()
        sync(device)
        if not torch.isfinite(loss.detach()):
            raise RuntimeError(f"{self.name}: non-finite loss")
        return time.perf_counter() - start


def run_n(n: int, names: list[str], args, device: torch.device) -> list[dict]:
    """Interleaved rounds at one N; a model that runs out of memory drops out (its row says so)."""
    inputs = make_inputs(n, args.vocab, device)
    contenders = [Contender(name, n, args, device) for name in names]
    amp = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" and args.amp == "bf16"
           else contextlib.nullcontext())
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    failed: dict[str, str] = {}
    for round_index in range(args.warmup + args.steps):
        for contender in contenders:
            if contender.name in failed:
                continue
            torch.manual_seed(round_index)
            try:
                seconds = contender.step(inputs, amp, device)
            except (MemoryError, RuntimeError) as exc:  # an allocation beyond --max-gib, or CUDA OOM
                failed[contender.name] = f"failed: {str(exc).splitlines()[0][:80]}"
                contender.opt.zero_grad(set_to_none=True)
                continue
            if round_index >= args.warmup:
                times[contender.name].append(seconds)
    rows = []
    for contender in contenders:
        row = {"model": contender.name, "n": n, "parameters": contender.parameters}
        if contender.name in failed:
            row["error"] = failed[contender.name]
        else:
            s = statistics.median(times[contender.name])
            row.update(s_per_step=s, tokens_per_s=n / s, rounds_s=times[contender.name])
        rows.append(row)
    if "lht" in times and "lht" not in failed:
        for row in rows:
            if "rounds_s" in row:
                ratios = sorted(other / mine for other, mine in zip(row["rounds_s"], times["lht"], strict=True))
                row["lht_speedup"] = statistics.median(ratios)
    for contender in contenders:
        del contender.model, contender.opt
    return rows


def run_n_in_child(n: int, argv: list[str]) -> list[dict]:
    """One N in a fresh process (under the --max-gib address-space limit): a crash loses only that N."""
    done = subprocess.run([sys.executable, __file__, *argv, "--ns", str(n), "--child"], capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:100]
        return [{"model": "all", "n": n, "parameters": 0, "error": f"failed: {reason}"}]
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    print()
    print("| N | model | parameters | s/step | tokens/s | lht speedup |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['n']} | {row['model']} | {row['parameters'] / 1e6:.2f}M | {row['error']} | | |")
            continue
        speedup = "" if row["model"] == "lht" or "lht_speedup" not in row else f"{row['lht_speedup']:.2f}x"
        print(f"| {row['n']} | {row['model']} | {row['parameters'] / 1e6:.2f}M | {row['s_per_step']:.3f} | "
              f"{row['tokens_per_s']:,.0f} | {speedup} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ns", default="1024,4096,8192", help="comma list of sequence lengths")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--window", type=int, default=256, help="lht's token window w (the others get 2w)")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "none"], help="CUDA mixed precision")
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)  # tests: d_model,heads,layers,d_ff
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--max-gib", type=float, default=12.0,
                        help="CPU: address-space limit of each N's process, so a model that needs more fails "
                        "alone instead of waking the OOM killer on a shared machine (0 = none)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        import transformers
    except ImportError:
        print("benchmarks/peers.py needs transformers: pip install 'lhtcli[peers]'", file=sys.stderr)
        return 2
    transformers.logging.set_verbosity_error()
    if args.shape:
        d, h, layers, ff = (int(x) for x in args.shape.split(","))
        SHAPE.update(d_model=d, n_heads=h, num_layers=layers, d_ff=ff)
    device = torch.device(args.device)
    if device.type == "cpu":
        reuse_freed_memory()  # as `lht train` does
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.child:
        if device.type == "cpu" and args.max_gib > 0:
            limit = int(args.max_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(run_n(int(args.ns), names, args, device)))
        return 0
    rows: list[dict] = []
    parent_argv = [a for a in argv if a != "--child"]
    for n in (int(x) for x in args.ns.split(",")):
        ns_free = _without_option(parent_argv, "--ns")
        rows += run_n_in_child(n, ns_free) if device.type == "cpu" else run_n(n, names, args, device)
        print(f"N={n} done", file=sys.stderr, flush=True)
    lht_runs = {n: choose_backend(n, device, "auto", token_window=args.window, batch_size=1)
                for n in sorted({r["n"] for r in rows})}
    header = (f"device {device_label(device)}; transformers {transformers.__version__}, torch {torch.__version__}; "
              f"shape {SHAPE}; lht window {args.window} (backend per N: {lht_runs}), others 2w = {2 * args.window}; "
              f"median of {args.steps} interleaved rounds after {args.warmup} warm-up")
    print_table(rows, header)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    return 0


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(option + "="):
            out.append(item)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
