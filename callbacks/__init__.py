"""Lightning callbacks for continual fine-tuning: the method's own, and optional ones.

The callbacks the method needs are added by ``train.py`` itself (``crma_lightning.cli.fit``); each has
a top-level config section named by its key in :data:`METHOD_CALLBACKS` (``evaluation:
{batch_size: 32}``), so configs list only optional callbacks under ``trainer.callbacks``. In
Python, pass ``callbacks=method_callbacks()`` to the ``Trainer``.
"""

from __future__ import annotations

from crma_lightning.callbacks.adapters import AdapterCheckpoint
from crma_lightning.callbacks.evaluation import ContinualEvaluation
from crma_lightning.callbacks.freezing import FreezingPolicy
from crma_lightning.callbacks.gradnorm import GradNormStats
from crma_lightning.callbacks.progress import TaskProgressBar
from crma_lightning.callbacks.regularization import RegularizerHooks
from crma_lightning.callbacks.routing import RoutingStatistics
from crma_lightning.callbacks.spectral import SpectralBoundLogger
from crma_lightning.callbacks.summary import ContinualSummary
from crma_lightning.callbacks.zclip import ZClip
from lightning.pytorch.callbacks import Callback

METHOD_CALLBACKS: dict[str, type[Callback]] = {
    "summary": ContinualSummary,
    "freezing": FreezingPolicy,
    # Before evaluation: at a task end, evaluation without the task id routes with its statistics.
    "routing": RoutingStatistics,
    "evaluation": ContinualEvaluation,
    "spectral": SpectralBoundLogger,
    "adapters": AdapterCheckpoint,
    "grad_norm": GradNormStats,
    "regularization": RegularizerHooks,
    "zclip": ZClip,
    "progress_bar": TaskProgressBar,
}
"""Config section -> callback class, for every callback the CLI adds."""


def method_callbacks(progress_bar: bool = True) -> list[Callback]:
    """One instance of every method callback with its defaults (``progress_bar=False`` leaves out
    the task progress bar, for ``Trainer(enable_progress_bar=False)``)."""
    return [cls() for key, cls in METHOD_CALLBACKS.items() if progress_bar or key != "progress_bar"]
