"""The machine-readable record of one ``train.py fit``: where its run directory is, whether it
finished, and its summary. Written as ``run.json`` in the run directory, and to ``--record PATH``
when given, so scripts and tests read a file instead of parsing the console. :func:`compact` is a
finished run's results in one small file that outlives its directory (benchmarks/results/runs/), and
:class:`RecordedRun` reads one back like a run directory."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from crma_lightning.core.atomic import atomic_write_json, json_safe
from crma_lightning.runs.rundir import Matrix, RunDir

RECORD_FILE = "run.json"
Status = Literal["finished", "failed"]


def record(
    status: Status,
    run_dir: str | os.PathLike | None,
    *,
    exit_code: int = 0,
    error: str | None = None,
) -> dict[str, Any]:
    """The record of a fit that ended with ``status``; its summary is the run's ``summary.json``
    for the validation and (if evaluated) test split, empty when the run wrote none."""
    summary: dict[str, Any] = {}
    if run_dir is not None:
        run = RunDir(run_dir) if Path(run_dir).is_dir() else None
        for split in ("validation", "test"):
            path = run.summary_of(split) if run is not None else None
            if path is not None and path.is_file():
                summary[split] = json.loads(path.read_text())
    return {
        "status": status,
        "run_dir": None if run_dir is None or not Path(run_dir).is_dir() else str(Path(run_dir).resolve()),
        "exit_code": exit_code,
        "error": error,
        "summary": summary,
        "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_record(rec: dict[str, Any], to: str | os.PathLike | None) -> None:
    """Write ``rec`` to ``<run_dir>/run.json`` (when the directory exists) and to ``to`` (if given)."""
    if rec["run_dir"] is not None and Path(rec["run_dir"]).is_dir():
        atomic_write_json(Path(rec["run_dir"]) / RECORD_FILE, rec)
    if to is not None:
        Path(to).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(to), rec)


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """A record written by :func:`write_record` (a run directory reads its ``run.json``)."""
    path = Path(path)
    return json.loads((path / RECORD_FILE if path.is_dir() else path).read_text())


# -- compact records: a finished run's results without its directory ---------------------------
COMPACT_FORMAT = 1


def compact(run: RunDir, **extra: Any) -> dict[str, Any]:
    """Everything a report reads of a finished run, in one small JSON-ready dict: every matrix and the
    summary of each evaluated split (``continual/`` and ``continual/test/``), the gradient-norm record
    and the parsed config; ``extra`` (e.g. timing, the commit) is kept as given. Its checkpoints and
    adapters are not in it: a record outlives the machine its run was on, the run directory may not."""
    splits: dict[str, Any] = {}
    for split in ("validation", "test"):
        if not run.summary_of(split).is_file():
            continue
        matrices = {}
        for f in sorted(run.results_of(split).glob("*_matrix*.csv")):
            m = run.read_matrix(f.stem, split)
            matrices[f.stem] = {
                "rows": m.rows,
                "tasks": m.tasks,
                "values": m.values.tolist(),  # NaN (and unscored) cells become null in JSON
                "unscored": m.unscored.tolist(),  # so the cells not scored are said apart
            }
        splits[split] = {"summary": run.read_summary(split), "matrices": matrices}
    out = {"format": COMPACT_FORMAT, "splits": splits, "grad_norm": run.read_grad_norm()}
    return json_safe(out | {"config": run.read_config()} | extra)


class RecordedRun:
    """A :func:`compact` record read back, with :class:`RunDir`'s reading methods (``read_matrix``,
    ``read_summary``, ``read_grad_norm``, ``read_config``), so report code takes either."""

    def __init__(self, rec: dict[str, Any], path: str | os.PathLike | None = None) -> None:
        if rec.get("format") != COMPACT_FORMAT:
            raise ValueError(f"{path or 'record'}: not a compact run record (format {rec.get('format')!r})")
        self.rec, self.path = rec, Path(path) if path is not None else None

    @classmethod
    def load(cls, path: str | os.PathLike) -> RecordedRun:
        return cls(json.loads(Path(path).read_text(encoding="utf-8")), path)

    def has_matrix(self, name: str, split: str = "validation") -> bool:
        return name in self.rec["splits"].get(split, {}).get("matrices", {})

    def read_matrix(self, name: str = "loss_matrix", split: str = "validation") -> Matrix:
        m = self.rec["splits"][split]["matrices"][name]
        values = np.array([[np.nan if v is None else v for v in r] for r in m["values"]], dtype=np.float64)
        shape = (len(m["rows"]), len(m["tasks"]))
        unscored = np.array(m.get("unscored") or np.zeros(shape, bool), bool).reshape(shape)
        return Matrix(list(m["rows"]), list(m["tasks"]), values.reshape(shape), unscored)

    def read_summary(self, split: str = "validation") -> dict[str, Any]:
        return self.rec["splits"][split]["summary"]

    def read_grad_norm(self) -> dict[str, Any] | None:
        return self.rec.get("grad_norm")

    def read_config(self) -> dict[str, Any]:
        return self.rec["config"]
