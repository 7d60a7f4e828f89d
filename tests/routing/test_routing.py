"""Routing statistics: the maths on hand-computed cases, and the callback in a real Trainer (per task,
unchanged by later tasks, equal to a direct computation, the same after a crash and a resume).

Serving with them (the routers, confidence, threshold and fallback, building them afterwards) is
tested on a trained run in ``test_inference.py``; 1 vs 2 ranks in ``test_distributed.py``.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from builders import TASKS, build
from crma_lightning.callbacks.boundary import TaskBoundaryCallback
from crma_lightning.callbacks.evaluation import ContinualEvaluation
from crma_lightning.callbacks.routing import RoutingStatistics
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import load_file

from crma_lightning.backbone.loading import load_backbone
from crma_lightning.core.errors import ConfigError
from crma_lightning.routing import routers as routing
from crma_lightning.routing.stats import read_task_stats, resolve_layer
from crma_lightning.runs.rundir import RunDir


# -- the maths, by hand ------------------------------------------------------------------------
def test_prefix_lengths_are_powers_of_two_from_four_and_the_whole():
    assert routing.prefix_lengths(64) == [4, 8, 16, 32, 64]
    assert routing.prefix_lengths(9) == [4, 8, 9]
    assert routing.prefix_lengths(4) == [4]
    assert routing.prefix_lengths(3) == [3]


def test_prefix_pool_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]])  # (1, 4, 2)
    lengths = torch.tensor([[2, 4, 0]])
    mean = routing.prefix_pool(hidden, lengths, "mean")
    last = routing.prefix_pool(hidden, lengths, "last")
    assert mean.dtype == torch.float64
    assert mean.tolist() == [[[2.0, 3.0], [4.0, 5.0], [0.0, 0.0]]]
    assert last.tolist() == [[[3.0, 4.0], [7.0, 8.0], [0.0, 0.0]]]


def test_feature_sums_by_hand_and_they_add_up():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    s = routing.feature_sums(x, torch.tensor([1.0, 1.0, 2.0]))
    assert float(s.count) == 4.0
    assert s.total.tolist() == [3.0, 4.0]
    assert s.outer.tolist() == [[3.0, 2.0], [2.0, 6.0]]  # 1*[1,0][1,0]^T + [0,2][0,2]^T + 2*[1,1][1,1]^T
    assert s.mean.tolist() == [0.75, 1.0]
    parts = routing.feature_sums(x[:1]) + routing.feature_sums(x[1:], torch.tensor([1.0, 2.0]))
    assert torch.equal(parts.outer, s.outer) and torch.equal(parts.total, s.total)
    back = routing.FeatureSums.from_flat(s.flat(), 2)
    assert torch.equal(back.outer, s.outer) and float(back.count) == 4.0


def test_pooled_covariance_and_shrinkage_by_hand():
    a = routing.feature_sums(torch.tensor([[0.0, 0.0], [2.0, 2.0]]))  # mean [1, 1], scatter [[2, 2], [2, 2]]
    b = routing.feature_sums(torch.tensor([[0.0, 1.0], [0.0, 3.0]]))  # mean [0, 2], scatter [[0, 0], [0, 2]]
    cov = routing.pooled_covariance([a, b])  # ([[2, 2], [2, 4]]) / (4 - 2)
    assert cov.tolist() == [[1.0, 1.0], [1.0, 2.0]]
    assert routing.shrink(cov, 0.5).tolist() == [[1.0, 0.5], [0.5, 2.0]]
    assert routing.shrink(cov, 1.0).tolist() == [[1.0, 0.0], [0.0, 2.0]]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        routing.shrink(cov, 1.5)


def test_lda_in_one_dimension_by_hand():
    # Task a: features -1, 1 (mean 0); task b: 1, 3 (mean 2). Pooled variance (2 + 2) / (4 - 2) = 2:
    # g_a(x) = 0, g_b(x) = x - 1, so p(b | x) = sigmoid(x - 1).
    lda = routing.fit_lda(
        [
            routing.feature_sums(torch.tensor([[-1.0], [1.0]])),
            routing.feature_sums(torch.tensor([[1.0], [3.0]])),
        ],
        shrinkage=0.3,
    )
    assert lda.weight.flatten().tolist() == pytest.approx([0.0, 1.0], abs=1e-8)
    assert lda.bias.tolist() == pytest.approx([0.0, -1.0], abs=1e-8)
    choice, confidence = routing.decide(lda.scores(torch.tensor([[1.0], [0.0], [3.0]])))
    assert choice.tolist()[1:] == [0, 1]
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert confidence.tolist() == pytest.approx([0.5, sigmoid(1.0), sigmoid(2.0)], abs=1e-8)


def test_lda_is_the_nearest_mean_in_the_shared_mahalanobis_metric():
    g = torch.Generator().manual_seed(0)
    sums = [routing.feature_sums(torch.randn(20, 5, generator=g) + 2 * k) for k in range(3)]
    lda = routing.fit_lda(sums, shrinkage=0.2)
    x = torch.randn(50, 5, generator=g, dtype=torch.float64) + 2
    cov = routing.shrink(routing.pooled_covariance(sums), 0.2)
    diff = x[:, None, :] - torch.stack([s.mean for s in sums])[None]  # (N, K, D)
    d2 = torch.einsum("nkd,de,nke->nk", diff, torch.linalg.inv(cov), diff)
    # The two differ by the task-independent -x^T C^-1 x / 2: same decisions, same posteriors.
    torch.testing.assert_close(
        routing.posterior(lda.scores(x)), routing.posterior(-d2 / 2), atol=1e-7, rtol=0
    )


def test_the_loss_routers_confidence_is_bayes_over_the_adapters():
    # Mean losses 1 and 2 over 2 predicted tokens: log-likelihoods -2 and -4, p = sigmoid(2).
    scores = routing.loss_scores(
        torch.tensor([[1.0, 2.0], [float("nan"), float("nan")]]), torch.tensor([2, 0])
    )
    choice, confidence = routing.decide(scores)
    assert choice[0] == 0 and confidence[0] == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert math.isnan(confidence[1])  # a 1-token prompt has no loss: no decision


def test_layer_numbers():
    assert [resolve_layer(None, n) for n in (1, 2, 30, 32)] == [1, 1, 10, 11]
    assert resolve_layer(-1, 30) == 30 and resolve_layer(5, 30) == 5
    with pytest.raises(ConfigError, match="routing.layer 31 is outside"):
        resolve_layer(31, 30)
    with pytest.raises(ConfigError, match="counts decoder layers from 1"):
        RoutingStatistics(layer=0)


# -- the callback in a real Trainer ----------------------------------------------------------
def digests(run: RunDir) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(run.routing.glob("*"))}


class DigestsAtTaskEnd(TaskBoundaryCallback):
    """Records the routing files' SHA-256 at every task end (after the routing callback ran)."""

    def __init__(self):
        super().__init__()
        self.at: dict[str, dict[str, str]] = {}

    def on_task_end(self, trainer, pl_module, task_index):
        self.at[trainer.datamodule.task_names[task_index]] = digests(RunDir(trainer.default_root_dir))


class CrashAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


MAX_EXAMPLES = 48


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted MODULAR run (3 tasks, 8 steps each) with the routing statistics callback."""
    tmp = tmp_path_factory.mktemp("routing_ref")
    seen = DigestsAtTaskEnd()
    module, dm, trainer = build(
        "modular", tmp, callbacks=[RoutingStatistics(max_examples=MAX_EXAMPLES), seen]
    )
    trainer.fit(module, dm)
    return RunDir(tmp), seen, module, dm


def test_statistics_are_per_task_and_unchanged_by_later_tasks(reference):
    run, seen, module, dm = reference
    files = [f"{t}.{ext}" for t in TASKS for ext in ("json", "safetensors")]
    assert sorted(digests(run)) == sorted(files)
    final = digests(run)
    for k, task in enumerate(TASKS):
        mine = [f"{task}.json", f"{task}.safetensors"]
        assert sorted(seen.at[task]) == sorted(
            f"{t}.{e}" for t in TASKS[: k + 1] for e in ("json", "safetensors")
        )
        for later in TASKS[k:]:  # written at its own task end, never again
            assert {f: seen.at[later][f] for f in mine} == {f: final[f] for f in mine}, (task, later)
    sums = {t: read_task_stats(run, t)[0] for t in TASKS}
    assert not torch.equal(sums["a"].total, sums["b"].total)
    meta = read_task_stats(run, "b")[1]
    assert meta["layer"] == 1 and meta["examples"] == MAX_EXAMPLES and meta["features"] == 3 * MAX_EXAMPLES


def test_statistics_equal_a_direct_computation_on_the_base_model(reference):
    """Task b's file equals its first 48 training examples through a freshly loaded base model
    (hidden_states[1]: after decoder layer 1), every prefix 4, 8, 16 pooled by hand."""
    run, _, module, dm = reference
    base = load_backbone(module.backbone_config).eval()
    data = dm._train["b"].select(range(MAX_EXAMPLES))
    feats = []
    with torch.no_grad():
        for ids in data["input_ids"]:
            h = base(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0].double()  # (T, D)
            assert len(ids) == 16
            feats += [h[:n].mean(0) for n in (4, 8, 16)]
    x = torch.stack(feats)
    got = read_task_stats(run, "b")[0]
    assert float(got.count) == len(feats)
    torch.testing.assert_close(got.total, x.sum(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.outer, x.T @ x, rtol=1e-9, atol=1e-9)


def test_statistics_survive_a_crash_and_a_resume(reference, tmp_path):
    """A crash at step 10 (task b; task a's statistics already written) after the last checkpoint
    at step 6 (inside task a), then a resume from it: every file equals the uninterrupted run's."""
    run, *_ = reference
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=6)
    module, dm, trainer = build(
        "modular", tmp_path, callbacks=[RoutingStatistics(max_examples=MAX_EXAMPLES), ckpt, CrashAt(10)]
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(module, dm)
    crashed = RunDir(tmp_path)
    assert digests(crashed) == {f: digests(run)[f] for f in ("a.json", "a.safetensors")}
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 6

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True, save_top_k=0, every_n_train_steps=6)
    module, dm, trainer = build(
        "modular", tmp_path, callbacks=[RoutingStatistics(max_examples=MAX_EXAMPLES), ckpt]
    )
    trainer.fit(module, dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for task in TASKS:  # exactly: the base model's features do not depend on the crash
        want, got = load_file(run.routing_stats(task)), load_file(crashed.routing_stats(task))
        assert sorted(got) == sorted(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert digests(crashed) == digests(run)  # byte for byte: each json records its safetensors' SHA-256


def test_evaluation_without_the_task_id_routes_with_statistics_read_back_after_a_resume(tmp_path):
    """With ``task_id: both`` the rows after b and c route among the tasks so far by their
    statistics: kept in memory when gathered by this process, read from the run's files for a task
    finished before a resume. A crash in task b, resumed from a checkpoint taken after task a ended,
    gives the uninterrupted run's matrices without the task id."""

    def fit(root, callbacks=(), ckpt_path=None):
        evaluation = ContinualEvaluation(print_table=False, test_matrices=False, task_id="both")
        module, dm, trainer = build(
            "modular",
            root,
            epochs_per_task=1,
            evaluation=evaluation,
            routing=RoutingStatistics(max_examples=MAX_EXAMPLES),
            callbacks=callbacks,
        )
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        return evaluation.rows["validation_no_task_id"]

    whole = fit(tmp_path / "whole")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "crashed", [ckpt, CrashAt(7)])  # 4 steps a task: the checkpoint is inside task b
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 5
    resumed = fit(tmp_path / "crashed", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert list(resumed["loss"]) == ["base", *TASKS]
    for metric in ("loss", "token_accuracy", "routing_accuracy"):
        for row in TASKS[1:]:  # routed among 2 and 3 tasks
            np.testing.assert_allclose(
                resumed[metric][row], whole[metric][row], atol=1e-6, err_msg=f"{metric} {row}"
            )
    assert not np.isnan(whole["routing_accuracy"]["c"]).any()
