"""Bad input gets one clear error: every case of docs/errors.md through the real entry point.

Each case runs ``crma_lightning.cli.fit.main`` (what train.py calls) in-process with a real Trainer and
checks: exit code 2, one ``error:`` message naming the field or file, no traceback, and no run
directory left behind. One case also runs as a subprocess to check the process's exit code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crma_lightning.cli.fit import main

REPO = Path(__file__).resolve().parents[2]


def fit_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--data.train_size",
        "32",
        "--data.holdout_size",
        "8",
        "--data.epochs_per_task",
        "1",
        *extra,
    ]


def tasks(*specs: dict) -> list[str]:
    files = any("source" in s for s in specs)
    return ["--data.tasks", json.dumps(list(specs)), *(["--data.tokenizer", "tiny"] if files else [])]


def jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def expect_error(args: list[str], capsys, *needles: str, tmp_path: Path) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    message = err[err.index("error: ") :]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in message, (needle, message)
    runs = tmp_path / "runs"
    leftovers = [p for p in runs.rglob("*") if p.is_file()] if runs.exists() else []
    assert not leftovers, leftovers
    return message


# (id, builder(tmp_path) -> extra args, expected substrings): one row per docs/errors.md entry
def _cases():
    qa = [{"prompt": f"Q{i}?", "response": f"answer {i}"} for i in range(40)]
    return {
        "empty task list": (lambda t: tasks(), ["data.tasks", "is empty"]),
        "duplicate task names": (
            lambda t: tasks({"name": "a"}, {"name": "a"}),
            ["data.tasks[1].name", "'a' is used twice"],
        ),
        "reserved task name": (
            lambda t: tasks({"name": "crma"}),
            ["data.tasks[0].name", "'crma' is reserved"],
        ),
        "task named like a torch module method": (
            lambda t: tasks({"name": "forward"}),
            ["data.tasks[0].name", "'forward' is the name of a torch module method"],
        ),
        "missing data file": (
            lambda t: tasks({"name": "a", "source": str(t / "nope.jsonl")}),
            ["nope.jsonl"],
        ),
        "empty data file": (
            lambda t: (t / "e.txt").write_text("") and [] or tasks({"name": "a", "source": str(t / "e.txt")}),
            ["e.txt", "empty"],
        ),
        "unreadable data file": (
            lambda t: (
                (t / "b.jsonl").write_text('{"text": "unterminated\n')
                and []
                or tasks({"name": "a", "source": str(t / "b.jsonl")})
            ),
            ["b.jsonl"],
        ),
        "text field absent": (
            lambda t: tasks({"name": "a", "source": jsonl(t / "qa.jsonl", qa)}),
            ["'text'", "text_field", "prompt"],
        ),
        "examples too short": (
            lambda t: tasks(
                {
                    "name": "a",
                    "format": "prompt_response",
                    "source": jsonl(t / "s.jsonl", [{"prompt": "", "response": ""}] * 20),
                }
            ),
            ["no usable example"],
        ),
        "holdout larger than data": (
            lambda t: [
                *tasks({"name": "a", "format": "prompt_response", "source": jsonl(t / "f.jsonl", qa[:6])}),
                "--data.holdout_size",
                "8",
            ],
            ["data.holdout_size"],
        ),
        "unknown model offline": (
            lambda t: [
                "--model.backbone.config",
                "null",
                "--model.backbone.name_or_path",
                "nobody/no-such-model",
            ],
            ["model.backbone.name_or_path", "nobody/no-such-model"],
        ),
        "model layout not injectable": (
            lambda t: [
                "--model.backbone.config",
                json.dumps(
                    {
                        "model_type": "bert",
                        "vocab_size": 96,
                        "hidden_size": 32,
                        "num_hidden_layers": 1,
                        "num_attention_heads": 2,
                        "intermediate_size": 64,
                        "is_decoder": True,
                    }
                ),
            ],
            ["cannot inject CRMA", "model.layers"],
        ),
        "tokenizer larger than the model's vocabulary": (
            lambda t: tasks({"name": "a", "source": "corpus:code"}),
            ["token ids go up to 511", "embedding has 96 rows"],
        ),
        "streams < 2": (lambda t: ["--model.crma.streams", "1"], ["model.crma.streams"]),
        "sinkhorn iterations < 1": (
            lambda t: ["--model.crma.sinkhorn_iters", "0"],
            ["model.crma.sinkhorn_iters"],
        ),
        "negative learning rate": (lambda t: ["--model.lr.lora", "-0.1"], ["model.lr.lora"]),
        "LoRA targets match nothing": (
            lambda t: ["--model.lora.target_modules", "[no_such_proj]"],
            ["no_such_proj", "lora.target_modules"],
        ),
        "linked option on the command line": (
            lambda t: ["--trainer.max_epochs", "2"],
            ["--trainer.max_epochs cannot be set", "data.epochs_per_task"],
        ),
        "linked option in a config file": (
            lambda t: (
                (t / "more.yaml").write_text("trainer:\n  max_epochs: 3\nmodel:\n  seed: 4\n")
                and []
                or ["--config", str(t / "more.yaml")]
            ),
            ["more.yaml: trainer.max_epochs cannot be set", "data.epochs_per_task"],
        ),
        "linked seed": (lambda t: ["--model.seed=3"], ["--model.seed cannot be set", "--data.seed"]),
        "a method callback listed in trainer.callbacks": (
            lambda t: [
                "--trainer.callbacks",
                '[{"class_path": "crma_lightning.callbacks.evaluation.ContinualEvaluation"}]',
            ],
            [
                "crma_lightning.callbacks.evaluation.ContinualEvaluation",
                "train.py adds itself",
                "`evaluation:`",
            ],
        ),
        "DDP told not to look for unused parameters": (
            lambda t: ["--trainer.devices", "2", "--trainer.strategy", "ddp_find_unused_parameters_false"],
            ["find_unused_parameters=False", "use `ddp`"],
        ),
        "FSDP1 on CPU": (
            lambda t: ["--trainer.devices", "2", "--trainer.strategy", "fsdp"],
            ["trainer.strategy fsdp (FSDP1) needs a GPU", "configs/distributed/fsdp2_cpu.yaml"],
        ),
        "a regulariser under FSDP sharding": (
            lambda t: [
                "--trainer.devices",
                "2",
                "--trainer.strategy",
                '{"class_path": "crma_lightning.backbone.sharding.AdapterShardedStrategy"}',
                "--model.strategy",
                "naive",
                "--model.regularizers",
                '[{"class_path": "crma_lightning.methods.regularizers.EWC"}]',
            ],
            ["not supported under FSDP sharding", "use DDP"],
        ),
        "routing layer outside the model": (
            lambda t: ["--routing.layer", "31"],
            ["routing.layer 31 is outside", "1..2", "null for 1"],
        ),
        "routing options invalid": (
            lambda t: ["--routing.max_examples", "0", "--routing.batch_size", "0"],
            ["routing.max_examples must be >= 1", "routing.batch_size must be >= 1"],
        ),
        "corrupted checkpoint": (
            lambda t: (
                (t / "bad.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
                and []
                or ["--ckpt_path", str(t / "bad.ckpt")]
            ),
            ["bad.ckpt", "corrupted"],
        ),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(case, tmp_path, capsys):
    build, needles = CASES[case]
    expect_error(fit_args(tmp_path, *build(tmp_path)), capsys, *needles, tmp_path=tmp_path)


@pytest.mark.e2e
def test_resume_with_another_task_list_or_strategy_is_refused(tmp_path, capsys):
    main(fit_args(tmp_path, "--trainer.max_steps", "10"))
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path, *tasks({"name": "alpha"}, {"name": "other"}), "--ckpt_path", str(ckpt)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "trained with tasks ['alpha', 'beta', 'gamma']" in err and "'other'" in err and "Traceback" not in err
    )
    with pytest.raises(SystemExit) as exit_info:
        main(
            fit_args(
                tmp_path,
                "--config",
                str(REPO / "configs" / "methods" / "frozen.yaml"),
                "--ckpt_path",
                str(ckpt),
            )
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "(strategy modular)" in err and "(strategy frozen)" in err and "Traceback" not in err


@pytest.mark.e2e
def test_debug_shows_the_traceback(tmp_path, capsys):
    """--debug: the same problem raises the exception itself (a traceback) instead of one line."""
    from crma_lightning.core.errors import ConfigError

    with pytest.raises(ConfigError, match="model.crma.streams"):
        main([*fit_args(tmp_path, "--model.crma.streams", "1"), "--debug"])
    assert "error:" not in capsys.readouterr().err
