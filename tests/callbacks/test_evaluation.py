"""The evaluation callback's schedules, reuse of unchanged cells and evaluation-only tasks, on a
tiny synthetic fit (tests/builders.py: three tasks, one epoch each, a real Trainer)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from builders import TASKS, build
from crma_lightning.callbacks.evaluation import ContinualEvaluation
from crma_lightning.callbacks.routing import RoutingStatistics
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from crma_lightning.core.errors import ConfigError
from crma_lightning.evaluation import metrics
from crma_lightning.evaluation.task_metrics import prompt_lengths
from crma_lightning.routing.router import DEFAULT_SHRINKAGE, StatsRouter
from crma_lightning.runs.rundir import RunDir


def fit(tmp_path, strategy="frozen", eval_tasks=(), logger=False, **evaluation):
    ev = ContinualEvaluation(print_table=False, **evaluation)
    if logger:
        logger = TensorBoardLogger(tmp_path / "runs", name="tiny")
    module, dm, trainer = build(
        strategy, tmp_path, evaluation=ev, epochs_per_task=1, eval_tasks=eval_tasks, logger=logger
    )
    trainer.fit(module, datamodule=dm)
    return ev, trainer, module


@pytest.fixture(scope="module")
def modular_full(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("full"), "modular")


@pytest.mark.parametrize("schedule", ["seen", "minimal"])
def test_a_schedule_scores_its_cells_as_full_does_and_leaves_the_rest_unscored(
    schedule, modular_full, tmp_path
):
    full, *_ = modular_full
    ev, trainer, module = fit(tmp_path, "modular", schedule=schedule, logger=True)
    # Which cells each row scores (rows: base, after a, b, c; columns a, b, c). The base row is
    # always scored whole; MODULAR reuses nothing (CRMA trains in every task).
    expected = {
        "seen": [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]],
        "minimal": [[1, 1, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]],
    }[schedule]
    for split in ("validation", "test"):
        for metric, rows in ev.rows[split].items():
            scored = [[v is not None for v in row] for row in rows.values()]
            assert scored == [[bool(x) for x in r] for r in expected], (split, metric)
            # What is scored equals the full schedule's cell (the same seeded fit).
            for name, row in rows.items():
                for v, w in zip(row, full.rows[split][metric][name], strict=True):
                    assert v is None or v == w or (np.isnan(v) and np.isnan(w)), (split, metric, name)
    assert ev.reused_cells == 0

    # The CSVs: an unscored cell is an empty field, read back as missing (NaN, marked unscored).
    run = RunDir(trainer.log_dir)
    text = run.matrix_file("loss_matrix").read_text().splitlines()
    assert text[2].split(",")[1:] == [
        "" if not s else f for s, f in zip(expected[1], text[2].split(",")[1:], strict=True)
    ]
    assert "" in text[2].split(",")[1:]
    m = run.read_matrix("loss_matrix", "test")
    assert (m.unscored == ~np.array(expected, dtype=bool)).all() and np.isnan(m.values[m.unscored]).all()
    for read, kept in zip(m.cells().values(), ev.rows["test"]["loss"].values(), strict=True):
        assert read == [None if v is None else pytest.approx(v, rel=1e-7) for v in kept]  # %.8g

    # Each metric from the cells it needs: FWT needs the superdiagonal (not scored under seen).
    summary = run.read_summary()
    assert summary["schedule"] == schedule
    fs = full.summary(trainer, module)
    for key in ("drift_pct", "bwt", "final_avg_loss", "final_avg_accuracy"):
        assert summary[key] == pytest.approx(fs[key], abs=0), key
    # Each example's loss sum and tokens in the final row (paired intervals on the loss): pooled, the
    # final row's loss, whichever head path scored them.
    final = list(ev.rows["validation"]["loss"].values())[-1]
    for i, t in enumerate(TASKS):
        pooled = np.asarray(summary["final_losses"]["task_id"][t]).sum(0)
        assert pooled[0] / pooled[1] == pytest.approx(final[i], rel=1e-6)
    if schedule == "seen":
        assert summary["fwt"] is None
    else:
        assert summary["fwt"] == pytest.approx(fs["fwt"], abs=0)
    acc = metrics.as_masked(list(ev.rows["validation"]["accuracy"].values()))
    best = [max(acc[k, i] for k in range(1, 3) if not acc.mask[k, i]) for i in range(2)]
    assert summary["forgetting"] == pytest.approx(np.mean([best[i] - acc[3, i] for i in range(2)]))
    # Tables and TensorBoard skip unscored cells; figures are drawn.
    assert " - " in ev.render(trainer, module) or "-\n" in ev.render(trainer, module)
    assert run.figure_file("loss_matrix").is_file()


def test_the_schedule_is_checked():
    with pytest.raises(ConfigError, match=r"evaluation.schedule: must be 'full', 'seen' or 'minimal'"):
        ContinualEvaluation(schedule="lower")


def test_reused_cells_equal_recomputed_ones_bit_for_bit(tmp_path):
    """FROZEN: every other task's LoRA is unchanged by a task, so its cells are copied; scoring
    them again (reuse off) gives exactly the same matrices."""
    (tmp_path / "on").mkdir(), (tmp_path / "off").mkdir()
    on, trainer, module = fit(tmp_path / "on", "frozen")
    off, *_ = fit(tmp_path / "off", "frozen", reuse=False)
    assert json.dumps(on.rows) == json.dumps(off.rows)  # bit for bit (repr of every float)
    # After each task the two other tasks' cells, on validation and test.
    assert on.reused_cells == 2 * 2 * len(TASKS) and off.reused_cells == 0
    summary = on.summary(trainer, module)
    assert summary["evaluation_reused_cells"] == 12 and summary["evaluation_s"] > 0


@pytest.mark.parametrize("strategy", ["modular", "naive"])
def test_layouts_whose_serving_tensors_train_every_task_reuse_nothing(strategy, modular_full, tmp_path):
    ev = modular_full[0] if strategy == "modular" else fit(tmp_path, strategy)[0]
    assert ev.reused_cells == 0


def test_an_evaluation_only_task_is_scored_every_row_and_served_by_the_base(tmp_path):
    (tmp_path / "frozen").mkdir(), (tmp_path / "modular").mkdir()
    ev, trainer, module = fit(tmp_path / "frozen", "frozen", eval_tasks=("g",), logger=True, schedule="seen")
    assert trainer.datamodule.task_names == list(TASKS)  # never trained, not in the task clock
    run = RunDir(trainer.log_dir)
    for split in ("validation", "test"):
        loss = run.read_matrix("loss_matrix", split)
        assert loss.tasks == [*TASKS, "g"] and not loss.unscored[:, -1].any()  # every row, any schedule
        # FROZEN serves it with the base alone (no LoRA of its own), and the base is frozen.
        for metric in ("loss", "accuracy"):
            column = [row[-1] for row in ev.rows[split][metric].values()]
            assert column == [column[0]] * 4, (split, metric)
        drift = run.read_summary(split)["general_drift"]
        assert drift["tasks"]["g"]["loss_pct"] == 0 and drift["mean_metric_drop"] == 0
    summary = run.read_summary()
    assert summary["eval_tasks"] == ["g"] and summary["tasks"] == list(TASKS)
    assert summary["tasks_completed"] == len(TASKS) and "g" in summary["task_metric"]
    events = EventAccumulator(str(run.path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "val/g/loss",
        "test/g/accuracy",
        "cl/general_drift/mean_loss_pct",
        "cl/general_drift/g/loss_pct",
    } <= tags
    assert [e.step for e in events.Scalars("val/g/loss")] == [0, 1, 2, 3]

    # MODULAR: the base plus CRMA, which trains in every task: the column moves.
    ev, trainer, _ = fit(tmp_path / "modular", "modular", eval_tasks=("g",))
    column = [row[-1] for row in ev.rows["validation"]["loss"].values()]
    assert all(v != column[0] for v in column[1:])
    drift = RunDir(trainer.log_dir).read_summary()["general_drift"]["tasks"]["g"]
    assert drift["loss_pct"] == pytest.approx(100 * (column[-1] - column[0]) / column[0])


def test_routing_features_are_computed_once_per_batch_and_route_as_fresh_ones(tmp_path):
    """The statistics router's frozen-base features of an evaluation batch are cached across rows;
    routing with them picks what features computed afresh pick."""
    routing = RoutingStatistics()
    ev = ContinualEvaluation(print_table=False, task_id="both")
    module, dm, trainer = build("frozen", tmp_path, evaluation=ev, routing=routing, epochs_per_task=1)
    trainer.fit(module, datamodule=dm)
    batches = {(s, t): dm.holdout_batches(t, split=s) for s in ("validation", "test") for t in TASKS}
    # At most one entry per evaluation batch (batches with the same prompts share one), not one
    # per row and batch.
    assert 0 < len(ev._route_features) <= sum(len(b) for b in batches.values())
    sums, meta = routing.task_stats(trainer, list(TASKS))
    router = StatsRouter(list(TASKS), dict(zip(TASKS, sums, strict=True)), meta, DEFAULT_SHRINKAGE)
    cached = router.route(module.model, module.crma, dm.pad_token_id, cache=ev._route_features)
    fresh = router.route(module.model, module.crma, dm.pad_token_id)
    for task_batches in batches.values():
        for b in task_batches:
            n = prompt_lengths(b["labels"], b["attention_mask"], 16).tolist()
            prompts = [row[:k] for row, k in zip(b["input_ids"].tolist(), n, strict=True)]
            before = len(ev._route_features)
            assert cached(prompts).tolist() == fresh(prompts).tolist()
            assert len(ev._route_features) == before  # a hit: no forward pass
    loss = ev.rows["validation_no_task_id"]["routing_accuracy"]
    assert all(v == v for v in loss[TASKS[-1]])  # every task routed in the last row
