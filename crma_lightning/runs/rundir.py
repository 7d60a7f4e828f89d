"""The run directory: every path and file name of a run, and the reading of a finished run.

A run directory is the logger's log dir, ``<save_dir>/<name>/version_N``::

    config.yaml                   the configuration LightningCLI saved (what load_run rebuilds from)
    run.json                      fit's record: status, run directory, summary (crma_lightning.runs.record)
    checkpoints/last.ckpt         Lightning checkpoints (adapters and optimizer state only); a
                                  sharded (FSDP2) checkpoint is a folder of DCP shards + meta.pt
    adapters/<task>/              the LoRA serving <task>, PEFT format, written at the task's end
    adapters/crma/                the latest CRMA state (safetensors + JSON), rewritten per task
    adapters/crma_history/<t>/    the CRMA state as it was after task <t> (to rebuild each row)
    adapters/ranks.json           every rank's adapter hash at every task end
    routing/<task>.safetensors    the task's routing statistics (frozen-base features of its
                                  training data: count, sum, sum of outer products; float64)
    routing/<task>.json           how they were gathered (layer, pooling, base signature) and the
                                  SHA-256 of the .safetensors file, written after it
    continual/loss_matrix.csv     validation (holdout) loss L[after, task]; header ``after,<tasks>``,
                                  row ``base`` first; an empty field is a cell not scored
                                  (evaluation.schedule), ``nan`` a metric that does not apply
    continual/accuracy_matrix.csv the task metric A[after, task] (token accuracy for text tasks,
                                  exact match for classification, ...), same layout
    continual/<metric>_matrix.csv the other metrics computed (label_accuracy, token_accuracy, ...)
    continual/*_no_task_id.csv    the same without the task id (routed, or the one model every input
                                  gets), and routing_accuracy_matrix_no_task_id.csv
    continual/summary.json        drift, BWT, FWT, forgetting, final averages (on A), spectral bound,
                                  evaluation time
    continual/test/               the same files on the test split (one row per task end, with the
                                  evaluation callback's test_matrices)
    continual/grad_norm.json      per-task peak and mean gradient norm
    continual/resources.json      per-task step time and memory (optional ResourceMonitor callback)
    continual/*.png               heatmaps of the matrices
    events.out.tfevents.*         TensorBoard

Callbacks, the report, ``serve`` and the benchmarks name these files only through this module.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from crma_lightning.core.atomic import aside_of, atomic_write_json, atomic_write_text, json_safe
from crma_lightning.core.errors import ConfigError
from crma_lightning.data.tasks import RESERVED_TASK_NAMES

CONFIG_FILE = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
ADAPTERS_DIR = "adapters"
CRMA_DIR = "crma"
RANKS_FILE = "ranks.json"
ROUTING_DIR = "routing"
RESULTS_DIR = "continual"
LOSS_MATRIX = "loss_matrix"
ACCURACY_MATRIX = "accuracy_matrix"
NO_TASK_ID = "_no_task_id"
"""Suffix of a matrix evaluated without the task id (``accuracy_matrix_no_task_id.csv``)."""
CRMA_HISTORY_DIR = "crma_history"
assert (CRMA_DIR, CRMA_HISTORY_DIR) == RESERVED_TASK_NAMES  # data.tasks refuses these task names
TEST_DIR = "test"
"""Folder of ``continual/`` holding the matrices and summary on the test split."""
SUMMARY_FILE = "summary.json"
GRAD_NORM_FILE = "grad_norm.json"
RESOURCES_FILE = "resources.json"
SHARDED_META = "meta.pt"
"""Lightning's metadata file inside a sharded (distributed-checkpoint) folder."""

RUN_DIR_LINE = "run dir: "
"""What ``train.py fit`` prints before the run directory's path when it ends (scripts parse it)."""

BASE_ROW = "base"
"""Name of the matrices' first row: the model before any training."""


