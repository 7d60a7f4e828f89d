"""Run ``train.py`` as a subprocess for end-to-end tests: offline, one thread, own process group.

On timeout the whole process group is killed (DDP ranks included), so no process outlives a test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_train(*args: str, timeout: int = 420, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", **(env or {})}  # fmt: skip
    cmd = [sys.executable, "train.py", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"train.py did not finish within {timeout} s (killed its process group): {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
