"""End-to-end training on tiny configs: learning, exact resume, logging backends, checkpoint errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from training_helpers import tiny_overrides, write_corpus

from lhtcli.config import load_config
from lhtcli.training.checkpoint import load_checkpoint
from lhtcli.training.metrics import read_metrics
from lhtcli.training.trainer import run_training


@pytest.fixture
def corpus(in_tmp: Path) -> Path:
    return write_corpus(in_tmp / "corpus.jsonl")


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r}


def test_twenty_steps_learn_and_write_checkpoints(corpus: Path):
    cfg = load_config(None, tiny_overrides(corpus))
    summary = run_training(cfg, quiet=True)
    assert summary.steps == 20
    by_step = losses(cfg.run_dir())
    first = sum(by_step[s] for s in range(1, 4)) / 3
    last = sum(by_step[s] for s in range(18, 21)) / 3
    assert last < first - 0.5, (first, last)
    assert summary.val and 0.0 <= summary.val["accuracy"] <= 1.0
    assert set(summary.baselines) == {"unigram", "bigram"}
    ckpt_dir = cfg.checkpoint_dir()
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["checkpoint-10.ckpt", "checkpoint-20.ckpt", "last.ckpt"]
    ckpt = load_checkpoint(ckpt_dir / "last.ckpt")
    assert ckpt.step == 20 and ckpt.config.model.vocab_size is not None
    assert "[MASK]" in ckpt.tokenizer_json


@pytest.mark.parametrize("masking", [{}, {"training.mlm_probability": 0.6, "training.mlm_probability_end": 0.1}],
                         ids=["constant-masking", "masking-schedule"])
def test_resume_continues_exactly(corpus: Path, in_tmp: Path, masking: dict[str, float]):
    settings = {"training.num_steps": 8, "training.save_every": 4, **masking}
    full = load_config(None, tiny_overrides(corpus, name="full", **settings))
    run_training(full, quiet=True)
    reference = losses(full.run_dir())
    saved = in_tmp / "saved-step-4.ckpt"
    shutil.copy(full.checkpoint_dir() / "checkpoint-4.ckpt", saved)

    resumed = load_config(None, tiny_overrides(corpus, name="resumed", **settings))
    summary = run_training(resumed, resume=str(saved), quiet=True)
    assert summary.steps == 8
    continued = losses(resumed.run_dir())
    assert sorted(continued) == [5, 6, 7, 8]
    for step in continued:
        assert continued[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7)


def test_resume_auto_without_checkpoint_starts_fresh_and_refuses_finished_run(corpus: Path):
    cfg = load_config(None, tiny_overrides(corpus, **{"training.num_steps": 2}))
    assert run_training(cfg, resume="auto", quiet=True).steps == 2
    from lhtcli.errors import ConfigError

    with pytest.raises(ConfigError, match="num_steps"):
        run_training(cfg, resume="auto", quiet=True)


def test_tensorboard_event_file_holds_the_scalars(corpus: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, tiny_overrides(corpus, **{"training.num_steps": 4, "logging.backend": "tensorboard",
                                                       "training.eval_every": 2}))
    run_training(cfg, quiet=True)
    events = EventAccumulator(str(cfg.run_dir()))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "val/loss",
            "val/accuracy"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_tensorboard_holds_the_training_visualisations(corpus: Path):
    """log_viz_every puts the heatmap, gradient flow, prediction table and entropy scalars in the event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, tiny_overrides(corpus, **{"training.num_steps": 4, "logging.backend": "tensorboard",
                                                       "training.log_viz_every": 2}))
    run_training(cfg, quiet=True)
    events = EventAccumulator(str(cfg.run_dir()))
    events.Reload()
    tags = events.Tags()
    assert {"attention/layer_0", "gradients/flow"} <= set(tags["images"])
    assert [e.step for e in events.Images("gradients/flow")] == [2, 4]
    assert {"predictions/step_2/text_summary", "predictions/step_4/text_summary"} <= set(tags["tensors"])
    scalars = set(tags["scalars"])
    assert {"attention/entropy_mean", "attention/entropy_std", "attention/entropy_min", "attention/entropy_max",
            "attention_entropy/layer_0_mean", "attention_entropy/layer_1_std", "attention/level_mass_0"} <= scalars


def test_wandb_offline_writes_a_run_directory(corpus: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(corpus.parent / "no-netrc"))
    cfg = load_config(None, tiny_overrides(corpus, **{"training.num_steps": 2, "logging.backend": "wandb",
                                                       "wandb.offline": "false"}))
    run_training(cfg, quiet=True)  # no API key: must fall back to offline, not crash
    runs = list((cfg.run_dir() / "wandb").glob("offline-run-*"))
    assert runs, list(cfg.run_dir().rglob("*"))
    assert any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_nan_loss_steps_are_skipped_then_the_run_stops(corpus: Path, monkeypatch: pytest.MonkeyPatch):
    from lhtcli.model import LHTEncoder
    from lhtcli.training.trainer import TrainingStopped

    original = LHTEncoder.forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LHTEncoder, "forward", poisoned)
    cfg = load_config(None, tiny_overrides(corpus, **{"training.max_bad_steps": 3}))
    with pytest.raises(TrainingStopped, match="3 consecutive steps"):
        run_training(cfg, quiet=True)


def test_cli_reports_a_corrupted_checkpoint_with_exit_2(corpus: Path, in_tmp: Path, capsys):
    from lhtcli.cli import main

    broken = in_tmp / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    args = ["train"] + [a for o in tiny_overrides(corpus) for a in ("--set", o)] + ["--resume", str(broken)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "broken.ckpt" in err and "Traceback" not in err


def test_refuses_a_pickle_that_would_run_code(in_tmp: Path):
    import pickle

    from lhtcli.errors import CheckpointError

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (in_tmp / "pwned",))

    evil = in_tmp / "evil.ckpt"
    torch.save({"format": "lht-checkpoint", "payload": Exploit()}, evil, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(evil)
    assert not (in_tmp / "pwned").exists()


def test_masking_schedule_reaches_the_training_batches(corpus: Path, monkeypatch: pytest.MonkeyPatch):
    import lhtcli.data.batching as batching

    rates: list[float] = []
    make_batch = batching.make_batch

    def recording(sequences, tokenizer, mlm_probability, generator):
        rates.append(mlm_probability)
        return make_batch(sequences, tokenizer, mlm_probability, generator)

    monkeypatch.setattr(batching, "make_batch", recording)
    cfg = load_config(None, tiny_overrides(corpus, **{
        "training.num_steps": 12, "training.warmup_steps": 2, "training.grad_accum_steps": 1,
        "training.mlm_probability": 0.6, "training.mlm_probability_end": 0.1, "training.eval_mlm_probability": 0.17,
    }))
    run_training(cfg, quiet=True)
    validation = [r for r in rates if r == pytest.approx(0.17)]
    training = rates[len(validation):]
    assert len(training) == 12
    assert training[:3] == pytest.approx([0.6, 0.6, 0.6])  # warmup, then the first decay step
    assert training[-1] == pytest.approx(0.6 + (0.1 - 0.6) * 9 / 10)
    assert all(a >= b for a, b in zip(training, training[1:], strict=False)) and training[-1] < 0.2
    logged = [r["train/mlm_probability"] for r in read_metrics(cfg.run_dir() / "metrics.jsonl")
              if "train/mlm_probability" in r]
    assert logged[0] == pytest.approx(0.6) and logged[-1] == pytest.approx(training[-1])
