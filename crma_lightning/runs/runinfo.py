"""What a run directory says about its run, read without building anything, and whether it is safe
to build: ``read_run`` parses ``config.yaml`` (``yaml.safe_load``) and lists the trained tasks;
``check_trusted`` refuses a config that would run code unless the caller allows it. Used by
``serve.run.load_run`` before any model is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from crma_lightning.backbone.hub import PACKAGE_PREFIX
from crma_lightning.backbone.loading import BackboneConfig
from crma_lightning.core.errors import ConfigError
from crma_lightning.data import ContinualDataModule, TaskSpec
from crma_lightning.data.replay import Replay
from crma_lightning.methods.layouts import AdapterLayout, layout_from_config
from crma_lightning.runs.checkpoint import PEFT_CONFIG, PEFT_WEIGHTS
from crma_lightning.runs.rundir import RunDir, init_args

__all__ = ["KNOWN_CLASS_PREFIXES", "RunInfo", "check_trusted", "read_run"]


@dataclass
class RunInfo:
    """What a run directory says about its run: the parsed ``config.yaml`` and the adapters present."""

    run: RunDir
    layout: AdapterLayout
    """The run's adapter layout (``model.strategy`` or ``model.layout``), the object the run trained with."""
    tasks: list[str]
    """Every task of the configured sequence, in training order."""
    trained: list[str]
    """The tasks whose adapters were written (all of them unless the run stopped early), in order."""
    backbone: BackboneConfig
    data: dict[str, Any]
    """``data`` init arguments of :class:`~crma_lightning.data.ContinualDataModule`, tasks as dicts."""
    routing_config: dict[str, Any]
    """The ``routing:`` section (``crma_lightning.callbacks.routing.RoutingStatistics``); empty for
    older runs."""
    allow_foreign_classes: bool = False
    """Whether classes from outside crma-lightning that the config names may be imported."""

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def strategy(self) -> str:
        """The layout's name (``naive``, ``frozen``, ``modular``, ``inc_lora`` or a registered one)."""
        return self.layout.name

    @property
    def tokenizer_name(self) -> str | None:
        return self.data.get("tokenizer")

    def datamodule(self) -> ContinualDataModule:
        """The run's DataModule, rebuilt from its config: the same holdout split (same seed, sizes).

        Imports the classes its ``data.sources`` name only if they are crma-lightning's or the run
        was read with ``allow_foreign_classes`` (a run directory is data)."""
        from crma_lightning.data.sources import source_from_config

        known = {f.name for f in fields(TaskSpec)}

        def specs(entries) -> list[TaskSpec]:
            return [TaskSpec(**{k: v for k, v in init_args(t).items() if k in known}) for t in entries or []]

        data = {**self.data, "tasks": specs(self.data["tasks"])}
        if "eval_tasks" in data:  # evaluation-only tasks: the same spec format
            data["eval_tasks"] = specs(data["eval_tasks"])
        if isinstance(data.get("replay"), dict):  # config.yaml holds the Replay's fields
            data["replay"] = Replay(**init_args(data["replay"]))
        if data.get("sources"):  # config.yaml holds {class_path, init_args} per source
            foreign = sorted(
                {c for c in _class_paths(data["sources"]) if not c.startswith(KNOWN_CLASS_PREFIXES)}
            )
            if foreign and not self.allow_foreign_classes:
                raise ConfigError(
                    f"{self.run.config_file} names task sources from outside crma-lightning "
                    f"({', '.join(foreign)}); pass --allow-foreign-classes (load_run(..., "
                    "allow_foreign_classes=True)) if you trust it"
                )
            data["sources"] = [source_from_config(s) for s in data["sources"]]
        return ContinualDataModule(**data)