_VERSION = re.compile(r"version_(\d+)")


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a sharded checkpoint folder (FSDP: DCP shards + ``meta.pt``)."""
    return path.is_file() or (path.is_dir() and (path / SHARDED_META).is_file())


UNSCORED = ""
"""A matrix CSV's field for a cell that was not scored (``evaluation.schedule: seen`` or ``minimal``):
empty, unlike ``nan``, a metric that does not apply to the task."""


class _MatrixFields(NamedTuple):
    rows: list[str]
    tasks: list[str]
    values: np.ndarray
    """``(len(rows), len(tasks))`` float64; NaN where the metric does not apply or the cell was not
    scored (:attr:`Matrix.unscored` tells them apart)."""


class Matrix(_MatrixFields):
    """One results matrix as written to CSV: row names (``base`` first), task names, values; and
    ``unscored``, ``(len(rows), len(tasks))`` bool, the cells not scored. It unpacks as the three
    fields (``rows, tasks, values = matrix``), as before unscored cells existed."""

    unscored: np.ndarray

    def __new__(
        cls, rows: list[str], tasks: list[str], values: np.ndarray, unscored: np.ndarray | None = None
    ):
        self = super().__new__(cls, rows, tasks, values)
        self.unscored = np.zeros(np.shape(values), bool) if unscored is None else np.asarray(unscored, bool)
        return self

    @property
    def scored(self) -> np.ndarray:
        """``(len(rows), len(tasks))`` bool: the cells that were scored."""
        return ~self.unscored

    def cells(self) -> dict[str, list[float | None]]:
        """Row name -> values, None where a cell was not scored (the evaluator's rows)."""
        scored = self.scored
        return {
            name: [float(v) if s else None for v, s in zip(row, ok, strict=True)]
            for name, row, ok in zip(self.rows, self.values, scored, strict=True)
        }


def matrix_name(metric: str, no_task_id: bool = False) -> str:
    """File stem of a metric's matrix: ``loss`` -> ``loss_matrix``, ``accuracy`` (the task metric)
    -> ``accuracy_matrix``, ``exact_match`` -> ``exact_match_matrix``; ``_no_task_id`` appended."""
    return f"{metric}_matrix" + (NO_TASK_ID if no_task_id else "")


def matrix_csv(rows: dict[str, list[float | None]], tasks: list[str]) -> str:
    """A matrix as CSV: ``None`` (a cell not scored) is written as :data:`UNSCORED`."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["after", *tasks])
    for name, values in rows.items():
        writer.writerow([name, *(UNSCORED if v is None else f"{v:.8g}" for v in values)])
    return buf.getvalue()


def read_matrix_csv(path: str | os.PathLike) -> Matrix:
    """A matrix CSV; an :data:`UNSCORED` field reads as NaN, marked in :attr:`Matrix.unscored`."""
    with open(path, encoding="utf-8", newline="") as f:
        data = list(csv.reader(f))
    header, body = data[0], data[1:]
    cells = [r[1:] for r in body]
    unscored = np.array([[x == UNSCORED for x in r] for r in cells], dtype=bool).reshape(len(body), -1)
    values = np.array(
        [[np.nan if x == UNSCORED else float(x) for x in r] for r in cells], dtype=np.float64
    ).reshape(len(body), -1)
    return Matrix([r[0] for r in body], header[1:], values, unscored)


def init_args(section: Any) -> dict[str, Any]:
    """A config section as plain keyword arguments (``class_path``/``init_args`` form unwrapped)."""
    if isinstance(section, dict) and "init_args" in section:
        return dict(section["init_args"] or {})
    return dict(section or {})


@dataclass(frozen=True)
class RunDir:
    """The files of one run. Paths only; nothing is created until a writer asks for it."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    # -- layout ------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def adapters(self) -> Path:
        return self.path / ADAPTERS_DIR

    def adapter(self, task: str) -> Path:
        """The PEFT folder of the LoRA that serves ``task``."""
        return self.adapters / task

    @property
    def crma(self) -> Path:
        return self.adapters / CRMA_DIR

    def crma_after(self, task: str) -> Path:
        """The CRMA state as it was when ``task`` ended (same files as :attr:`crma`)."""
        return self.adapters / CRMA_HISTORY_DIR / task

    @property
    def ranks_file(self) -> Path:
        return self.adapters / RANKS_FILE

    @property
    def routing(self) -> Path:
        return self.path / ROUTING_DIR

    def routing_stats(self, task: str) -> Path:
        """The routing statistics of ``task`` (``crma_lightning.routing.stats``)."""
        return self.routing / f"{task}.safetensors"

    def routing_meta(self, task: str) -> Path:
        """What :meth:`routing_stats` was gathered with, and its hash."""
        return self.routing / f"{task}.json"

    @property
    def results(self) -> Path:
        return self.path / RESULTS_DIR

    def results_of(self, split: str = "validation") -> Path:
        """``continual/`` for the validation split (the matrices of ``fit``), ``continual/test/`` for test."""
        return self.results if split == "validation" else self.results / TEST_DIR

    def matrix_file(self, name: str = LOSS_MATRIX, split: str = "validation") -> Path:
        return self.results_of(split) / f"{name}.csv"

    def figure_file(self, name: str, split: str = "validation") -> Path:
        return self.results_of(split) / f"{name}.png"

    @property
    def summary_file(self) -> Path:
        return self.results / SUMMARY_FILE

    def summary_of(self, split: str = "validation") -> Path:
        return self.results_of(split) / SUMMARY_FILE

    @property
    def grad_norm_file(self) -> Path:
        return self.results / GRAD_NORM_FILE

    @property
    def resources_file(self) -> Path:
        """Per-task step time and memory (the optional
        ``crma_lightning.callbacks.resources.ResourceMonitor``)."""
        return self.results / RESOURCES_FILE

    # -- writing results ---------------------------------------------------------------------
    def write_matrices(
        self,
        tasks: list[str],
        rows: dict[str, dict[str, list[float]]],
        summary: dict[str, Any],
        split: str = "validation",
    ) -> None:
        """``rows[name]`` is one matrix (row name -> values per task); each becomes ``<name>.csv``;
        then the summary. Each file is replaced atomically."""
        for name, matrix in rows.items():
            atomic_write_text(self.matrix_file(name, split), matrix_csv(matrix, tasks))
        atomic_write_json(self.summary_of(split), json_safe(summary))

    # -- reading a run -----------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        """``config.yaml`` parsed with ``yaml.safe_load`` (nothing is executed or unpickled)."""
        if not self.path.is_dir():
            raise ConfigError(
                f"run directory {str(self.path)!r} does not exist; pass the path `fit` printed as `run dir:`"
            )
        if not self.config_file.is_file():
            raise ConfigError(
                f"{self.path} has no {CONFIG_FILE}, so it is not a run directory of `train.py fit`; pass the "
                "path `fit` printed as `run dir:` (e.g. runs/tiny/version_0)"
            )
        try:
            cfg = yaml.safe_load(self.config_file.read_text(encoding="utf-8"))
            for section in ("model", "data"):  # both are needed to rebuild the run
                init_args(cfg[section])
        except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ConfigError(
                f"{self.config_file} is not a readable crma-lightning config ({type(e).__name__}: {e}); it "
                "is damaged"
            ) from None
        return cfg

    def read_matrix(self, name: str = LOSS_MATRIX, split: str = "validation") -> Matrix:
        return read_matrix_csv(self.matrix_file(name, split))

    def read_summary(self, split: str = "validation") -> dict[str, Any]:
        return json.loads(self.summary_of(split).read_text(encoding="utf-8"))

    def read_grad_norm(self) -> dict[str, Any] | None:
        f = self.grad_norm_file
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None

    def is_complete(self) -> bool:
        """Whether the run evaluated every task of its sequence (its summary says so)."""
        if not self.summary_file.is_file():
            return False
        s = self.read_summary()
        return s.get("tasks_completed") == len(s.get("tasks", ()))

    def resumable_checkpoint(self) -> Path | None:
        """``checkpoints/last.ckpt`` if it is complete; else the previous one that a save was
        swapping out when the run died (``atomic.swap_in``); else None."""
        for path in (self.last_checkpoint, aside_of(self.last_checkpoint)):
            if is_checkpoint(path):
                return path
        return None

    def has_checkpoint(self) -> bool:
        return self.resumable_checkpoint() is not None

    @property
    def version(self) -> int | None:
        m = _VERSION.fullmatch(self.path.name)
        return int(m.group(1)) if m else None


def versions(root: str | os.PathLike) -> list[RunDir]:
    """The ``version_N`` run directories under a logger's ``<save_dir>/<name>``, oldest first."""
    runs = [RunDir(p) for p in Path(root).glob("version_*") if p.is_dir()]
    return sorted((r for r in runs if r.version is not None), key=lambda r: r.version)
