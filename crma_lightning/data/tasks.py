"""Task specs and the validation of a task list: the one place that says what a valid task is.

A task is a name (the key of its adapter, metrics and files) and a source: ``synthetic``, a local
file, ``corpus:<domain>`` (a shipped domain) or a ``datasets`` hub name.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_type_hints

from crma_lightning import corpus
from crma_lightning.config import raise_problems, type_problems
from crma_lightning.data.replay import replay_problems
from crma_lightning.lora import SHARED_ADAPTER
from crma_lightning.rundir import RESERVED_TASK_NAMES

FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""File extension -> ``datasets`` builder used to read it."""

CORPUS_PREFIX = "corpus:"
"""Task ``source`` prefix naming a domain of the shipped corpus, e.g. ``corpus:medical``."""

RESERVED = {
    SHARED_ADAPTER: "NAIVE's shared LoRA",
    **{n: f"adapters/{n}/ of a run" for n in RESERVED_TASK_NAMES},
}
"""Task names that would collide with an adapter or run-directory name, and what holds them."""

_TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")
SourceKind = Literal["synthetic", "file", "hub"]


@dataclass
class TaskSpec:
    """One task of the continual-learning sequence."""

    name: str
    """Unique task name; the key of the task's adapter state, metrics (``val/<name>/loss``) and checkpoints."""
    source: str = "synthetic"
    """``synthetic``, a local file (.txt .jsonl .json .parquet .csv), ``corpus:<domain>`` (a shipped domain,
    see ``crma_lightning.corpus.DOMAINS``), or a ``datasets`` hub name."""
    format: Literal["text", "prompt_response"] = "text"
    """``text``: records are concatenated with eos and cut into ``max_length`` blocks, every token
    trained. ``prompt_response``: one example per record, loss on the response (+ eos) only."""
    text_field: str = "text"
    """Record field holding the text (``format: text``). A .txt file has one field, ``text``."""
    prompt_field: str = "prompt"
    """Record field holding the prompt (``format: prompt_response``)."""
    response_field: str = "response"
    """Record field holding the response (``format: prompt_response``)."""
    hub_config: str | None = None
    """Configuration name of a hub dataset (the second argument of ``datasets.load_dataset``)."""
    hub_split: str = "train"
    """Split of a hub dataset to draw holdout and training examples from."""


def local_path(source: str) -> Path:
    path = Path(source)
    try:
        return path.expanduser()
    except RuntimeError:  # '~someone/x.txt' for an unknown user: keep it literal, reported as missing
        return path


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long for the file system (pathlib only hides "not found" errors)
        return False


def source_kind(source: str) -> SourceKind:
    """``synthetic``; ``file`` for a corpus domain, a known extension or an existing path; else ``hub``."""
    if source == "synthetic":
        return "synthetic"
    if source.startswith(CORPUS_PREFIX):
        return "file"
    path = local_path(source)
    if path.suffix.lower() in FILE_BUILDERS:
        return "file"
    try:
        exists = path.exists()
    except OSError:  # as in is_file
        exists = False
    return "file" if exists else "hub"


def name_problems(names: list[str], where: str = "data.tasks") -> list[str]:
    """Every problem with a list of task names: empty, malformed, duplicated or reserved."""
    if not names:
        return [f"{where}: is empty; list at least one task, e.g. `- name: a` (synthetic)"]
    problems, seen = [], set()
    for i, name in enumerate(names):
        at = f"{where}[{i}].name"
        if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
            problems.append(
                f"{at}: {name!r} must be non-empty letters, digits, '_' or '-' (it becomes a module key and a metric name)"
            )
        elif name in seen:
            problems.append(f"{at}: {name!r} is used twice; task names must be unique")
        elif name in RESERVED:
            problems.append(f"{at}: {name!r} is reserved (it names {RESERVED[name]}); rename that task")
        seen.add(name)
    return problems


