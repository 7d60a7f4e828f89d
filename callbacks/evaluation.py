"""Evaluate every task before training and after each task: the matrices L and A, and task metrics.

Writes ``continual/{loss,accuracy,<metric>}_matrix.csv``, their ``*_no_task_id.csv`` and
``continual/test/`` counterparts, summary.json (BWT, FWT, forgetting, final averages; docs/method.md
§4) and heatmaps; the scoring itself is ``crma_lightning.evaluation.evaluator``'s.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from contextlib import contextmanager
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from crma_lightning.callbacks.boundary import TaskBoundaryCallback, run_dir
from crma_lightning.callbacks.routing import RoutingStatistics
from tqdm import tqdm

from crma_lightning.backbone.sharding import is_sharded
from crma_lightning.core.clock import TaskClock
from crma_lightning.core.errors import ConfigError
from crma_lightning.evaluation.evaluator import (
    SCHEDULES,
    Route,
    RowEvaluator,
    add_row,
    as_array,
    extra_matrices,
    general_drift,
    scheduled_tasks,
    summarize_rows,
    task_data,
)
from crma_lightning.evaluation.report import heatmap_figure, pyplot, save_figure, table
from crma_lightning.evaluation.reuse import ServingDigests
from crma_lightning.methods.protocol import ContinualModule, as_continual
from crma_lightning.routing.router import DEFAULT_SHRINKAGE, FeatureCache, StatsRouter
from crma_lightning.runs.rundir import ACCURACY_MATRIX, BASE_ROW, LOSS_MATRIX, NO_TASK_ID, matrix_name

CL_SCALARS = (
    "drift_pct",
    "bwt",
    "fwt",
    "forgetting",
    "final_avg_loss",
    "final_avg_accuracy",
    "spectral_max_sigma",
    "spectral_max_row_col_err",
)
"""Summary values also logged as ``cl/<name>`` scalars."""

SPLITS = {"validation": ("val", "cl"), "test": ("test", "cl_test")}
"""Held-out split -> (prefix of its per-task scalars, prefix of its summary scalars)."""


def _shown(key: str, value: float | None) -> str:
    """A summary value as the console prints it; sigma_max to 7 digits, so a value below 1 never
    reads as 1."""
    if value is None:
        return "n/a"
    if key in ("drift_pct", "bwt", "fwt"):
        return f"{value:+.3f}"
    return f"{value:.7f}" if key == "spectral_max_sigma" else f"{value:.4g}"


class ContinualEvaluation(TaskBoundaryCallback):
    """Held-out loss and task metrics on every task, before training and after each task.

    Row ``base`` is the model before any training (the zero-shot row); row ``<task k>`` is after
    training task k, and covers all tasks (later ones too, for forward transfer). Task i is evaluated
    with its own LoRA (the shared one under NAIVE) and, in MODULAR, the current CRMA. Per task and row:
    the next-token loss (L, ``loss_matrix.csv``) and the task's metric (A, ``accuracy_matrix.csv``;
    ``data.tasks[].metric``: token accuracy for text, exact match of the greedy answer for
    classification, ROUGE-L or exact match for a free-text task that names it); the other metrics
    computed get their own ``<metric>_matrix.csv``. BWT, FWT, forgetting and the final average accuracy
    are computed on A.

    Without the task id (``task_id: both`` or ``none``) layouts with a LoRA per task route each example
    among the adapters trained so far (``router``; the routing accuracy per task is a matrix of its
    own), and layouts that serve every input with one model give the same numbers as with the id.
    With ``task_id: none`` the matrices hold those numbers and summary.json says ``"task_id": "none"``.

    The matrices use the validation split; with ``test_matrices`` each row also scores the test split
    (``continual/test/``: the numbers to report, hyperparameters being picked on validation). After each
    row the files, the summary and heatmaps are written atomically (a crash keeps the last complete row)
    and logged as ``val/<task>/<metric>``, ``cl/*`` (``test/...``, ``cl_test/*``) at step = number of
    tasks trained. Each rank evaluates a disjoint shard and the sums are all-reduced, so the result
    equals a single-process evaluation.

    ``schedule`` picks the cells each row scores (``full``, ``seen``, ``minimal``; unscored cells
    are None, empty in the CSVs); ``reuse`` copies a cell whose serving tensors are unchanged since
    it was scored. Evaluation-only tasks (``data.eval_tasks``) are extra columns of every row,
    summarised as ``general_drift`` (docs/decisions.md, "Evaluation schedules, unscored cells and
    reuse").
    """

    role = "evaluation"

    def __init__(
        self,
        batch_size: int | None = None,
        print_table: bool = True,
        test_matrices: bool = True,
        task_id: Literal["oracle", "both", "none"] = "oracle",
        router: Literal["stats", "loss"] = "stats",
        schedule: Literal["full", "seen", "minimal"] = "full",
        reuse: bool = True,
    ):
        """
        Args:
            batch_size: evaluation batch size (default: data.eval_batch_size).
            print_table: print the matrices and summary at the end of training (rank 0).
            test_matrices: also score every row on the test split (``continual/test/``).
            task_id: ``oracle``: evaluate each task with its task id; ``both``: also without it
                (``*_no_task_id.csv``; per-task layouts route every example); ``none``: only
                without it (the matrices hold those numbers).
            router: how examples are routed without the task id: ``stats``, the statistics router
                (frozen-base features of the prompt against each trained task's training data;
                written by the ``routing`` callback at each task end), or ``loss``, the adapter that
                gives the prompt the lowest loss (every candidate runs on every example).
            schedule: which cells each row scores: ``full``, every task after every task; ``seen``,
                the tasks trained so far (the lower triangle, as O-LoRA and TRACE report);
                ``minimal``, only the cells the summary needs (the diagonal, the superdiagonal and
                the final row: O(T) task evaluations). The base row and evaluation-only tasks
                (``data.eval_tasks``) are always scored; a cell not scored is empty in the CSVs,
                and a metric whose cells were not scored is null.
            reuse: copy a cell (with the task id) instead of scoring it again when the tensors that
                serve its task (its active LoRAs, CRMA) are bit-identical to when it was last
                scored (``evaluation_reused_cells`` in the summary counts them).
        """
        super().__init__()
        if task_id not in ("oracle", "both", "none"):
            raise ConfigError(f"evaluation.task_id: must be 'oracle', 'both' or 'none', got {task_id!r}")
        if router not in ("stats", "loss"):
            raise ConfigError(f"evaluation.router: must be 'stats' or 'loss', got {router!r}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"evaluation.schedule: must be 'full', 'seen' or 'minimal', got {schedule!r}")
        self.batch_size = batch_size
        self.print_table = print_table
        self.test_matrices = test_matrices
        self.task_id = task_id
        self.router = router
        self.schedule = schedule
        self.reuse = reuse
        self.reused_cells = 0
        # (split, task) -> (digest of what served it, its scores) of the last time it was scored.
        # Not resumable state: after a resume the first row scores again (the same numbers).
        self._scored: dict[tuple[str, str], tuple[str, dict[str, float]]] = {}
        # The statistics router's frozen-base features of each evaluation batch: the same in every
        # row (the base is frozen, the batches fixed), so computed once per (split, task) batch.
        self._route_features: FeatureCache = {}
        # table (a split, or a split + NO_TASK_ID) -> metric ("loss", "accuracy": the task metric,
        # then the evaluator's other metrics) -> row name -> value per task
        self.rows: dict[str, dict[str, dict[str, list[float]]]] = {}
        # table -> task -> the final row's per-example scores of the task metric (None: not kept)
        self.final_examples: dict[str, dict[str, list[float] | None]] = {}
        # table -> task -> the final row's [loss sum, tokens] per example (None: not kept)
        self.final_losses: dict[str, dict[str, list[list[float]] | None]] = {}
        self.evaluation_s = 0.0

    @property
    def loss_rows(self) -> dict[str, list[float]]:
        """L on the validation split: row name -> per-task loss."""
        return self.rows.get("validation", {}).get("loss", {})

    @property
    def acc_rows(self) -> dict[str, list[float]]:
        """A (the task metric) on the validation split."""
        return self.rows.get("validation", {}).get("accuracy", {})

    @property
    def splits(self) -> list[str]:
        """The splits each row scores: the test split too with ``test_matrices``, unless the run was
        resumed from a checkpoint whose rows have no test scores (its matrix would lack rows)."""
        test = self.rows.get("test", {}).get("loss", {})
        return (
            ["validation", "test"]
            if self.test_matrices and list(test) == list(self.loss_rows)
            else ["validation"]
        )

    def tables(self, split: str) -> list[str]:
        """The row tables of ``split``: with the task id, and without it with ``task_id: both``
        (unless resumed from a checkpoint whose rows lack them)."""
        nt = self.rows.get(split + NO_TASK_ID, {}).get("loss", {})
        both = self.task_id == "both" and list(nt) == list(self.rows.get(split, {}).get("loss", {}))
        return [split, split + NO_TASK_ID] if both else [split]

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        split: str = "validation",
        route_among: list[str] | None = None,
        only: list[str] | None = None,
        batch_cache: dict | None = None,
    ) -> dict[str, dict[str, float]]:
        """Every evaluated task of ``split`` (``only``: those tasks) with its own adapters, or without
        the task id routed among the adapters of ``route_among``: task -> metric -> value
        (evaluator.METRICS and ``accuracy``, the task metric; NaN where a metric does not apply).
        ``batch_cache``: shared by the calls of one row (``RowEvaluator``'s)."""
        module = as_continual(pl_module)
        dm = trainer.datamodule
        training_task = TaskClock.of(trainer).task(trainer.current_epoch)

        @contextmanager
        def serve(task: str):
            module.use_task(task)
            yield

        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context():
                tasks = task_data(dm, split, trainer.global_rank, trainer.world_size, self.batch_size, only)
                evaluator = RowEvaluator(
                    module.model,
                    serve,
                    dm.hf_tokenizer,
                    pad_id=dm.pad_token_id,
                    head=module.fused_head,
                    # A sharded forward is a collective: every rank must run as many, so neither
                    # stopping early nor skipping a batch another rank may run.
                    early_stop=not is_sharded(module.model),
                    batch_cache=None if is_sharded(module.model) else batch_cache,
                )
                if route_among is None:
                    return evaluator.oracle(tasks)
                return evaluator.routed(tasks, route_among, self._stats_route(trainer, module, route_among))
        finally:
            module.use_task(training_task)
            pl_module.train(was_training)

    def _stats_route(self, trainer: pl.Trainer, module: ContinualModule, tasks: list[str]) -> Route | None:
        """The statistics router among ``tasks`` (None: route by loss)."""
        if self.router != "stats":
            return None
        sums, meta = _routing_callback(trainer).task_stats(trainer, tasks)
        router = StatsRouter(tasks, dict(zip(tasks, sums, strict=True)), meta, DEFAULT_SHRINKAGE)
        return router.route(
            module.model,
            module.crma,
            trainer.datamodule.pad_token_id,
            stop=not is_sharded(module.model),
            cache=self._route_features,
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        routes = as_continual(pl_module).layout.no_task_id == "route"
        if self.task_id != "oracle" and routes and self.router == "stats":
            callback = _routing_callback(trainer)
            if callback is None or not callback.enabled:
                raise ConfigError(
                    f"evaluation.task_id: {self.task_id} routes with the routing statistics "
                    "(evaluation.router: stats), but the routing callback is off: set routing.enabled: "
                    "true, or evaluation.router: loss"
                )

    def _add_row(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        start = time.perf_counter()
        dm = trainer.datamodule
        tasks, columns = dm.task_names, dm.evaluated_task_names
        trained = [] if name == BASE_ROW else tasks[: tasks.index(name) + 1]
        todo = scheduled_tasks(self.schedule, tasks, len(trained)) + dm.eval_task_names
        routes = as_continual(pl_module).layout.no_task_id == "route"
        reused_before = self.reused_cells
        for split, tables in {split: self.tables(split) for split in self.splits}.items():
            # The oracle's classification batches, for the routed pass of the same row to take
            # where a whole batch is routed to its own task (RowEvaluator.batch_cache).
            batch_cache: dict = {}
            blind = self.task_id == "none" and routes and trained  # the one evaluation, routed
            if blind:
                result = self.evaluate(trainer, pl_module, split, route_among=trained, only=todo)
            else:
                result = self._oracle(trainer, pl_module, split, todo, batch_cache)
            add_row(self.rows.setdefault(split, {}), name, result, columns)
            self._keep_examples(split, name, tasks, result)
            if len(tables) > 1:
                # A shared LoRA, or all LoRAs summed, serve every input alike: the row is the same.
                # So is the base row (no adapter trained yet).
                if routes and trained:
                    result = self.evaluate(
                        trainer, pl_module, split, route_among=trained, only=todo, batch_cache=batch_cache
                    )
                add_row(self.rows.setdefault(split + NO_TASK_ID, {}), name, result, columns)
                self._keep_examples(split + NO_TASK_ID, name, tasks, result)
        took = time.perf_counter() - start
        self.evaluation_s += took
        # No progress bar runs here (fit's bar is the training one): say what the pause was.
        done = "base model" if name == BASE_ROW else f"after {name}"
        reused = self.reused_cells - reused_before
        line = f"evaluated {done}: {len(todo)} tasks on {' and '.join(self.splits)} in {took:.1f} s"
        line += f" ({reused} cells reused)" if reused else ""
        if trainer.is_global_zero:
            tqdm.write(line, file=sys.stdout)  # on a line of its own, above a progress bar if one is drawn
        self._publish(trainer, as_continual(pl_module))

    def _keep_examples(self, table: str, name: str, tasks: list[str], result: dict) -> None:
        """After the last task: each task's per-example scores of the task metric (``examples``: the
        summary's ``final_examples``), so that methods can be compared example by example."""
        if name == tasks[-1]:
            self.final_examples[table] = {t: r.get("examples") for t, r in result.items()}
            self.final_losses[table] = {t: r.get("example_losses") for t, r in result.items()}

    def _oracle(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        split: str,
        todo: list[str],
        batch_cache: dict | None = None,
    ) -> dict[str, dict[str, float]]:
        """The cells of ``todo`` on ``split`` with the task id: copied where what serves the task is
        bit-identical to when the cell was last scored (``reuse``), scored otherwise."""
        if not self.reuse:
            return self.evaluate(trainer, pl_module, split, only=todo, batch_cache=batch_cache)
        module = as_continual(pl_module)
        digests = ServingDigests(module.model, module.crma)
        key = {t: digests.of(module.layout.active_for(t, module.task_names)) for t in todo}
        same = [t for t in todo if self._scored.get((split, t), ("",))[0] == key[t]]
        # Every rank must take the same decision (each scores its shard; sharded forwards are
        # collectives): a cell is reused only if it is unchanged on every rank's shard.
        changed = torch.tensor([float(t not in same) for t in todo], device=pl_module.device)
        changed = trainer.strategy.reduce(changed, reduce_op="sum")
        same = [t for t, c in zip(todo, changed.tolist(), strict=True) if c == 0]
        fresh = [t for t in todo if t not in same]
        result = (
            self.evaluate(trainer, pl_module, split, only=fresh, batch_cache=batch_cache) if fresh else {}
        )
        for t in fresh:
            self._scored[split, t] = (key[t], dict(result[t]))
        for t in same:
            result[t] = dict(self._scored[split, t][1])
        self.reused_cells += len(same)
        return result

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if BASE_ROW not in self.loss_rows:
            if trainer.global_step > 0:
                # Resumed without this callback's state: the base row can no longer be measured.
                raise ConfigError(
                    "the checkpoint has no ContinualEvaluation state (was the callback missing or renamed?); "
                    "the base-model row cannot be recomputed after training. Resume with the same callbacks."
                )
            self._add_row(trainer, pl_module, BASE_ROW)
        super().on_train_start(trainer, pl_module)

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task_index: int) -> None:
        self._add_row(trainer, pl_module, trainer.datamodule.task_names[task_index])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.print_table and trainer.is_global_zero and self.loss_rows:
            print(self.render(trainer, as_continual(pl_module)), flush=True)

    # -- results -------------------------------------------------------------------------
    def matrices(self, split: str = "validation") -> tuple[np.ndarray, np.ndarray]:
        """``(L, A)`` of ``split``, each ``(rows, tasks)``; NaN where a cell was not scored."""
        rows = self.rows.get(split, {})
        return as_array(rows.get("loss", {})), as_array(rows.get("accuracy", {}))

    def summary(self, trainer: pl.Trainer, module: ContinualModule, split: str = "validation") -> dict:
        dm = trainer.datamodule
        done = len(self.rows[split]["loss"]) - 1  # rows after the base row
        has_crma = module.crma is not None
        out = {
            "strategy": module.strategy,
            "tasks": list(dm.task_names),
            "tasks_completed": done,
            "seed": getattr(dm, "seed", None),
            "base_model": module.backbone_config.label,
            "split": split,
            "task_id": "none" if self.task_id == "none" else "given",  # how the matrices were evaluated
            "router": self.router if self.task_id == "none" and module.layout.no_task_id == "route" else None,
            # What A holds for each task (BWT, FWT, forgetting and the averages are on it).
            "task_metric": {t: dm.spec(t).task_metric for t in dm.evaluated_task_names},
            "eval_tasks": list(dm.eval_task_names),
            "schedule": self.schedule,
            "drift_pct": None,
            "bwt": None,
            "fwt": None,
            "forgetting": None,
            "final_avg_loss": None,
            "final_avg_accuracy": None,
            # Reported by the spectral callback, when it runs (and only meaningful with CRMA).
            "spectral_max_sigma": module.run_facts.get("spectral_max_sigma") if has_crma else None,
            "spectral_max_row_col_err": module.run_facts.get("spectral_max_row_col_err")
            if has_crma
            else None,
            "evaluation_s": self.evaluation_s,
            "evaluation_reused_cells": self.reused_cells,
            "fused_loss": module.run_facts.get("fused_loss"),  # how the training loss was formed
        }
        out |= summarize_rows(self.rows[split])
        if split in self.final_examples:  # paired comparisons of runs need the examples themselves
            given, blind = self.final_examples[split], self.final_examples.get(split + NO_TASK_ID)
            out["final_examples"] = {"task_id": given, "no_task_id": blind}
            given, blind = self.final_losses[split], self.final_losses.get(split + NO_TASK_ID)
            out["final_losses"] = {"task_id": given, "no_task_id": blind}
        if dm.eval_task_names:
            columns = dm.evaluated_task_names
            out["general_drift"] = general_drift(self.rows[split], columns, dm.eval_task_names)
        return out

    def _publish(self, trainer: pl.Trainer, module: ContinualModule) -> None:
        out = run_dir(trainer)  # on every rank: a collective
        if not trainer.is_global_zero:
            return
        for split in self.splits:
            self._publish_split(trainer, module, out, split)
        # A figure is a web of reference cycles holding its (tasks x tasks) pixel buffer; collect it
        # now rather than when the cyclic collector gets to it (memory would pile up over tasks).
        gc.collect()

    def _publish_split(self, trainer: pl.Trainer, module: ContinualModule, out, split: str) -> None:
        tasks = list(trainer.datamodule.evaluated_task_names)
        rows = self.rows[split]
        step = len(rows["loss"]) - 1
        summary = self.summary(trainer, module, split)
        extra = extra_matrices(rows)
        files = {LOSS_MATRIX: rows["loss"], ACCURACY_MATRIX: rows["accuracy"]}
        files |= {matrix_name(metric): m for metric, m in extra.items()}
        nt_rows = self.rows[split + NO_TASK_ID] if len(self.tables(split)) > 1 else None
        if nt_rows is not None:
            nt_extra = extra_matrices(nt_rows)
            files |= {matrix_name(m, no_task_id=True): nt_rows[m] for m in ("loss", "accuracy")}
            files |= {matrix_name(m, no_task_id=True): r for m, r in nt_extra.items()}
            summary["no_task_id"] = summarize_rows(nt_rows) | {
                "routing": module.layout.no_task_id,
                "router": self.router,
            }
            if trainer.datamodule.eval_task_names:
                summary["no_task_id"]["general_drift"] = general_drift(
                    nt_rows, tasks, trainer.datamodule.eval_task_names
                )
        out.write_matrices(tasks, files, summary, split)
        loss, acc = self.matrices(split)
        unscored = np.array([[v is None for v in row] for row in rows["loss"].values()], dtype=bool)
        figures = {
            LOSS_MATRIX: heatmap_figure(
                loss,
                list(rows["loss"]),
                tasks,
                f"{split} loss L[after, task] (lower is better)",
                "viridis_r",
                unscored,
            ),
            ACCURACY_MATRIX: heatmap_figure(
                acc, list(rows["accuracy"]), tasks, f"{split} task metric A[after, task]", "viridis", unscored
            ),
        }
        for name, fig in figures.items():
            save_figure(fig, out.figure_file(name, split))
        prefix, cl_prefix = SPLITS[split]
        # The latest row's scored cells (a schedule leaves some unscored; NaN: does not apply).
        scalars = {f"{prefix}/{t}/loss": v for t, v in zip(tasks, loss[-1], strict=True) if not math.isnan(v)}
        scalars |= {
            f"{prefix}/{t}/accuracy": v for t, v in zip(tasks, acc[-1], strict=True) if not math.isnan(v)
        }
        for metric, m in extra.items():
            last = list(m.values())[-1]
            scalars |= {f"{prefix}/{t}/{metric}": v for t, v in zip(tasks, last, strict=True) if _value(v)}
        scalars |= {f"{cl_prefix}/{k}": v for k, v in summary.items() if k in CL_SCALARS and v is not None}
        scalars |= _drift_scalars(f"{cl_prefix}/", summary.get("general_drift"))
        if nt_rows is not None:
            for metric in ("loss", "accuracy", *nt_extra):
                last = list(nt_rows[metric].values())[-1]
                named = zip(tasks, last, strict=True)
                scalars |= {f"{prefix}/{t}/{metric}{NO_TASK_ID}": v for t, v in named if _value(v)}
            nt_summary = summary["no_task_id"].items()
            scalars |= {f"{cl_prefix}{NO_TASK_ID}/{k}": v for k, v in nt_summary if isinstance(v, float)}
            scalars |= _drift_scalars(f"{cl_prefix}{NO_TASK_ID}/", summary["no_task_id"].get("general_drift"))
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            # Lightning has no logger-neutral image API; loggers whose writer takes figures
            # (TensorBoard's SummaryWriter) get them.
            add_figure = getattr(logger.experiment, "add_figure", None)
            if add_figure is not None and split == "validation":
                for name, fig in figures.items():
                    add_figure(f"continual/{name}", fig, global_step=step, close=False)
        for fig in figures.values():
            pyplot().close(fig)

    def render(self, trainer: pl.Trainer, module: ContinualModule) -> str:
        tasks = list(trainer.datamodule.evaluated_task_names)
        metrics = sorted({trainer.datamodule.spec(t).task_metric for t in tasks})
        lines = []
        for split in self.splits:
            s = self.summary(trainer, module, split)
            rows = self.rows[split]
            fmt = {k: _shown(k, v) for k, v in s.items() if k in CL_SCALARS}
            name = split
            name += " (no task id)" if self.task_id == "none" else ""
            lines += [
                "",
                table(
                    rows["loss"], tasks, f"{name} loss ({s['strategy']}; rows: after training, columns: task)"
                ),
                "",
                table(rows["accuracy"], tasks, f"{name} task metric ({', '.join(metrics)})"),
                "",
                f"{split}: " + "  ".join(f"{k}={v}" for k, v in fmt.items()),
            ]
            drift = s.get("general_drift")
            if drift:
                lines.append(
                    f"{split}: general drift (evaluation-only tasks, base -> last row): "
                    + "  ".join(
                        f"{g}: loss {d['loss_pct']:+.2f} %, metric drop {d['metric_drop']:+.4f}"
                        for g, d in drift["tasks"].items()
                    )
                )
            if len(self.tables(split)) > 1:
                nt = self.rows[split + NO_TASK_ID]
                lines += ["", table(nt["accuracy"], tasks, f"{name} task metric without the task id")]
                if "routing_accuracy" in extra_matrices(nt):
                    lines += [
                        "",
                        table(nt["routing_accuracy"], tasks, f"{name} routing accuracy (no task id)"),
                    ]
        return "\n".join(lines)

    # -- resumable state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        rows = {split: {m: dict(r) for m, r in metrics.items()} for split, metrics in self.rows.items()}
        return super().state_dict() | {
            "rows": rows,
            "evaluation_s": self.evaluation_s,
            "reused_cells": self.reused_cells,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if "rows" in state_dict:
            self.rows = {
                split: {m: dict(r) for m, r in metrics.items()}
                for split, metrics in state_dict["rows"].items()
            }
            self.evaluation_s = float(state_dict.get("evaluation_s", 0.0))
            self.reused_cells = int(state_dict.get("reused_cells", 0))
        else:
            # A checkpoint from before task metrics: its accuracy rows are token accuracy.
            self.rows = {
                "validation": {
                    "loss": dict(state_dict["loss_rows"]),
                    "accuracy": dict(state_dict["acc_rows"]),
                }
            }


def _value(v: float | None) -> bool:
    """A scored cell whose metric applies."""
    return v is not None and not math.isnan(v)


def _drift_scalars(prefix: str, drift: dict | None) -> dict[str, float]:
    """``general_drift`` as scalars: the means, and each evaluation-only task's two changes."""
    if not drift:
        return {}
    out = {f"{prefix}general_drift/{k}": drift[k] for k in ("mean_loss_pct", "mean_metric_drop")}
    for task, d in drift["tasks"].items():
        out |= {f"{prefix}general_drift/{task}/{k}": d[k] for k in ("loss_pct", "metric_drop")}
    return out


def _routing_callback(trainer: pl.Trainer) -> RoutingStatistics | None:
    return next((c for c in trainer.callbacks if isinstance(c, RoutingStatistics)), None)
