"""Visualisations logged during training every ``training.log_viz_every`` steps (DESIGN.md section 5).

The training loop calls, on a due step::

    norms = visualizer.gradient_norms(model)      # after backward, before clipping
    ...optimizer step...
    visualizer.log(step, model, batch, norms)

``log`` runs one extra forward pass in eval mode without gradients (restoring train mode) and logs
to the run's logger: the layer-0 heatmap ``attention/layer_0``, the last layer's attention pooled to
sentence x sentence ``attention/document_map``, the reachability chart ``attention/reachability``
(once: it depends on the mask alone), the MLM prediction table
``predictions/step_{N}``, the gradient-flow chart ``gradients/flow`` and the entropy scalars
(``attention/entropy_*``, ``attention_entropy/layer_{i}_*`` including ``_normalized``,
``attention/level_mass_{l}``), and per layer the hierarchy usage ``hierarchy_usage/layer_{i}_{level}``
(of the queries with such links, the share of attention through them: the curve that shows whether
the hierarchy is learned), the attention-sink share ``attention_sinks/layer_{i}`` and the largest
logit ``attention_logits/layer_{i}_max``. Vanishing/exploding gradients, attention focused on one
key, and a collapse (normalised entropy of a layer or head falling below half of its value at the
previous logging step) are printed as one-line warnings.
"""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console

from lhtcli.config import LHTConfig
from lhtcli.diagnostics.attention_stats import (
    FOCUSED_BELOW,
    EntropyAccumulator,
    EntropyReport,
    attention_map,
    collapse_warnings,
    compare_reports,
)
from lhtcli.diagnostics.docmap import capture_map
from lhtcli.diagnostics.gradients import report_from_norms
from lhtcli.diagnostics.predictions import PREDICTION_COLUMNS, mlm_predictions, prediction_rows, token_namer
from lhtcli.diagnostics.reach import default_sources, reachability

HEATMAP_TOKENS = 60
PREDICTION_SAMPLES = 4
MAX_NAMES_IN_WARNING = 4


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES_IN_WARNING])
    more = len(names) - MAX_NAMES_IN_WARNING
    return shown + (f" and {more} more" if more > 0 else "")


class TrainingVisualizer:
    def __init__(
        self, config: LHTConfig, tokenizer: Any, logger: Any, console: Console | None = None
    ) -> None:
        self.every = int(config.training.log_viz_every)
        self.windows = [int(w) for w in config.model.mlswa.window_size_per_level]
        self.tokenizer = tokenizer
        self.logger = logger
        self.console = console or Console(stderr=True)
        self._name = token_namer(tokenizer)
        self._previous: tuple[EntropyReport, int] | None = None  # the last logged report, for the trend
        self._reach_logged = False

    def start_message(self) -> str:
        return f"✓ Visualization callbacks enabled (logging every {self.every} steps)"

    def due(self, step: int) -> bool:
        return self.every > 0 and step > 0 and step % self.every == 0

    @staticmethod
    def gradient_norms(model: torch.nn.Module) -> dict[str, float | None]:
        """L2 norm of every trainable parameter's gradient (None where it has none), one device sync."""
        names, norms, missing = [], [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if param.grad is None:
                missing.append(name)
            else:
                names.append(name)
                norms.append(param.grad.detach().float().norm())
        values = torch.stack(norms).tolist() if norms else []
        result: dict[str, float | None] = dict(zip(names, values, strict=True))
        result.update(dict.fromkeys(missing))
        order = [name for name, p in model.named_parameters() if p.requires_grad]
        return {name: result[name] for name in order}

    def _warn(self, text: str) -> None:
        self.console.print(f"[yellow]⚠ {text}[/yellow]", highlight=False)

    def log(
        self, step: int, model: torch.nn.Module, batch: Any, grad_norms: dict[str, float | None] | None
    ) -> None:
        from lhtcli.render.figures import (
            attention_heatmap,
            close_figure,
            document_map_figure,
            gradient_flow_figure,
            reach_figure,
        )

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(batch.input_ids, batch.positions, capture=True)
        finally:
            model.train(was_training)
        positions = batch.positions.batched()

        ids = batch.input_ids[0].tolist()
        tokens = [self._name(i) for i in ids]
        amap = attention_map(out.captures[0], positions, self.windows, tokens, max_tokens=HEATMAP_TOKENS)
        fig = attention_heatmap(amap, title=f"Layer 0 attention (mean over heads), step {step}")
        try:
            self.logger.log_figure("attention/layer_0", fig, step)
        finally:
            close_figure(fig)

        # the last layer's attention pooled to sentences: does it reach beyond its own sentence?
        top = out.captures[-1]
        dmap = capture_map(top, positions, self.windows, tokens, "sentences")
        fig = document_map_figure([dmap], title=f"Layer {top.layer} attention between sentences, step {step}")
        try:
            self.logger.log_figure("attention/document_map", fig, step)
        finally:
            close_figure(fig)
        if not self._reach_logged:  # the mask graph does not change during training: once is enough
            self._reach_logged = True
            one = positions[0:1].to("cpu")
            sources = default_sources(one)
            reach = reachability(one, self.windows, [c.max_level for c in out.captures], sources)
            fig = reach_figure(reach)
            try:
                self.logger.log_figure("attention/reachability", fig, step)
            finally:
                close_figure(fig)

        predictions = mlm_predictions(
            out.mlm_logits, batch.labels, batch.input_ids, self.tokenizer, max_samples=PREDICTION_SAMPLES
        )
        self.logger.log_table(
            f"predictions/step_{step}", list(PREDICTION_COLUMNS), prediction_rows(predictions), step
        )

        if grad_norms:
            report = report_from_norms(grad_norms)
            fig = gradient_flow_figure(
                report, title=f"Gradient flow, step {step} (total norm {report.total_norm:.3g})"
            )
            try:
                self.logger.log_figure("gradients/flow", fig, step)
            finally:
                close_figure(fig)
            if report.nonfinite:
                self._warn(f"step {step}: NaN/Inf gradients in {_names(report.nonfinite)}")
            if report.exploding:
                self._warn(f"step {step}: exploding gradients (norm > 10) in {_names(report.exploding)}")
            if report.vanishing:
                self._warn(f"step {step}: vanishing gradients (norm < 1e-5) in {_names(report.vanishing)}")

        acc = EntropyAccumulator(self.windows)
        acc.add(out.captures, positions)
        entropy = acc.report()
        self.logger.log_scalars(entropy.scalars(), step)
        focused = [layer for layer in entropy.layers if layer.stats.flag == "focused"]
        if focused:
            detail = ", ".join(f"layer {layer.layer} {layer.stats.normalized_mean:.3f}" for layer in focused)
            self._warn(
                f"step {step}: normalised attention entropy below {FOCUSED_BELOW:g} (focused on about one key, "
                f"possible collapse): {detail}"
            )
        # the trend: a sharp fall since the previous logging step is a collapse, whatever the level
        if self._previous is not None:
            before, previous_step = self._previous
            for line in collapse_warnings(compare_reports(before, entropy), f"step {previous_step}", f"step {step}"):
                self._warn(line)
        self._previous = (entropy, step)


__all__ = ["TrainingVisualizer"]
