"""benchmarks/run.py and harness.py never mix old runs into a new report silently, and never fit a
finished run again: a run's record is reused (an interrupted run resumed) only when it was fitted with
the same arguments and ``--config`` files' contents, and every report names the commit it was written
at and the commits its runs were fitted at.

One real ``train.py fit`` of configs/tiny.yaml (a copy, to edit), through ``benchmarks/run.py`` and a
reproduction experiment file in this process, then reruns that must refuse it or read its record.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml
from subproc import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import harness  # noqa: E402

from crma_lightning.runs.record import RecordedRun  # noqa: E402
from crma_lightning.runs.rundir import RunDir, init_args  # noqa: E402

SIZES = ["--data.train_size", "32", "--data.holdout_size", "16", "--data.epochs_per_task", "1"]


@pytest.fixture
def script_env(monkeypatch):
    """Offline fits; the signal handlers ``harness.run_all`` installs are put back afterwards."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def git(*args: str, cwd=REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_code_commit_marks_uncommitted_changes_to_tracked_files(tmp_path):
    assert harness.code_commit(tmp_path) == "unknown"  # not a repository
    git("init", "-q", cwd=tmp_path)
    (tmp_path / "a.txt").write_text("a\n")
    git("add", "a.txt", cwd=tmp_path)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a", cwd=tmp_path)
    head = git("rev-parse", "HEAD", cwd=tmp_path)
    (tmp_path / "untracked.txt").write_text("b\n")
    assert harness.code_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("changed\n")
    assert harness.code_commit(tmp_path) == f"{head}-dirty"


