"""Logs the CRMA spectral bound and projection health per layer (docs/method.md §6).

Per layer: ``spectral/<layer>/{sigma_max,sigma_2,row_err,col_err,rescale,gate}``; across layers:
``spectral/max_sigma`` and ``spectral/max_row_col_err``, whose run-wide maxima are resumable state
reported to the module (``run_facts``) for summary.json. Computed in float64 by the adapter's own
projection functions, so ``max_sigma`` <= 1 holds with no tolerance (projection.certify).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from crma_lightning.methods.protocol import ContinualModule, as_continual


class SpectralBoundLogger(Callback):
    """Every ``every_n_steps`` optimizer steps, measure each CRMA layer's mixing-matrix diagnostics
    and log the maxima across layers; the per-layer series every ``per_layer_every_n_steps``."""

    def __init__(self, every_n_steps: int = 1, per_layer: bool = True, per_layer_every_n_steps: int = 10):
        """
        Args:
            every_n_steps: measure after every n-th optimizer step (the maxima see only those).
            per_layer: also log one series per layer (else only the maxima across layers).
            per_layer_every_n_steps: log the per-layer series at the first measured step and then
                every n-th optimizer step (6 values per layer).
        """
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if per_layer_every_n_steps < 1:
            raise ValueError(f"per_layer_every_n_steps must be >= 1, got {per_layer_every_n_steps}")
        self.every_n_steps = every_n_steps
        self.per_layer = per_layer
        self.per_layer_every_n_steps = per_layer_every_n_steps
        self.max_sigma: float | None = None
        self.max_row_col_err: float | None = None
        self.steps_checked = 0
        self._last_step = 0

    def measure(self, module: ContinualModule, per_layer: bool | None = None) -> dict[str, float]:
        """Current diagnostics of every layer, as metric name -> value (``per_layer``: default the
        callback's setting). Under FSDP this gathers the sharded logits and gates, so it runs on
        every rank (as Lightning's hooks do)."""
        d = module.crma.diagnostics()  # each field (L,), one batched projection
        row_col = torch.maximum(d.row_err, d.col_err)
        metrics = {
            "spectral/max_sigma": d.sigma_max.max().item(),
            "spectral/max_row_col_err": row_col.max().item(),
        }
        if self.per_layer if per_layer is None else per_layer:
            fields = {
                "sigma_max": d.sigma_max,
                "sigma_2": d.sigma_2,
                "row_err": d.row_err,
                "col_err": d.col_err,
                "rescale": d.rescale,
                "gate": module.crma.gates(),
            }
            for name, values in fields.items():
                for i, v in enumerate(values.tolist()):
                    metrics[f"spectral/layer_{i:02d}/{name}"] = v
        return metrics

    def _report(self, module: ContinualModule) -> None:
        module.run_facts["spectral_max_sigma"] = self.max_sigma
        module.run_facts["spectral_max_row_col_err"] = self.max_row_col_err

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = as_continual(pl_module)
        step = trainer.global_step
        per_layer = self.per_layer and (self.steps_checked == 0 or step % self.per_layer_every_n_steps == 0)
        with torch.no_grad():
            metrics = self.measure(module, per_layer)
        self.max_sigma = max(self.max_sigma or 0.0, metrics["spectral/max_sigma"])
        self.max_row_col_err = max(self.max_row_col_err or 0.0, metrics["spectral/max_row_col_err"])
        self.steps_checked += 1
        self._report(module)
        # One call to the logger API for all 2 + 6 L values (identical on every rank: DDP replicas,
        # FSDP shards gathered by measure()), at the step just taken, as pl_module.log would, but
        # without log()'s per-value cost.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step - 1)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = as_continual(pl_module)
        if module.crma is None:
            return
        if self.max_sigma is None:
            with torch.no_grad():
                m = self.measure(module)
            self.max_sigma, self.max_row_col_err = m["spectral/max_sigma"], m["spectral/max_row_col_err"]
        self._report(module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        step = trainer.global_step
        if as_continual(pl_module).crma is None or step == self._last_step:
            return  # no CRMA, or no optimizer step since the last record (gradient accumulation)
        self._last_step = step
        if step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    def state_dict(self) -> dict:
        return {
            "max_sigma": self.max_sigma,
            "max_row_col_err": self.max_row_col_err,
            "steps_checked": self.steps_checked,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.max_sigma = state_dict["max_sigma"]
        self.max_row_col_err = state_dict["max_row_col_err"]
        self.steps_checked = state_dict["steps_checked"]
