"""``train.py test --run <dir>``: the matrices of a finished run, rebuilt row by row from its adapters.

Row ``after task k`` is the base model with the LoRAs saved at the ends of tasks 1..k (under NAIVE
the shared LoRA after task k) and the CRMA state after task k (``adapters/crma_history/<task k>/``),
scored by :class:`~crma_lightning.evaluation.evaluator.RowEvaluator` as in ``fit``, on any split.
Results go to ``continual/test/`` (or ``continual/``) through :class:`~crma_lightning.runs.rundir.RunDir`.
Every row scores every task, evaluation-only ones (``data.eval_tasks``) included, whatever
``evaluation.schedule`` the run was fitted with (a rebuilt matrix is full).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from crma_lightning.adapters.lora import activate_lora, lora_disabled
from crma_lightning.core.errors import ConfigError
from crma_lightning.data import ContinualDataModule
from crma_lightning.evaluation.evaluator import (
    RowEvaluator,
    Rows,
    add_row,
    extra_matrices,
    general_drift,
    summarize_rows,
    task_data,
)
from crma_lightning.methods.layouts import SHARED_ADAPTER
from crma_lightning.routing.router import FeatureCache, load_stats_router
from crma_lightning.runs.checkpoint import CRMA_WEIGHTS, load_crma, load_lora
from crma_lightning.runs.rundir import ACCURACY_MATRIX, BASE_ROW, LOSS_MATRIX, matrix_name
from crma_lightning.serve.run import TrainedRun


def _check_history(run: TrainedRun) -> None:
    missing = [t for t in run.info.trained if not (run.info.run.crma_after(t) / CRMA_WEIGHTS).is_file()]
    if run.crma is not None and missing:
        raise ConfigError(
            f"{run.info.run_dir} has no CRMA state for the rows after {missing} "
            f"({run.info.run.crma_after(missing[0]).relative_to(run.info.run_dir)}/{CRMA_WEIGHTS}): the run "
            "was made before the CRMA history was saved; evaluate it with `train.py test --ckpt_path` "
            "instead"
        )


def _set_row(run: TrainedRun, k: int) -> list[str]:
    """Put the model in its state after the first ``k`` trained tasks; returns the adapters that
    hold a trained state at that row."""
    info = run.info
    done = info.trained[:k]
    layout = info.layout
    if run.crma is not None:
        run.crma.enabled = k > 0
        if k > 0:
            load_crma(run.model, info.run.crma_after(done[-1]), handle=run.crma)
    if layout.shared_lora:
        if k > 0:
            load_lora(run.model, SHARED_ADAPTER, info.run.adapter(done[-1]))
        return [SHARED_ADAPTER] if k > 0 else []
    return list(done)


def evaluate_run(
    run: TrainedRun,
    dm: ContinualDataModule,
    split: str = "test",
    batch_size: int | None = None,
    task_id: str = "oracle",
    router: str = "stats",
) -> dict[str, Rows]:
    """Every row of a finished run on ``split`` (one process): ``{"main": rows}`` (with the task id,
    or without it for ``task_id="none"``) and, with ``task_id="both"``, ``"no_task_id"``; rows are
    metric -> row name -> value per task. Without the task id a per-task layout routes with
    ``router``: ``stats`` (the run's routing statistics of the tasks trained by the row) or ``loss``."""
    if task_id not in ("oracle", "both", "none"):
        raise ConfigError(f"--task-id must be 'oracle', 'both' or 'none', got {task_id!r}")
    if router not in ("stats", "loss"):
        raise ConfigError(f"--router must be 'stats' or 'loss', got {router!r}")
    _check_history(run)
    dm.setup()
    info = run.info
    layout = info.layout
    tasks = task_data(dm, split, batch_size=batch_size)
    rows: Rows = {}
    blind: Rows = {}
    crma_enabled = run.crma.enabled if run.crma is not None else None
    features: FeatureCache = {}  # frozen-base features of each batch, the same for every row
    try:
        for k, name in enumerate([BASE_ROW, *info.trained]):
            trained = _set_row(run, k)

            @contextmanager
            def serve(task: str, trained: list[str] = trained) -> Iterator[None]:
                active = [a for a in layout.active_for(task, info.tasks) if a in trained]
                if active:
                    activate_lora(run.model, active)
                with nullcontext() if active else lora_disabled(run.model):
                    yield

            # One row, one model state: the routed pass may take the oracle's whole batches.
            evaluator = RowEvaluator(
                run.model, serve, run.tokenizer, pad_id=run.pad_id, early_stop=True, batch_cache={}
            )
            routed = layout.no_task_id == "route" and k > 0  # else one model serves every input

            def blind_row(
                done: list[str] = info.trained[:k], evaluator: RowEvaluator = evaluator
            ) -> dict[str, dict[str, float]]:
                route = (
                    load_stats_router(run, tasks=done).route(run.model, run.crma, run.pad_id, cache=features)
                    if router == "stats"
                    else None
                )
                return evaluator.routed(tasks, done, route)

            with torch.no_grad():
                if task_id == "none":
                    result = blind_row() if routed else evaluator.oracle(tasks)
                    add_row(rows, name, result, dm.evaluated_task_names)
                    continue
                result = evaluator.oracle(tasks)
                add_row(rows, name, result, dm.evaluated_task_names)
                if task_id == "both":
                    add_row(blind, name, blind_row() if routed else result, dm.evaluated_task_names)
    finally:
        if run.crma is not None:  # back to the run's final state, as load_run left it
            run.crma.enabled = crma_enabled
            load_crma(run.model, info.run.crma, handle=run.crma)
        if layout.shared_lora:
            load_lora(run.model, SHARED_ADAPTER, info.run.adapter(info.trained[-1]))
    return {"main": rows, "no_task_id": blind} if task_id == "both" else {"main": rows}


def write_run_matrices(
    run: TrainedRun,
    dm: ContinualDataModule,
    tables: dict[str, Rows],
    split: str,
    task_id: str = "oracle",
    router: str = "stats",
) -> dict[str, Any]:
    """Write :func:`evaluate_run`'s tables as the run's matrices and summary of ``split``; returns
    the summary."""
    rows = tables["main"]
    info = run.info
    summary: dict[str, Any] = {
        "strategy": info.strategy,
        "tasks": list(info.tasks),
        "tasks_completed": len(info.trained),
        "seed": dm.seed,
        "base_model": info.backbone.label,
        "split": split,
        "task_id": "none" if task_id == "none" else "given",
        "router": router if task_id == "none" and info.layout.no_task_id == "route" else None,
        "task_metric": {t: dm.spec(t).task_metric for t in dm.evaluated_task_names},
        "eval_tasks": list(dm.eval_task_names),
        "rebuilt_from_adapters": True,
    }
    summary |= summarize_rows(rows)
    columns = dm.evaluated_task_names
    if dm.eval_task_names:
        summary["general_drift"] = general_drift(rows, columns, dm.eval_task_names)
    files = {LOSS_MATRIX: rows["loss"], ACCURACY_MATRIX: rows["accuracy"]}
    files |= {matrix_name(metric): m for metric, m in extra_matrices(rows).items()}
    blind = tables.get("no_task_id")
    if blind is not None:
        files |= {matrix_name(m, no_task_id=True): blind[m] for m in ("loss", "accuracy")}
        files |= {matrix_name(m, no_task_id=True): r for m, r in extra_matrices(blind).items()}
        summary["no_task_id"] = summarize_rows(blind) | {"routing": info.layout.no_task_id, "router": router}
        if dm.eval_task_names:
            summary["no_task_id"]["general_drift"] = general_drift(blind, columns, dm.eval_task_names)
    info.run.write_matrices(list(columns), files, summary, split)
    return summary
