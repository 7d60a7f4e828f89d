"""Run ``train.py`` as a subprocess for end-to-end tests: offline, one thread, own process group.

On timeout the whole process group is killed (DDP ranks included), so no process outlives a test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from crma_lightning.runs.record import read_record

REPO = Path(__file__).resolve().parents[1]


def run_train(
    *args: str, timeout: int = 420, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    record_dir = (
        tempfile.mkdtemp(prefix="record-") if args[:1] == ("fit",) and "--record" not in args else None
    )
    if record_dir is not None:  # the run's record says where its run directory is (see run_dir_of)
        args = (*args, "--record", os.path.join(record_dir, "record.json"))
    cmd = [sys.executable, "train.py", *args]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"train.py did not finish within {timeout} s (killed its process group): {err[-2000:]}")
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    done.record = None  # fit's record (crma_lightning.runs.record), when it wrote one
    if record_dir is not None:
        path = Path(record_dir) / "record.json"
        done.record = read_record(path) if path.is_file() else None
        shutil.rmtree(record_dir, ignore_errors=True)
    return done


def run_dir_of(proc: subprocess.CompletedProcess) -> Path:
    """The run directory of a ``run_train("fit", ...)`` that must have succeeded, from its record."""
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.record is not None and proc.record["status"] == "finished", proc.record
    return Path(proc.record["run_dir"])
