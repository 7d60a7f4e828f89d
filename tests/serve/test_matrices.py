"""``train.py test --run`` on a run with an evaluation-only task: rebuilt from the run directory
(``read_run``, ``RunInfo.datamodule``), its column equals what ``fit`` scored."""

from __future__ import annotations

import numpy as np
import pytest

from crma_lightning.cli.fit import main as fit_main
from crma_lightning.cli.serve import main as serve_main
from crma_lightning.runs.rundir import RunDir
from crma_lightning.serve import read_run


@pytest.mark.e2e
def test_a_run_with_an_evaluation_only_task_is_rebuilt_with_its_column(tmp_path):
    cli = fit_main(
        [
            "fit",
            "--config",
            "configs/tiny.yaml",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--data.tasks",
            '[{"name": "alpha"}, {"name": "beta"}]',
            "--data.eval_tasks",
            '[{"name": "general"}]',
            "--data.train_size",
            "32",
            "--data.holdout_size",
            "8",
            "--data.epochs_per_task",
            "1",
            "--evaluation.schedule",
            "seen",
            "--evaluation.task_id",
            "both",
        ]
    )
    run = RunDir(cli.trainer.log_dir)
    info = read_run(run.path)
    assert info.tasks == ["alpha", "beta"] and info.datamodule().eval_task_names == ["general"]
    names = ("loss_matrix", "accuracy_matrix", "loss_matrix_no_task_id")
    during_fit = {n: run.read_matrix(n, "test") for n in names}
    assert during_fit["loss_matrix"].tasks == ["alpha", "beta", "general"]
    assert during_fit["loss_matrix"].unscored[1].tolist() == [False, True, False]  # seen: beta after alpha

    assert serve_main(["test", "--run", str(run.path), "--task-id", "both"]) in (None, 0)
    for name in names:
        rebuilt = run.read_matrix(name, "test")  # every cell: the rebuild is full
        assert rebuilt.tasks == ["alpha", "beta", "general"] and not rebuilt.unscored.any()
        scored = during_fit[name].scored
        # fit forms a text task's loss from the hidden states (model.fused_loss), the rebuild from
        # the logits: equal to float32 rounding.
        np.testing.assert_allclose(
            rebuilt.values[scored], during_fit[name].values[scored], rtol=1e-6, err_msg=name
        )
    summary = run.read_summary("test")
    assert summary["eval_tasks"] == ["general"] and set(summary["general_drift"]["tasks"]) == {"general"}
    assert set(summary["no_task_id"]["general_drift"]["tasks"]) == {"general"}
