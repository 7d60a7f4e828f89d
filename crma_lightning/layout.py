"""Adapter layouts: which LoRA serves each task and what trains during a task, per strategy.

| strategy | LoRAs                                   | trains during task k          |
|----------|-----------------------------------------|-------------------------------|
| naive    | one shared LoRA                         | the shared LoRA               |
| frozen   | a fresh LoRA per task, frozen after it  | LoRA_k                        |
| modular  | a fresh LoRA per task, frozen after it  | LoRA_k and every CRMA param   |

The base model never trains (docs/method.md §2). The module, the freezing callback and ``serve``
all read this one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from crma_lightning.config import ConfigError
from crma_lightning.lora import SHARED_ADAPTER

Strategy = Literal["naive", "frozen", "modular"]
AdapterKind = Literal["lora", "crma"]


@dataclass(frozen=True)
class Layout:
    """How one strategy arranges the adapters."""

    name: str
    shared_lora: bool
    """One LoRA for every task (else one per task)."""
    crma: bool
    """CRMA blocks on every decoder layer, trained during every task."""

    @property
    def trains(self) -> tuple[AdapterKind, ...]:
        """Adapter kinds trained during a task: its LoRA, and CRMA if present."""
        return ("lora", "crma") if self.crma else ("lora",)

    def adapter_names(self, tasks: list[str]) -> list[str]:
        return [SHARED_ADAPTER] if self.shared_lora else list(tasks)

    def adapter_for(self, task: str, tasks: list[str]) -> str:
        """The LoRA that serves ``task``: its own, or the shared one."""
        if task not in tasks:
            raise ConfigError(f"unknown task {task!r}; the tasks are {tasks}")
        return SHARED_ADAPTER if self.shared_lora else task


LAYOUTS: dict[str, Layout] = {
    "naive": Layout("naive", shared_lora=True, crma=False),
    "frozen": Layout("frozen", shared_lora=False, crma=False),
    "modular": Layout("modular", shared_lora=False, crma=True),
}
STRATEGIES = tuple(LAYOUTS)


def layout_of(strategy: str) -> Layout:
    if strategy not in LAYOUTS:
        raise ConfigError(f"model.strategy must be one of {STRATEGIES} (got {strategy!r}).")
    return LAYOUTS[strategy]
