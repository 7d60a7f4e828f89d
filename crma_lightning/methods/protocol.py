"""The small typed interface between the LightningModule and the callbacks.

Callbacks (``callbacks/``) talk to the module only through :class:`ContinualModule`; the module
knows the callbacks only by the roles they declare (:data:`REQUIRED_ROLES`), never by importing
them. ``crma_lightning.cli.fit.ContinualCLI`` adds the required callbacks itself; a Python user
adds ``callbacks.method_callbacks()`` to the Trainer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor, nn

from crma_lightning.adapters.injection import CRMAInjection
from crma_lightning.backbone.loading import BackboneConfig
from crma_lightning.core.errors import ConfigError
from crma_lightning.core.losses import TokenStats
from crma_lightning.methods.layouts import AdapterKind, AdapterLayout

REQUIRED_ROLES = {
    "freezing": "sets what trains during each task",
    "evaluation": "evaluates every task before training and after each task",
}
"""Roles a ``fit`` cannot do without; a callback declares its role in a class attribute ``role``."""


@dataclass(frozen=True)
class GradNorms:
    """One optimizer step's gradient norms before clipping, as 0-dim tensors on the parameters'
    device: global (after the all-reduce, whole under FSDP), so the same on every rank."""

    lora: Tensor
    """The LoRA parameters that have a gradient this step."""
    crma: Tensor | None
    """The CRMA parameters (None when the strategy has no CRMA)."""
    total: Tensor
    """Both together: sqrt(lora² + crma²)."""


@runtime_checkable
class ContinualModule(Protocol):
    """What callbacks may read and call on the module (``crma_lightning.training.module.ContinualLM``)."""

    task_names: list[str]
    strategy: str
    layout: AdapterLayout
    """Which LoRAs exist, which serve a task, and what trains during it."""
    seed: int
    """The run's seed (``data.seed``): LoRA initialisation and per-step randomness."""
    backbone_config: BackboneConfig
    crma: CRMAInjection | None
    """The CRMA blocks, or None when the strategy has none."""
    model: nn.Module | None
    """The transformers model with the LoRAs (and CRMA blocks) injected."""
    nonfinite_skipped: int
    """Optimizer steps skipped for a non-finite loss or gradient so far."""
    run_facts: dict[str, Any]
    """Run-wide values that callbacks report for summary.json (e.g. the spectral bound)."""
    fused_head: nn.Linear | None
    """The output head when losses are formed from the final hidden states (``model.fused_loss``)."""

    if TYPE_CHECKING:  # LightningModule members the regularisers use (a property would raise on isinstance)
        trainer: Any
        training: bool

        def log(self, name: str, value: Any, **kwargs: Any) -> None: ...

        def train(self, mode: bool = True) -> Any: ...

        def eval(self) -> Any: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """Every parameter (``nn.Module.parameters``): the base, the LoRAs and the CRMA blocks."""

    def adapter_for(self, task: str) -> str:
        """The name of the LoRA that serves ``task``."""

    def use_task(self, task: str) -> None:
        """Route the forward pass through ``task``'s adapters."""

    def adapter_parameters(self, kind: AdapterKind, task: str | None = None) -> list[nn.Parameter]:
        """The adapter parameters of one kind (a task's LoRA, or all CRMA parameters)."""

    regularizers: list
    """Terms added to the loss (``crma_lightning.methods.regularizers``), with task-boundary hooks."""

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters that train in every task (the shared LoRA, CRMA)."""

    def task_start_step(self, task_index: int) -> int:
        """The global step of task ``task_index``'s first optimizer step."""

    def current_task(self) -> str:
        """The task the trainer's current epoch belongs to."""

    def trainable_parameters(self, task: str) -> list[nn.Parameter]:
        """What trains during ``task`` under the module's strategy."""

    def token_stats(self, batch: dict[str, Tensor], accuracy: bool = True) -> TokenStats:
        """Summed next-token loss, scored tokens and (with ``accuracy``) correct predictions of a batch."""

    def gradient_norms(self) -> GradNorms | None:
        """This optimizer step's gradient norms before clipping (call from
        ``on_before_optimizer_step``); None when the step is skipped (non-finite)."""


def as_continual(pl_module: Any) -> ContinualModule:
    """``pl_module`` typed as a :class:`ContinualModule`, or a clear error for another module."""
    if not isinstance(pl_module, ContinualModule):
        raise TypeError(
            f"crma-lightning's callbacks need a ContinualLM-like module, got {type(pl_module).__name__} "
            "(see crma_lightning.methods.protocol.ContinualModule)"
        )
    return pl_module


def check_fit_setup(trainer: Any, task_names: list[str], vocab_size: int) -> None:
    """Everything a ``fit`` of the continual module needs from its trainer and data, or one clear
    error: the continual DataModule with the same tasks, the callbacks of :data:`REQUIRED_ROLES`,
    token ids within the embedding, and a data reload every epoch."""
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "task_names"):
        raise ConfigError(
            "fit needs the continual DataModule (data: class_path: crma_lightning.data.ContinualDataModule)"
        )
    if list(dm.task_names) != task_names:
        raise ConfigError(
            f"model.task_names {task_names} differ from data.tasks {list(dm.task_names)}; "
            "leave model.task_names unset, the CLI links it from data.tasks"
        )
    roles = {getattr(c, "role", None) for c in trainer.callbacks}
    required = dict(REQUIRED_ROLES)
    if getattr(trainer.lightning_module, "regularizers", None):
        required["regularization"] = "runs the regularisers' task-start and task-end hooks"
    missing = [f"{role} ({what})" for role, what in required.items() if role not in roles]
    if missing:
        raise ConfigError(
            "the trainer lacks the callbacks the method needs: "
            + "; ".join(missing)
            + ". `train.py` adds them "
            "itself; in Python pass callbacks=crma_lightning.callbacks.method_callbacks() to the Trainer"
        )
    if getattr(dm, "vocab_size", 0) > vocab_size:
        raise ConfigError(
            f"data: the token ids go up to {dm.vocab_size - 1} (data.tokenizer / data.synthetic_vocab) but "
            f"the model's embedding has {vocab_size} rows; use the model's own tokenizer or a smaller "
            "synthetic_vocab"
        )
    if getattr(dm, "multitask", False) and not trainer.lightning_module.layout.shared_lora:
        raise ConfigError(
            "data.multitask trains one model on every task: set model.strategy: naive (one shared LoRA); "
            "configs/methods/multitask.yaml does"
        )
    if trainer.reload_dataloaders_every_n_epochs != 1:
        raise ConfigError(
            "trainer.reload_dataloaders_every_n_epochs must be 1: each epoch serves its task's data"
        )
