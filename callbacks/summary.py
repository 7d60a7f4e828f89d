"""What a continual run trains, printed once when training starts: the base, each task's LoRA,
CRMA, and what trains in the current task (in place of Lightning's per-module summary)."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from torch import nn

from crma_lightning.adapters.lora import SHARED_ADAPTER
from crma_lightning.core.clock import TaskClock
from crma_lightning.methods.protocol import as_continual


def _count(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def summary_lines(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
    """The summary's lines; ``trainer`` gives the current task and the device."""
    module = as_continual(pl_module)
    tasks, layout = module.task_names, module.layout
    k = TaskClock.of(trainer).task_index(trainer.current_epoch)
    lora = {
        name: module.adapter_parameters("lora", name if name != SHARED_ADAPTER else tasks[0])
        for name in layout.adapter_names(tasks)
    }
    crma = module.adapter_parameters("crma")
    adapters = {id(p) for params in [*lora.values(), crma] for p in params}
    base = [p for p in pl_module.parameters() if id(p) not in adapters]
    rows = [("base model", _count(base), f"frozen ({module.backbone_config.label})")]
    for name, params in lora.items():
        when = "every task" if name == SHARED_ADAPTER else f"task {tasks.index(name) + 1}"
        rows.append(("LoRA " + name, _count(params), f"trains in {when}"))
    if crma:
        rows.append(("CRMA", _count(crma), f"trains in every task ({len(module.crma.blocks)} layers)"))
    width = max(len(r[0]) for r in rows)
    lines = [
        f"{module.strategy}: {len(tasks)} tasks on {trainer.world_size} x "
        f"{trainer.strategy.root_device.type}, precision {trainer.precision}, seed {module.seed}"
    ]
    lines += [f"  {name:<{width}}  {get_human_readable_count(n):>8}  {what}" for name, n, what in rows]
    now = module.trainable_parameters(tasks[k])
    kinds = " + ".join(
        f"LoRA {module.adapter_for(tasks[k])}" if kind == "lora" else "CRMA" for kind in layout.trains
    )
    lines.append(
        f"  task {k + 1}/{len(tasks)} {tasks[k]} trains {kinds}: {get_human_readable_count(_count(now))}"
    )
    return lines


class ContinualSummary(Callback):
    """Prints :func:`summary_lines` on rank 0 when training starts (a resumed run names its task)."""

    def __init__(self, enabled: bool = True):
        """
        Args:
            enabled: print the summary.
        """
        self.enabled = enabled

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and trainer.is_global_zero:
            print("\n".join(summary_lines(trainer, pl_module)), file=sys.stdout, flush=True)