def test_a_finished_run_is_read_from_its_record_and_never_fitted_again(tmp_path, capsys, script_env):
    import run

    config, runs, out = tmp_path / "tiny.yaml", tmp_path / "runs", tmp_path / "repro.md"
    records = tmp_path / "records"
    shutil.copy(REPO / "configs/tiny.yaml", config)
    exp = {
        "kind": "reproduction",
        "config": str(config),
        "methods": ["naive"],
        "seeds": [0],
        "runs_dir": str(runs),
        "records": str(records),
        "out": str(out.with_suffix(".json")),
    }
    path = tmp_path / "repro.yaml"

    def repro(*fit: str) -> None:
        path.write_text(yaml.safe_dump({**exp, "fit_args": [*SIZES, *fit]}))
        run.main([str(path), "--threads", "1"])

    def refused(*fit: str) -> str:
        with pytest.raises(SystemExit) as e:
            repro(*fit)
        msg = str(e.value.code)
        assert "\n" not in msg, msg  # one line
        return msg

    repro()  # the one fit
    record = json.loads((records / "naive_s0.json").read_text())
    head = git("rev-parse", "HEAD")
    # the record: what the run was fitted with, at which commit, how long each phase took, its results
    assert record["fit"]["args"] == run.fit_args(
        {**exp, "config": [str(config)], "fit_args": SIZES}, "naive", 0
    )
    (commit,) = record["commits"]
    assert commit.removesuffix("-dirty") == head
    assert record["wall_s"]["total"] > record["wall_s"]["evaluation"] > 0
    assert {"loss_matrix", "accuracy_matrix"} <= set(record["splits"]["test"]["matrices"])
    # it reads back as the run directory does: every matrix (NaN: does not apply), summary, config
    rec, rd = RecordedRun.load(records / "naive_s0.json"), RunDir(next((runs / "naive_s0").glob("version_*")))
    for split in ("validation", "test"):
        files = sorted(rd.results_of(split).glob("*_matrix*.csv"))
        assert len(files) >= 2 and rec.read_summary(split) == json.loads(rd.summary_of(split).read_text())
        for f in files:
            want, got = rd.read_matrix(f.stem, split), rec.read_matrix(f.stem, split)
            assert (got.rows, got.tasks) == (want.rows, want.tasks)
            np.testing.assert_array_equal(got.values, want.values)
            np.testing.assert_array_equal(got.unscored, want.unscored)
    assert rec.read_config() == rd.read_config() and rec.read_grad_norm() == rd.read_grad_norm()
    # the run directory can go (a new machine): the report is rebuilt from the record alone
    shutil.rmtree(runs)
    capsys.readouterr()
    repro()
    assert "[naive_s0] recorded:" in capsys.readouterr().out and not runs.exists()
    res = json.loads(out.with_suffix(".json").read_text())
    loss = np.array(record["splits"]["test"]["matrices"]["loss_matrix"]["values"])
    assert res["results"]["final_loss"]["naive"]["per_seed"] == [loss[-1].tolist()]
    # the report names the commit it was written at and the one its run was fitted at
    assert res["code"]["commit"].removesuffix("-dirty") == head
    assert res["code"]["run_commits"] == {commit: ["naive_s0"]}
    last = out.read_text().splitlines()[-1]
    assert (
        last == f"Code: written at commit `{res['code']['commit']}`; its 1 run(s) were fitted at `{commit}`."
    )
    # other arguments after --, or the config file's contents edited: refused, nothing fitted
    rel = harness.repo_relative(records / "naive_s0.json")
    assert refused("--data.batch_size", "8") == (
        f"[naive_s0] {rel} was fitted with other arguments (arguments were `(none)`, now "
        "`--data.batch_size 8`): delete the record to fit it again, or give the experiment another "
        "`records` folder"
    )
    config.write_text(config.read_text().replace("lora: 0.01", "lora: 0.02"))
    assert refused().startswith(f"[naive_s0] {rel} was fitted with other arguments ({config} edited)")
    assert not runs.exists()
    # an interrupted run directory made with other arguments is not resumed either
    (records / "naive_s0.json").unlink()
    (runs / "naive_s0" / "version_0" / "checkpoints").mkdir(parents=True)
    (runs / "naive_s0" / "version_0" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert refused() == (
        f"[naive_s0] {runs / 'naive_s0'} holds a run with no fit_args.json: use another runs_dir or delete it"
    )


@pytest.mark.slow  # six tiny fits, ~2.5 min on 2 cores
def test_a_crma_rate_grid_is_chosen_on_validation_and_other_experiments_take_the_choice(tmp_path, script_env):
    """A reproduction's ``grid: {modular: [...]}`` fits every CRMA rate at the first seed, keeps the
    one with the largest MODULAR-vs-FROZEN advantage on validation, and fits the other seeds at it; an
    experiment with ``knobs_from`` fits at that rate, and refuses to start before it is chosen."""
    import run

    from crma_lightning.evaluation import metrics as clm

    config = tmp_path / "tiny.yaml"
    shutil.copy(REPO / "configs/tiny.yaml", config)

    def experiment(name: str, **kw) -> str:
        exp = {
            "kind": "reproduction",
            "config": str(config),
            "methods": ["frozen", "modular"],
            "seeds": [0, 1],
            "fit_args": SIZES,
            "runs_dir": str(tmp_path / "runs" / name),
            "records": str(tmp_path / "records" / name),
            "out": str(tmp_path / f"{name}.json"),
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**exp, **kw}))
        return str(path)

    grid = experiment("grid", grid={"modular": [0.1, 1.0]})
    smaller = experiment(
        "smaller",
        methods=["modular"],
        seeds=[0],
        knobs_from=grid,
        fit_args=[*SIZES, "--data.train_size", "16"],
    )
    with pytest.raises(SystemExit, match=r"takes its knobs from .*grid.yaml: .*not fitted yet"):
        run.main([smaller, "--threads", "1"])
    assert not (tmp_path / "runs" / "smaller").exists()

    run.main([grid, "--threads", "1"])
    records = tmp_path / "records" / "grid"
    rec = {p.stem: RecordedRun.load(p) for p in records.glob("*.json")}
    val = {k: r.read_matrix(split="validation").values for k, r in rec.items()}
    adv = {
        v: clm.modular_vs_frozen_pct(val["frozen_s0"], val[f"modular_crma_lr={v:g}_s0"]) for v in (0.1, 1.0)
    }
    chosen = max(adv, key=adv.get)
    assert set(rec) == {"frozen_s0", "modular_crma_lr=0.1_s0", "modular_crma_lr=1_s0", "frozen_s1"} | {
        f"modular_crma_lr={chosen:g}_s1"
    }
    # the rate is CRMA's read/write rate as a multiple of the LoRA rate (0.01), mixing and gate 10x it
    lr = init_args(rec["modular_crma_lr=1_s0"].read_config()["model"])["lr"]
    assert (lr["crma_proj"], lr["crma_mix"], lr["crma_gate"]) == (0.01, 0.1, 0.1)
    res = json.loads((tmp_path / "grid.json").read_text())["results"]
    assert res["grid"]["modular"] == {
        "seed": 0,
        "validation_vs_frozen": {str(v): a for v, a in adv.items()},
        "chosen": chosen,
    }
    assert res["knobs"] == {"modular": chosen} and res["seeds"] == [0, 1]
    assert res["steps_per_task"] == rec["frozen_s0"].read_grad_norm()["alpha"]["steps"] > 0
    # the test numbers are the kept rate's runs
    test = [rec[f"modular_crma_lr={chosen:g}_s{s}"].read_matrix(split="test").values for s in (0, 1)]
    assert res["final_loss"]["modular"]["per_seed"] == [t[-1].tolist() for t in test]

    # BWT on the loss (FROZEN's earlier tasks are served as trained: 0), and MODULAR vs FROZEN with
    # its paired interval over seeds and examples, from the examples' own losses
    assert res["bwt"]["frozen"]["per_seed"] == [0.0, 0.0]
    point, lo, hi = res["modular_vs_frozen"]["interval"]
    assert lo < point < hi and point == pytest.approx(res["modular_vs_frozen"]["mean"], rel=1e-5)

    run.main([smaller, "--threads", "1"])
    (taken,) = (tmp_path / "records" / "smaller").glob("*.json")
    assert taken.stem == f"modular_crma_lr={chosen:g}_s0"

    # growth: each size's record as a point against its steps per task (nothing fitted again), the
    # committed toy reproduction (64-token blocks, batch 4: 16 steps) among them
    growth = tmp_path / "growth.yaml"
    sizes, reference = (
        {"32": grid, "16": smaller},
        {"toy": str(REPO / "benchmarks/results/reproduction.json")},
    )
    exp = {"kind": "growth", "sizes": sizes, "reference": reference, "out": str(tmp_path / "growth.json")}
    growth.write_text(yaml.safe_dump(exp))
    run.main([str(growth), "--threads", "1"])
    points = {p["label"]: p for p in json.loads((tmp_path / "growth.json").read_text())["sizes"]}
    toy = json.loads((REPO / "benchmarks/results/reproduction.json").read_text())["results"]
    assert points["toy"]["reference"] and not points["32"]["reference"]
    assert (
        points["toy"]["steps_per_task"] == 16
        and points["toy"]["naive_drift"] == toy["drift"]["naive"]["per_seed"]
    )
    assert points["32"]["modular_vs_frozen"] == res["modular_vs_frozen"]["per_seed"]
    assert (
        points["16"]["steps_per_task"] < points["32"]["steps_per_task"]
        and points["16"]["modular_vs_frozen"] is None
    )
    md = (tmp_path / "growth.md").read_text()
    assert "| toy | 64 train / 16 validation / 16 test blocks of 64 tokens | 16 |" in md
    assert (tmp_path / "growth.png").stat().st_size > 0


def test_a_record_commit_waits_for_another_process_holding_the_index_lock(tmp_path):
    import threading

    import run

    git("init", "-q", cwd=tmp_path)
    git("config", "user.email", "t@t", cwd=tmp_path)
    git("config", "user.name", "t", cwd=tmp_path)
    (tmp_path / "r.json").write_text("{}\n")
    lock = tmp_path / ".git" / "index.lock"
    lock.write_text("")  # another runner's commit in flight
    threading.Timer(2.5, lock.unlink).start()
    run.commit_record(tmp_path / "r.json", "Run record r", repo=tmp_path)
    assert git("log", "--format=%s", cwd=tmp_path) == "Run record r" and not lock.exists()
    with pytest.raises(SystemExit, match="committing .*outside.json failed"):
        run.commit_record(tmp_path.parent / "outside.json", "no", repo=tmp_path)