def _as_spec(task: Any, where: str, problems: list[str]) -> TaskSpec | None:
    """``task`` (a TaskSpec or a mapping of its fields) as a well-typed TaskSpec; None after adding problems."""
    if isinstance(task, Mapping):
        known = [f.name for f in dataclasses.fields(TaskSpec)]
        if "name" not in task or any(key not in known for key in task):
            problems.append(
                f"{where}: a task needs a name and takes only the fields {known}; got {list(task)}"
            )
            return None
        task = TaskSpec(**task)
    if not isinstance(task, TaskSpec):
        problems.append(
            f"{where}: must be a task such as {{name: a, source: data.jsonl}}, got {type(task).__name__} {task!r}"
        )
        return None
    found = type_problems(task, where)
    problems += found
    return None if found else task


def task_specs(tasks: Any, tokenizer: str | None, problems: list[str]) -> list[TaskSpec]:
    """``data.tasks`` as TaskSpecs, appending every problem found (types first, then values)."""
    if not isinstance(tasks, list | tuple):
        problems.append(f"data.tasks must be a list of tasks, got {type(tasks).__name__} {tasks!r}")
        return []
    specs = [_as_spec(task, f"data.tasks[{i}]", problems) for i, task in enumerate(tasks)]
    if any(s is None for s in specs):
        return []
    problems += name_problems([s.name for s in specs])
    for i, task in enumerate(specs):
        problems += _source_problems(task, f"data.tasks[{i}]", tokenizer)
    return specs


def _source_problems(task: TaskSpec, where: str, tokenizer: str | None) -> list[str]:
    problems = []
    if task.format not in ("text", "prompt_response"):
        problems.append(f"{where}.format: must be 'text' or 'prompt_response', got {task.format!r}")
    kind = source_kind(task.source)
    if kind != "synthetic" and tokenizer is None:
        problems.append(
            f"{where}.source: {task.source!r} needs data.tokenizer (a name, a folder, or 'tiny'); "
            "only synthetic tasks work without one"
        )
    if task.source.startswith(CORPUS_PREFIX):
        domain = task.source.removeprefix(CORPUS_PREFIX)
        if domain not in corpus.DOMAINS:
            problems.append(
                f"{where}.source: unknown corpus domain {domain!r}; the shipped domains are "
                f"{', '.join(CORPUS_PREFIX + d for d in corpus.DOMAINS)}"
            )
    elif kind == "file":
        path = local_path(task.source)
        if path.suffix.lower() not in FILE_BUILDERS:
            problems.append(f"{where}.source: {task.source!r} is not one of {sorted(FILE_BUILDERS)}")
        elif not is_file(path):
            problems.append(f"{where}.source: file {task.source!r} does not exist (cwd {os.getcwd()})")
    return problems


#: Lowest allowed value of each numeric setting.
LOWEST = {
    "max_length": 2,  # a shifted loss needs one input and one target
    "train_size": 1,
    "holdout_size": 1,
    "batch_size": 1,
    "eval_batch_size": 1,
    "epochs_per_task": 1,
    "seed": 0,
    "synthetic_vocab": 2,
    "num_workers": 0,
}


def validate_data_config(dm: Any, tasks: Any) -> list[TaskSpec]:
    """Every problem of a ``ContinualDataModule``'s arguments (``dm``, its attributes set) and its
    task list at once, as one :class:`ConfigError`; the task specs when there is none."""
    # Types first: the checks after them compare values and call str methods, which would raise
    # TypeError/AttributeError on a wrong type instead of naming the field.
    hints = {
        k: v for k, v in get_type_hints(type(dm).__init__).items() if k not in ("tasks", "return", "replay")
    }
    problems = type_problems(dm, "data", hints)
    typed = not problems
    specs = task_specs(tasks, dm.tokenizer, problems)
    if typed:
        problems += [
            f"data.{k}: must be >= {low}, got {getattr(dm, k)}"
            for k, low in LOWEST.items()
            if getattr(dm, k) < low
        ]
        if not 0.0 <= dm.synthetic_jump < 1.0:
            problems.append(f"data.synthetic_jump: must lie in [0, 1), got {dm.synthetic_jump}")
        if dm.replay is not None:
            problems += replay_problems(dm.replay, dm.batch_size)
            if dm.multitask:
                problems.append(
                    "data.replay and data.multitask: joint training already sees every task; set one"
                )
    raise_problems(problems, "data config")
    return specs
