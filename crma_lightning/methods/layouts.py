"""Adapter layouts: which LoRAs exist, which serve a task, and what trains during it.

| layout (``model.strategy``)        | LoRAs                  | forward for task k | trains in task k   |
|------------------------------------|------------------------|--------------------|--------------------|
| ``SharedLoRA`` (``naive``)         | one shared             | the shared LoRA    | the shared LoRA    |
| ``TaskLoRA`` (``frozen``)          | one per task           | LoRA_k             | LoRA_k             |
| ``TaskLoRAWithCRMA`` (``modular``) | one per task, and CRMA | LoRA_k + CRMA      | LoRA_k and CRMA    |
| ``IncrementalLoRA`` (``inc_lora``) | one per task           | every LoRA, summed | LoRA_k             |
"""

from __future__ import annotations

from typing import ClassVar, Literal

from crma_lightning._paths import MOVED
from crma_lightning.adapters.lora import SHARED_ADAPTER
from crma_lightning.core.errors import ConfigError, import_class

Strategy = Literal["naive", "frozen", "modular", "inc_lora"]
AdapterKind = Literal["lora", "crma"]
NoTaskId = Literal["shared", "sum", "route"]


LAYOUTS: dict[str, type[AdapterLayout]] = {}
"""Layout name -> class: every subclass of :class:`AdapterLayout` that sets ``name``."""


class AdapterLayout:
    """A fresh LoRA per task, frozen after it; task k is served by LoRA_k (the FROZEN condition)."""

    name: ClassVar[str] = "frozen"
    crma: ClassVar[bool] = False
    """CRMA blocks on every decoder layer, trained during every task."""
    shared_lora: ClassVar[bool] = False
    """One LoRA for every task (else one per task)."""
    cumulative: ClassVar[bool] = False
    """Every forward runs through all LoRAs together (summed): no task id is ever used."""
    no_task_id: ClassVar[NoTaskId] = "route"
    """What serves an input whose task is not known: one model for every task (``shared``), every
    trained LoRA summed (``sum``), or the task routed (``route``)."""

    @property
    def trains(self) -> tuple[AdapterKind, ...]:
        """Adapter kinds trained during a task: its LoRA, and CRMA if present."""
        return ("lora", "crma") if self.crma else ("lora",)

    def adapter_names(self, tasks: list[str]) -> list[str]:
        """Every LoRA the model holds."""
        return [SHARED_ADAPTER] if self.shared_lora else list(tasks)

    def adapter_for(self, task: str, tasks: list[str]) -> str:
        """The LoRA that trains during ``task`` (and, unless cumulative, alone serves it)."""
        if task not in tasks:
            raise ConfigError(f"unknown task {task!r}; the tasks are {tasks}")
        return SHARED_ADAPTER if self.shared_lora else task

    def active_for(self, task: str, tasks: list[str]) -> list[str]:
        """The LoRAs active in the forward pass for ``task`` (training it, or serving it with its id).

        A task outside ``tasks`` is evaluated, never trained (``data.eval_tasks``): it has no LoRA of
        its own, so a layout with one model for every input serves it with that model (the shared
        LoRA, or the sum of them), and a per-task layout with none: the base (and CRMA, if any)."""
        if task not in tasks:
            return self.active_without_task_id(list(tasks)) or []
        own = self.adapter_for(task, tasks)
        return list(tasks) if self.cumulative else [own]

    def active_without_task_id(self, trained: list[str]) -> list[str] | None:
        """The LoRAs that serve an input of unknown task after ``trained`` tasks; None: route it."""
        if self.no_task_id == "route":
            return None
        return [SHARED_ADAPTER] if self.shared_lora else list(trained)

    def __init_subclass__(cls, **kwargs) -> None:
        # A subclass that names itself is registered: model.strategy, run directories and reports
        # know it by that name (a layout defined outside the package is found once it is imported).
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            LAYOUTS[cls.name] = cls

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class TaskLoRA(AdapterLayout):
    """FROZEN: a fresh LoRA per task, frozen after it; no CRMA."""

    name = "frozen"


