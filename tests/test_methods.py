"""Methods composed from parts (the baselines issue): layouts, regularisers, replay, multi-task.

The three conditions of the paper keep their results: configs/tiny.yaml under naive, frozen and
modular gives the loss matrices committed in tests/reference/ (written by main before methods
became composable).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from subproc import REPO, run_train

from crma_lightning.rundir import RUN_DIR_LINE, read_matrix_csv


def fit_dir(tmp: Path, *args: str) -> Path:
    proc = run_train("fit", "--config", "configs/tiny.yaml", *args, "--trainer.logger.init_args.save_dir", str(tmp),
                     "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith(RUN_DIR_LINE))
    return Path(line.removeprefix(RUN_DIR_LINE))


@pytest.mark.parametrize(
    "strategy", ["modular", pytest.param("naive", marks=pytest.mark.slow), pytest.param("frozen", marks=pytest.mark.slow)]
)
def test_the_papers_conditions_keep_their_loss_matrices(strategy, tmp_path):
    run = fit_dir(tmp_path, "--config", f"configs/strategy/{strategy}.yaml")
    got = read_matrix_csv(run / "continual" / "loss_matrix.csv")
    want = read_matrix_csv(REPO / "tests" / "reference" / f"tiny_{strategy}_loss_matrix.csv")
    assert (got.rows, got.tasks) == (want.rows, want.tasks)
    # Equal to the 8 significant digits of the CSV on the development machine; other CPUs' kernels
    # may round differently, hence the tolerance.
    np.testing.assert_allclose(got.values, want.values, atol=1e-6, rtol=0)
