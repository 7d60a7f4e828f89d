"""benchmarks/harness.py never mixes old runs into a new report silently: a run is reused (or resumed)
only when it was fitted with the same arguments and ``--config`` files' contents, and every report
names the commit it was written at and the commits its runs were fitted at.

One real ``train.py fit`` of configs/tiny.yaml (a copy, to edit), through ``benchmarks/run.py`` and a
reproduction experiment file in this process, then reruns that must refuse it or reuse it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
import yaml
from subproc import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import harness  # noqa: E402

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


def test_a_rerun_with_other_arguments_or_an_edited_config_refuses_the_old_run(tmp_path, capsys, script_env):
    import run

    config, runs, out = tmp_path / "tiny.yaml", tmp_path / "runs", tmp_path / "repro.md"
    shutil.copy(REPO / "configs/tiny.yaml", config)
    root = runs / "naive_s0"
    exp = {
        "kind": "reproduction",
        "config": str(config),
        "methods": ["naive"],
        "seeds": [0],
        "runs_dir": str(runs),
        "out": str(out.with_suffix(".json")),
    }

    def experiment(name: str, **fields) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(fields))
        return str(path)

    def repro(*fit: str, ours: tuple[str, ...] = ()) -> None:
        run.main([experiment("repro", **exp, fit_args=[*SIZES, *fit]), "--threads", "1", *ours])

    def refused(*fit: str, ours: tuple[str, ...] = ()) -> str:
        with pytest.raises(SystemExit) as e:
            repro(*fit, ours=ours)
        msg = str(e.value.code)
        assert "\n" not in msg, msg  # one line
        return msg

    repro()  # the one fit
    # other arguments after --: refused, nothing fitted
    assert refused("--data.batch_size", "8") == (
        f"[naive_s0] {root} was fitted with other arguments (arguments were `(none)`, now "
        "`--data.batch_size 8`): use another runs_dir or delete it"
    )
    # the same arguments, but the config file's contents edited
    config.write_text(config.read_text().replace("lora: 0.01", "lora: 0.02"))
    assert refused() == (
        f"[naive_s0] {root} was fitted with other arguments ({config} edited): use another runs_dir or "
        "delete it"
    )
    # a methods experiment reuses the reproduction's runs only when they ran this config and these arguments
    with pytest.raises(SystemExit) as e:
        methods = {
            **exp,
            "kind": "methods",
            "task_id": "both",
            "fit_args": SIZES,
            "reuse": experiment("repro", **exp, fit_args=SIZES),
            "runs_dir": str(tmp_path / "methods"),
            "out": str(tmp_path / "methods.json"),
        }
        run.main([experiment("methods", **methods), "--threads", "1"])
    msg = str(e.value.code)
    assert msg.startswith(f"[naive_s0] {root} was fitted with other arguments ({config} edited): ")
    assert "point reuse at" in msg and not (tmp_path / "methods").exists()

    # the same arguments and config: reused, not fitted again
    shutil.copy(REPO / "configs/tiny.yaml", config)
    capsys.readouterr()
    repro()
    assert "[naive_s0] already finished" in capsys.readouterr().out
    assert [p.name for p in root.glob("version_*")] == ["version_0"]
    # the run's record: its arguments and the commit its fit started at
    head = git("rev-parse", "HEAD")
    record = json.loads((root / harness.FIT_RECORD).read_text())
    assert record["args"] == run.fit_args({**exp, "config": [str(config)], "fit_args": SIZES}, "naive", 0)
    (commit,) = record["commits"]
    assert commit.removesuffix("-dirty") == head
    # the report names the commit it was written at and the one its run was fitted at
    code = json.loads(out.with_suffix(".json").read_text())["code"]
    assert code["commit"].removesuffix("-dirty") == head
    assert code["run_commits"] == {commit: ["runs/naive_s0"]}
    last = out.read_text().splitlines()[-1]
    assert last == f"Code: written at commit `{code['commit']}`; its 1 run(s) were fitted at `{commit}`."

    # a run from before records: refused, unless adopted (then recorded as made with these arguments)
    (root / harness.FIT_RECORD).unlink()
    msg = refused()
    assert msg.startswith(f"[naive_s0] {root} holds a run with no fit_args.json")
    assert "--adopt-legacy-runs" in msg
    repro(ours=("--adopt-legacy-runs",))
    assert json.loads((root / harness.FIT_RECORD).read_text())["digest"] == record["digest"]
    code = json.loads(out.with_suffix(".json").read_text())["code"]
    assert code["run_commits"] == {"unknown": ["runs/naive_s0"]}
    repro()  # adopted: reused from now on without the flag