class SharedLoRA(AdapterLayout):
    """NAIVE sequential LoRA: one LoRA trained on every task in turn."""

    name = "naive"
    shared_lora = True
    no_task_id = "shared"


class TaskLoRAWithCRMA(AdapterLayout):
    """MODULAR (the method): a fresh LoRA per task, frozen after it, plus CRMA trained throughout."""

    name = "modular"
    crma = True


class IncrementalLoRA(AdapterLayout):
    """IncLoRA (and, with ``regularizers.OrthogonalLoRA``, O-LoRA): a fresh LoRA per task, frozen
    after it; every forward sums all of them. A task's LoRA is zero (B = 0) until its task trains
    it, so the sum is that of the tasks trained so far, for every task alike: no task id is needed."""

    name = "inc_lora"
    cumulative = True
    no_task_id = "sum"


STRATEGIES = ("naive", "frozen", "modular", "inc_lora")
"""The built-in layouts' names (``model.strategy``); :data:`LAYOUTS` also holds any registered later."""


def layout_names() -> tuple[str, ...]:
    """The built-in layouts' names, then those registered later."""
    return (*STRATEGIES, *(n for n in LAYOUTS if n not in STRATEGIES))


def layout_of(strategy: str) -> AdapterLayout:
    """The layout a ``model.strategy`` name stands for."""
    if strategy not in LAYOUTS:
        raise ConfigError(f"model.strategy must be one of {layout_names()} (got {strategy!r}).")
    return LAYOUTS[strategy]()


def resolve_layout(strategy: str | None, layout: AdapterLayout | None) -> AdapterLayout:
    """``model.layout`` if given, else the layout ``model.strategy`` names (default ``modular``);
    both given must agree."""
    if layout is None:
        return layout_of(strategy or "modular")
    if not isinstance(layout, AdapterLayout):
        raise ConfigError(
            "model.layout must be an AdapterLayout (class_path: crma_lightning.methods.layouts.<Layout>), "
            f"got {layout!r}"
        )
    if strategy is not None and strategy != layout.name:
        raise ConfigError(
            f"model.strategy {strategy!r} and model.layout {type(layout).__name__} ({layout.name!r}) "
            "disagree; set one"
        )
    return layout


def layout_from_config(model: dict, allow_foreign_classes: bool = False) -> AdapterLayout:
    """The layout of a run's saved ``model`` section (``config.yaml``, read as data): ``layout``
    (``class_path``) or ``strategy``. A registered layout is found by its class; a class from
    outside crma-lightning is imported only with ``allow_foreign_classes`` (a run directory is data)."""
    section = model.get("layout")
    if not section:
        return layout_of(model.get("strategy") or "modular")
    path = section.get("class_path", "") if isinstance(section, dict) else str(section)
    init = section.get("init_args") or {} if isinstance(section, dict) else {}
    module, _, name = path.rpartition(".")
    path = (
        f"crma_lightning.{MOVED[old]}.{name}"
        if (old := module.removeprefix("crma_lightning.")) in MOVED
        else path
    )
    cls = next(
        (c for c in LAYOUTS.values() if path in (f"{c.__module__}.{c.__qualname__}", c.__name__)), None
    )
    if cls is None and allow_foreign_classes and "." in path:
        cls = import_class(path, "model.layout")
    if not (isinstance(cls, type) and issubclass(cls, AdapterLayout)):
        raise ConfigError(
            f"model.layout {path!r} is not a registered layout ({', '.join(layout_names())}); a layout from "
            "outside crma-lightning is loaded only with --allow-foreign-classes (load_run(..., "
            "allow_foreign_classes=True))"
        )
    return resolve_layout(model.get("strategy"), cls(**init))
