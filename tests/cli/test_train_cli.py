"""End to end: ``python train.py fit`` as a subprocess on the tiny config, for every strategy.

Checks the output contract of a run directory (docs/usage.md, "The run directory"), the FROZEN oracle
(zero drift), NAIVE forgetting, the MODULAR spectral bound, and TensorBoard scalars read back from
the event files. Also: every YAML under configs/ parses, and --help works.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from subproc import REPO, run_dir_of, run_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from crma_lightning.cli.fit import ContinualCLI
from crma_lightning.runs.checkpoint import CRMA_CONFIG, CRMA_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS
from crma_lightning.runs.record import read_record
from crma_lightning.runs.rundir import RUN_DIR_LINE

TASKS = ["alpha", "beta", "gamma"]
# Smaller than configs/tiny.yaml so the three runs fit the default suite's budget.
FAST = ["--data.train_size", "128", "--data.holdout_size", "48", "--model.lr.lora", "0.02"]


def fit(tmp: Path, strategy: str) -> tuple[Path, subprocess.CompletedProcess]:
    proc = run_train(
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--config",
        f"configs/methods/{strategy}.yaml",
        "--trainer.logger.init_args.save_dir",
        str(tmp),
        *FAST,
    )
    run_dir = run_dir_of(proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RUN_DIR_LINE)]
    assert len(lines) == 1 and Path(lines[0].removeprefix(RUN_DIR_LINE)).resolve() == run_dir, proc.stdout[
        -2000:
    ]
    return run_dir, proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    tmp = tmp_path_factory.mktemp("runs")
    return {s: fit(tmp / s, s) for s in ("naive", "frozen", "modular")}


def read_matrix(path: Path) -> tuple[list[str], list[list[float]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["after", *TASKS]
    return [r[0] for r in rows[1:]], [[float(x) for x in r[1:]] for r in rows[1:]]


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", ["naive", "frozen", "modular"])
def test_output_contract(runs, strategy):
    run_dir, proc = runs[strategy]
    for name in ("loss_matrix.csv", "accuracy_matrix.csv"):
        names, values = read_matrix(run_dir / "continual" / name)
        assert names == ["base", *TASKS]
        assert all(len(v) == len(TASKS) for v in values)
    assert (run_dir / "continual" / "loss_matrix.png").stat().st_size > 1000
    summary = json.loads((run_dir / "continual" / "summary.json").read_text())
    for key in (
        "strategy",
        "tasks",
        "seed",
        "base_model",
        "drift_pct",
        "bwt",
        "fwt",
        "forgetting",
        "final_avg_loss",
        "spectral_max_sigma",
        "spectral_max_row_col_err",
    ):
        assert key in summary, key
    assert summary["strategy"] == strategy and summary["tasks"] == TASKS and summary["seed"] == 0
    record = read_record(run_dir)  # run.json: the machine-readable record scripts read
    assert record["status"] == "finished" and record["run_dir"] == str(run_dir) and record["exit_code"] == 0
    assert record["summary"]["validation"] == summary and record["summary"]["test"]["split"] == "test"
    for task in TASKS:
        assert (run_dir / "adapters" / task / PEFT_CONFIG).is_file()
        assert (run_dir / "adapters" / task / PEFT_WEIGHTS).is_file()
    has_crma = (run_dir / "adapters" / "crma" / CRMA_WEIGHTS).is_file()
    assert has_crma == (strategy == "modular")
    if has_crma:
        assert json.loads((run_dir / "adapters" / "crma" / CRMA_CONFIG).read_text())["after_task"] == "gamma"
    # progress bar names the task; the final table is printed
    assert "task 2/3 beta" in proc.stdout + proc.stderr
    assert "validation loss" in proc.stdout and "drift_pct=" in proc.stdout


@pytest.mark.e2e
def test_frozen_is_an_exact_oracle(runs):
    run_dir, _ = runs["frozen"]
    _, loss = read_matrix(run_dir / "continual" / "loss_matrix.csv")
    for i in range(len(TASKS) - 1):
        trained = loss[i + 1][i]
        assert all(abs(loss[j][i] - trained) <= 1e-6 for j in range(i + 1, len(TASKS) + 1))
    summary = json.loads((run_dir / "continual" / "summary.json").read_text())
    assert abs(summary["drift_pct"]) <= 1e-6
    assert summary["spectral_max_sigma"] is None and summary["spectral_max_row_col_err"] is None


@pytest.mark.e2e
def test_naive_forgets_and_modular_stays_bounded(runs):
    naive = json.loads((runs["naive"][0] / "continual" / "summary.json").read_text())
    modular = json.loads((runs["modular"][0] / "continual" / "summary.json").read_text())
    frozen = json.loads((runs["frozen"][0] / "continual" / "summary.json").read_text())
    assert naive["drift_pct"] > 5.0, naive
    assert naive["bwt"] < -0.1
    assert modular["drift_pct"] < naive["drift_pct"] / 5
    assert modular["spectral_max_sigma"] <= 1
    assert modular["spectral_max_row_col_err"] < 1e-3
    # every condition learns its tasks: final average loss well below the base model's
    _, base = read_matrix(runs["frozen"][0] / "continual" / "loss_matrix.csv")
    assert frozen["final_avg_loss"] < sum(base[0]) / len(TASKS) - 0.3


@pytest.mark.e2e
def test_tensorboard_scalars_read_back(runs):
    run_dir, _ = runs["modular"]
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/grad_norm",
        "cl/drift_pct",
        "spectral/max_sigma",
        "spectral/layer_00/row_err",
        *(f"val/{t}/loss" for t in TASKS),
        *(f"val/{t}/accuracy" for t in TASKS),
    ):
        assert tag in tags, (tag, sorted(tags)[:20])
    drift = acc.Scalars("cl/drift_pct")
    summary = json.loads((run_dir / "continual" / "summary.json").read_text())
    assert drift[-1].value == pytest.approx(summary["drift_pct"], rel=1e-5)
    assert [e.step for e in acc.Scalars("val/alpha/loss")] == [0, 1, 2, 3]  # base + after each task
    assert max(e.value for e in acc.Scalars("spectral/max_sigma")) <= 1
    assert "continual/loss_matrix" in acc.Tags()["images"]
    # Per-task gradient-norm statistics (crma_lightning.callbacks.gradnorm) agree with the per-step series.
    steps = [e.value for e in acc.Scalars("train/grad_norm")]
    stats = json.loads((run_dir / "continual" / "grad_norm.json").read_text())
    assert list(stats) == TASKS
    assert sum(s["steps"] for s in stats.values()) == len(steps)
    assert max(s["max"] for s in stats.values()) == pytest.approx(max(steps), rel=1e-6)
    assert sum(s["mean"] * s["steps"] for s in stats.values()) == pytest.approx(sum(steps), rel=1e-5)
    assert acc.Scalars(f"grad_norm/{TASKS[0]}/max")[0].value == pytest.approx(
        stats[TASKS[0]]["max"], rel=1e-6
    )
    # Per group: LoRA and CRMA apart, and the total is the norm of both (crma_lightning.callbacks.gradnorm).
    lora, crma = ([e.value for e in acc.Scalars(f"train/grad_norm/{g}")] for g in ("lora", "crma"))
    assert len(lora) == len(crma) == len(steps) and min(crma) > 0
    for total, lo, cr in zip(steps, lora, crma, strict=True):
        assert total == pytest.approx((lo**2 + cr**2) ** 0.5, rel=1e-5)
    for group, series in (("lora", lora), ("crma", crma)):
        assert max(s[group]["max"] for s in stats.values()) == pytest.approx(max(series), rel=1e-6)
        assert acc.Scalars(f"grad_norm/{TASKS[0]}/{group}/max")[0].value == pytest.approx(
            stats[TASKS[0]][group]["max"], rel=1e-6
        )
    # Without CRMA the LoRA norm is the total, and there is no CRMA group.
    naive = json.loads((runs["naive"][0] / "continual" / "grad_norm.json").read_text())
    assert all(s["lora"]["max"] == s["max"] and "crma" not in s for s in naive.values())


class ParseOnly(ContinualCLI):
    def instantiate_classes(self) -> None:  # parse and validate, build nothing
        pass


#: Override files (a few keys each), parsed on top of a full config below.
OVERRIDES = ("recipe", "methods")
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if not set(OVERRIDES) & set(p.parts))
RECIPE = sorted((REPO / "configs" / "recipe").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
@pytest.mark.parametrize("strategy", ["", "naive", "frozen", "modular"])
def test_every_config_parses(config, strategy):
    args = ["--config", str(config)]
    if strategy:
        args += ["--config", str(REPO / "configs" / "methods" / f"{strategy}.yaml")]
    cli = ParseOnly(args=args, run=False)
    assert cli.config.model.task_names == [
        t.init_args.name if "init_args" in t else t.name for t in cli.config.data.tasks
    ]
    if strategy:
        assert cli.config.model.strategy == strategy
    assert cli.config.trainer.max_epochs == len(cli.config.data.tasks) * cli.config.data.epochs_per_task


@pytest.mark.parametrize("override", RECIPE, ids=[p.name for p in RECIPE])
@pytest.mark.parametrize("config", ["tiny.yaml", "smollm2.yaml"])
def test_recipe_overrides_parse_on_the_full_configs(config, override):
    cli = ParseOnly(args=["--config", str(REPO / "configs" / config), "--config", str(override)], run=False)
    c = cli.config
    assert {
        "zclip.yaml": c.zclip.enabled and c.trainer.gradient_clip_val is None,
        "pissa.yaml": c.model.crma.init == "pissa",
        "nf4.yaml": c.model.backbone.quantize == "nf4",
    }[override.name]


@pytest.mark.e2e
def test_help_and_print_config():
    proc = run_train("fit", "--help", timeout=180)
    assert proc.returncode == 0 and "--model.strategy" in proc.stdout and "--data.tasks" in proc.stdout
    proc = run_train("fit", "--config", "configs/tiny.yaml", "--print_config", timeout=180)
    assert proc.returncode == 0 and "  strategy: modular" in proc.stdout and "name: beta" in proc.stdout
    assert "seed_everything: 0" in proc.stdout


@pytest.mark.e2e
def test_bad_config_is_one_clear_line(tmp_path):
    proc = run_train(
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--model.crma.streams",
        "1",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        timeout=180,
    )
    assert proc.returncode == 2
    assert "model.crma.streams must be >= 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the record says so too, for scripts; no run directory was left behind
    assert (
        proc.record["status"] == "failed" and proc.record["exit_code"] == 2 and proc.record["run_dir"] is None
    )
    assert "model.crma.streams must be >= 2" in proc.record["error"]


@pytest.mark.e2e
def test_ckpt_path_last_resumes_in_place_and_matches_the_uninterrupted_run(runs, tmp_path):
    save = ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    base = ["fit", "--config", "configs/tiny.yaml", *save, *FAST]
    cut = run_train(
        *base, "--trainer.max_steps", "45"
    )  # mid-task 3 (16 steps per task); last.ckpt at step 40
    assert cut.returncode == 0, cut.stderr[-3000:]
    resumed = run_train(*base, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_dir = tmp_path / "tiny" / "version_0"
    assert f"run dir: {run_dir}" in resumed.stdout
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["version_0"]  # no second run dir
    full_dir, _ = runs["modular"]
    for name in ("loss_matrix.csv", "accuracy_matrix.csv"):
        assert (run_dir / "continual" / name).read_text() == (full_dir / "continual" / name).read_text()


@pytest.mark.e2e
def test_validate_subcommand_evaluates_every_task(runs, tmp_path):
    run_dir, _ = runs["frozen"]
    proc = run_train(
        "validate",
        "--config",
        "configs/tiny.yaml",
        "--config",
        "configs/methods/frozen.yaml",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        *FAST,
        "--ckpt_path",
        str(run_dir / "checkpoints" / "last.ckpt"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # last.ckpt is at step 40 of 48: alpha and beta are finished, frozen LoRAs, so their
    # holdout losses equal the final matrix's to float precision.
    _, loss = read_matrix(run_dir / "continual" / "loss_matrix.csv")
    for task, expected in zip(TASKS[:2], loss[-1][:2], strict=True):
        line = next(line for line in proc.stdout.splitlines() if f"val/{task}/loss" in line)
        assert float(line.split("│")[2].strip().rstrip("…")[:7]) == pytest.approx(expected, abs=1e-4)
