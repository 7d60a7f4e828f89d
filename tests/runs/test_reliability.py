"""Nothing lost: SIGKILL at three points then ``--ckpt_path last`` gives the uninterrupted result
(matrices, adapters and routing statistics);
non-finite losses/gradients are skipped or stop cleanly; bad input is one clear line."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from faults import NaNAt
from kills import KILLS, artefacts, callbacks_with, train
from lightning.pytorch.callbacks import Callback


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, np.ndarray]:
    tmp = tmp_path_factory.mktemp("full")
    proc = train(tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return artefacts(tmp / "tiny" / "version_0")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILLS))
def test_sigkill_then_resume_matches_uninterrupted(point, uninterrupted, tmp_path):
    killed = train(tmp_path, *callbacks_with(KILLS[point]))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = tmp_path / "tiny" / "version_0"
    # Whatever was on disk at the kill is whole: no temp files, and readable CSV / JSON.
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    if (run_dir / "continual" / "summary.json").exists():
        json.loads((run_dir / "continual" / "summary.json").read_text())
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"] > 0

    resumed = train(
        tmp_path,
        *callbacks_with('{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}'),
        "--ckpt_path",
        "last",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = artefacts(run_dir)
    assert got.keys() == uninterrupted.keys()
    for k, v in uninterrupted.items():
        np.testing.assert_allclose(got[k], v, atol=1e-6, rtol=0, err_msg=k)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_counted(where, tmp_path):
    from builders import build

    snaps = {}

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step in (3, 4):
                snaps[trainer.global_step] = [
                    p.detach().clone() for p in pl_module.ever_trainable_parameters()
                ]

    module, dm, trainer = build("modular", tmp_path, callbacks=[NaNAt(3, where), Watch()])
    module.nonfinite = "skip"
    trainer.fit(module, dm)
    assert module.nonfinite_skipped == 1
    for a, b in zip(snaps[3], snaps[4], strict=True):  # the poisoned step changed nothing
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    loss, _ = trainer.callbacks[1].matrices()
    assert np.isfinite(loss).all()


@pytest.mark.e2e
def test_nonfinite_stop_exits_1_with_one_error_line_and_keeps_the_checkpoint(tmp_path):
    """The documented behaviour of model.nonfinite: stop, through train.py: exit status 1, one
    `error:` line naming the step and the fixes, no traceback, the last checkpoint kept."""
    proc = train(
        tmp_path,
        *callbacks_with('{"class_path": "faults.NaNAt", "init_args": {"step": 12, "where": "grad"}}'),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and "non-finite gradient at step 12" in errors[0]
        and "model.nonfinite: skip" in errors[0]
    )
    assert "Traceback" not in proc.stderr
    ckpt = tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True, mmap=True)["global_step"] == 10
