"""The machine-readable record of one ``train.py fit``: where its run directory is, whether it
finished, and its summary. Written as ``run.json`` in the run directory, and to ``--record PATH``
when given, so scripts and tests read a file instead of parsing the console."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from crma_lightning.core.atomic import atomic_write_json
from crma_lightning.runs.rundir import RunDir

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
