"""The run directory's matrix files: an unscored cell is written and read back apart from NaN."""

from __future__ import annotations

import math

import numpy as np

from crma_lightning.evaluation.report import table
from crma_lightning.runs.rundir import UNSCORED, RunDir, matrix_csv


def test_unscored_cells_are_empty_fields_and_read_back_as_missing(tmp_path):
    rows = {"base": [1.5, float("nan")], "a": [0.25, None]}
    text = matrix_csv(rows, ["a", "b"])
    assert text.splitlines() == ["after,a,b", "base,1.5,nan", f"a,0.25,{UNSCORED}"] and UNSCORED == ""
    run = RunDir(tmp_path)
    run.write_matrices(["a", "b"], {"loss_matrix": rows}, {"tasks": ["a", "b"]})
    m = run.read_matrix("loss_matrix")
    assert m.unscored.tolist() == [[False, False], [False, True]] and m.scored[1].tolist() == [True, False]
    assert np.isnan(m.values[0, 1]) and np.isnan(m.values[1, 1])  # both NaN as numbers; the mask tells
    cells = m.cells()
    assert cells["a"] == [0.25, None] and math.isnan(cells["base"][1])
    assert matrix_csv(cells, ["a", "b"]) == text  # round trip
    shown = table(rows, ["a", "b"], "t").splitlines()
    assert shown[-1].split() == ["a", "|", "0.2500", "-"] and shown[-2].split()[-1] == "nan"