def read_run(run_dir: str | os.PathLike, allow_foreign_classes: bool = False) -> RunInfo:
    """Parse ``<run_dir>/config.yaml`` and list the completed tasks; a clear error for a non-run.
    A layout from outside crma-lightning is imported only with ``allow_foreign_classes``."""
    run = RunDir(run_dir)
    cfg = run.read_config()
    try:
        model, data = init_args(cfg["model"]), init_args(cfg["data"])
        backbone = BackboneConfig(**model["backbone"])
        tasks = [init_args(t)["name"] for t in data["tasks"]]
    except (KeyError, TypeError) as e:
        raise ConfigError(
            f"{run.config_file} is not a readable crma-lightning config ({type(e).__name__}: {e}); it is "
            "damaged"
        ) from None
    layout = layout_from_config(model, allow_foreign_classes)  # an unknown one fails here, naming the field
    trained = [t for t in tasks if (run.adapter(t) / PEFT_WEIGHTS).is_file()]
    if not trained:
        raise ConfigError(
            f"{run.path} has no trained adapters "
            f"({run.adapter('<task>').relative_to(run.path)}/{PEFT_WEIGHTS} for none of the tasks {tasks}): "
            "the run stopped before its first task ended. Train it further (`train.py fit ... --ckpt_path "
            "last`)."
        )
    routing = cfg.get("routing")
    routing = init_args(routing) if isinstance(routing, dict) else {}
    return RunInfo(run, layout, tasks, trained, backbone, data, routing, allow_foreign_classes)


#: Module prefixes whose classes a run's config.yaml may name (``class_path``): this project's and
#: the libraries it configures. Loading a run instantiates none of them, but a foreign one marks a
#: config that was not written by ``train.py fit``.
KNOWN_CLASS_PREFIXES = ("crma_lightning.", "callbacks.", "lightning.", "torch.")


def check_trusted(
    info: RunInfo,
    cfg: dict[str, Any],
    *,
    trust_remote_code: bool,
    allow_foreign_classes: bool,
    check_base: bool = True,
) -> None:
    """Refuse, with one line naming the flag that allows it, a run directory whose config asks this
    process to run code: ``trust_remote_code``, classes from outside this project, or a hub model
    other than the one its adapters were trained on (a run directory is data, often downloaded)."""
    if info.backbone.trust_remote_code and not trust_remote_code:
        raise ConfigError(
            f"{info.run.config_file} asks for model.backbone.trust_remote_code, which runs code shipped with "
            f"{info.backbone.name_or_path!r}; pass --trust-remote-code (load_run(..., "
            "trust_remote_code=True)) only if you trust its author"
        )
    foreign = sorted({v for v in _class_paths(cfg) if not v.startswith(KNOWN_CLASS_PREFIXES)})
    if foreign and not allow_foreign_classes:
        raise ConfigError(
            f"{info.run.config_file} names classes from outside crma-lightning ({', '.join(foreign)}); it "
            "was not written by train.py fit as is. Pass --allow-foreign-classes (load_run(..., "
            "allow_foreign_classes=True)) if you trust it"
        )
    trained_on = _trained_base(info) if check_base else None
    name = info.backbone.name_or_path
    if name and trained_on and _is_hub_name(name) and name != trained_on:
        raise ConfigError(
            f"{info.run.config_file} names the hub model {name!r}, but the run's adapters were trained on "
            f"{trained_on!r}; pass --base-model (load_run(..., backbone=...)) to load them onto another base "
            "on purpose"
        )


def _class_paths(cfg: Any) -> list[str]:
    if isinstance(cfg, dict):
        own = [cfg["class_path"]] if isinstance(cfg.get("class_path"), str) else []
        return own + [v for x in cfg.values() for v in _class_paths(x)]
    if isinstance(cfg, list):
        return [v for x in cfg for v in _class_paths(x)]
    return []


def _is_hub_name(name: str) -> bool:
    """A hub repo id (``owner/model``), as opposed to a local folder or a ``package:`` path."""
    return (
        not name.startswith(PACKAGE_PREFIX) and not Path(name).expanduser().exists() and name.count("/") == 1
    )


def _trained_base(info: RunInfo) -> str | None:
    """``base_model_name_or_path`` recorded in the first trained adapter's PEFT config, if any."""
    try:
        return json.loads((info.run.adapter(info.trained[0]) / PEFT_CONFIG).read_text()).get(
            "base_model_name_or_path"
        )
    except (OSError, ValueError):
        return None
