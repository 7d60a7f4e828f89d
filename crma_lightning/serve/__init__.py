"""Use a trained run: load it, generate for a task, route without a task id, export a task.

``load_run(run_dir)`` -> :class:`TrainedRun`; ``build_routing_stats(run)`` writes the routing
statistics of a run that lacks them; ``export_task(run, task, dir)`` writes one task's model and
``load_exported(dir)`` -> :class:`ExportedModel` reads it back; both share :class:`ServedModel`.
Command line: ``train.py predict|route|export`` (:mod:`crma_lightning.cli.serve`); docs/inference.md.
"""

from crma_lightning.routing.router import RouteDecision, build_routing_stats
from crma_lightning.runs.runinfo import RunInfo, read_run
from crma_lightning.serve.export import ExportedModel, export_task, load_exported
from crma_lightning.serve.model import ServedModel
from crma_lightning.serve.run import AUTO, Completion, TrainedRun, load_run

__all__ = [
    "AUTO",
    "Completion",
    "ExportedModel",
    "RouteDecision",
    "RunInfo",
    "ServedModel",
    "TrainedRun",
    "build_routing_stats",
    "export_task",
    "load_exported",
    "load_run",
    "read_run",
]
