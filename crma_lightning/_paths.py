"""Import-time wiring: ``crma_lightning.callbacks`` from the top-level ``callbacks/`` folder of a
source checkout, and the module paths of the flat layout (before 0.2) as aliases of their new homes."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

CALLBACKS = Path(__file__).resolve().parent.parent / "callbacks"

MOVED = {
    "atomic": "core.atomic",
    "dist": "core.dist",
    "losses": "core.losses",
    "config": "adapters.config",
    "projection": "adapters.projection",
    "crma": "adapters.crma",
    "injection": "adapters.injection",
    "lora": "adapters.lora",
    "hub": "backbone.hub",
    "output_head": "backbone.output_head",
    "sharding": "backbone.sharding",
    "layout": "methods.layouts",
    "regularizers": "methods.regularizers",
    "protocols": "methods.protocol",
    "synthetic": "data.synthetic",
    "rundir": "runs.rundir",
    "checkpoint": "runs.checkpoint",
    "serve.runinfo": "runs.runinfo",
    "module": "training.module",
    "gradients": "training.gradients",
    "optim": "training.optim",
    "schedules": "training.schedules",
    "holdout": "training.holdout",
    "routing_stats": "routing.stats",
    "serve.router": "routing.router",
    "evaluator": "evaluation.evaluator",
    "task_metrics": "evaluation.task_metrics",
    "metrics": "evaluation.metrics",
    "report": "evaluation.report",
    "serve.generation": "evaluation.generation",
    "serve.cli": "cli.serve",
    "plan": "cli.plan",
    "fake_step": "cli.fake_step",
}
"""Old module (under ``crma_lightning.``) -> new one, kept for one release so saved configs and
scripts that name the old paths (``class_path: crma_lightning.module.ContinualLM``) still load."""


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "crma_lightning.callbacks" and (CALLBACKS / "__init__.py").is_file():
            # a source checkout; an installed wheel has the folder inside the package (pyproject)
            return importlib.util.spec_from_file_location(
                name, CALLBACKS / "__init__.py", submodule_search_locations=[str(CALLBACKS)]
            )
        old = name.removeprefix("crma_lightning.")
        if name.startswith("crma_lightning.") and old in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("crma_lightning." + MOVED[spec.name.removeprefix("crma_lightning.")])

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
