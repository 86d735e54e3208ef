import pytest

from lhtcli.config import TrainingConfig
from lhtcli.training.schedule import lr_factor, mlm_probability_at


def test_warmup_then_linear_decay_to_the_floor():
    cfg = TrainingConfig(num_steps=110, warmup_steps=10, lr_schedule="linear", min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    assert lr_factor(500, cfg) == pytest.approx(0.1)


def test_cosine_and_constant():
    cosine = TrainingConfig(num_steps=102, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.0)
    assert lr_factor(52, cosine) == pytest.approx(0.5)
    assert lr_factor(102, cosine) == pytest.approx(0.0, abs=1e-12)
    constant = TrainingConfig(num_steps=100, warmup_steps=0, lr_schedule="constant")
    assert lr_factor(99, constant) == 1.0


def test_time_limit_drives_the_decay_when_it_runs_out_first():
    cfg = TrainingConfig(num_steps=10_000, warmup_steps=0, lr_schedule="linear", min_lr_ratio=0.0,
                         time_limit_minutes=2)
    assert lr_factor(10, cfg, elapsed_seconds=60) == pytest.approx(0.5)
    assert lr_factor(10, cfg, elapsed_seconds=120) == pytest.approx(0.0)
    untimed = cfg.model_copy(update={"time_limit_minutes": None})
    assert lr_factor(10, untimed, elapsed_seconds=120) == pytest.approx(1 - 10 / 10_000)


def test_time_decay_starts_at_the_peak_after_a_timed_warmup():
    cfg = TrainingConfig(num_steps=10_000, warmup_steps=10, lr_schedule="linear", min_lr_ratio=0.0,
                         time_limit_minutes=2)
    # The warmup took the first minute: the decay spans the second one, starting from the peak.
    assert lr_factor(10, cfg, elapsed_seconds=60, warmup_seconds=60) == pytest.approx(1.0, abs=1e-3)
    assert lr_factor(10, cfg, elapsed_seconds=90, warmup_seconds=60) == pytest.approx(0.5)
    assert lr_factor(10, cfg, elapsed_seconds=120, warmup_seconds=60) == pytest.approx(0.0)


def test_masking_rate_is_constant_without_an_end_rate():
    cfg = TrainingConfig(num_steps=100, warmup_steps=10, mlm_probability=0.3)
    assert {mlm_probability_at(step, cfg) for step in (0, 10, 55, 100, 400)} == {0.3}


def test_masking_rate_falls_linearly_after_the_warmup():
    cfg = TrainingConfig(num_steps=110, warmup_steps=10, mlm_probability=0.5, mlm_probability_end=0.1)
    assert mlm_probability_at(0, cfg) == pytest.approx(0.5)
    assert mlm_probability_at(10, cfg) == pytest.approx(0.5)
    assert mlm_probability_at(60, cfg) == pytest.approx(0.3)
    assert mlm_probability_at(110, cfg) == pytest.approx(0.1)
    assert mlm_probability_at(500, cfg) == pytest.approx(0.1)
    rising = cfg.model_copy(update={"mlm_probability": 0.1, "mlm_probability_end": 0.5})
    assert mlm_probability_at(60, rising) == pytest.approx(0.3)


def test_masking_rate_follows_the_time_limit_like_the_learning_rate():
    cfg = TrainingConfig(num_steps=10_000, warmup_steps=0, mlm_probability=0.4, mlm_probability_end=0.2,
                         time_limit_minutes=2)
    assert mlm_probability_at(10, cfg, elapsed_seconds=60) == pytest.approx(0.3)
    assert mlm_probability_at(10, cfg, elapsed_seconds=120) == pytest.approx(0.2)
