"""The validation of a task list: the one place that says what a valid task is.

A task (:class:`~crma_lightning.data.spec.TaskSpec`) is a name (the key of its adapter, metrics and
files), a source (:class:`~crma_lightning.data.sources.TaskSource`), a format (a text block, a prompt
and response, or a classification prompt whose target is a label) and a task metric (``metric``).
A classification task's instruction and labels come from its entry or its data folder's ``task.json``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, get_type_hints

from torch import nn

from crma_lightning.adapters.lora import SHARED_ADAPTER
from crma_lightning.core.errors import raise_problems, type_problems
from crma_lightning.data.replay import replay_problems
from crma_lightning.data.sources import (  # noqa: F401  (CORPUS_PREFIX, FILE_BUILDERS, source_kind: re-exported)
    CORPUS_PREFIX,
    FILE_BUILDERS,
    TaskSource,
    find_source,
    is_file,
    source_kind,
)
from crma_lightning.data.spec import DEFAULT_METRIC, OLORA_TEMPLATE, Metric, TaskSpec  # noqa: F401  (re-exported)

RESERVED_TASK_NAMES = ("crma", "crma_history")
"""Task names that would collide with a run-directory entry (``adapters/crma/``,
``adapters/crma_history/``)."""

RESERVED = {
    SHARED_ADAPTER: "NAIVE's shared LoRA",
    **{n: f"adapters/{n}/ of a run" for n in RESERVED_TASK_NAMES},
}
"""Task names that would collide with an adapter or run-directory name, and what holds them."""

_TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")

DEFAULT_INSTRUCTION = "Choose one from the option."
"""Instruction of a classification task whose entry and task.json give none."""

TASK_FILE = "task.json"
"""Beside a classification task's data: ``{"instruction": ..., "labels": [...]}`` (other keys ignored)."""

METRICS_OF_FORMAT: dict[str, tuple[Metric, ...]] = {
    "text": ("token_accuracy",),
    "prompt_response": ("token_accuracy", "exact_match", "rougeL"),
    "classification": ("exact_match", "label_accuracy", "token_accuracy"),
}
"""The task metrics each format can have."""


def template_fields(template: str) -> list[str]:
    """The field names a template fills (``{name}``), in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def name_problems(names: list[str], where: str = "data.tasks") -> list[str]:
    """Every problem with a list of task names: empty, malformed, duplicated or reserved."""
    if not names:
        return [f"{where}: is empty; list at least one task, e.g. `- name: a` (synthetic)"]
    problems, seen = [], set()
    for i, name in enumerate(names):
        at = f"{where}[{i}].name"
        if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
            problems.append(
                f"{at}: {name!r} must be non-empty letters, digits, '_' or '-' (it becomes a module key and "
                "a metric name)"
            )
        elif name in seen:
            problems.append(f"{at}: {name!r} is used twice; task names must be unique")
        elif name in RESERVED:
            problems.append(f"{at}: {name!r} is reserved (it names {RESERVED[name]}); rename that task")
        elif hasattr(nn.ModuleDict, name):  # peft keys each task's LoRA by its name in a ModuleDict
            problems.append(f"{at}: {name!r} is the name of a torch module method; rename that task")
        seen.add(name)
    return problems


def _as_spec(task: Any, where: str, problems: list[str]) -> TaskSpec | None:
    """``task`` (a TaskSpec or a mapping of its fields) as a well-typed TaskSpec; None after adding
    problems."""
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
            f"{where}: must be a task such as {{name: a, source: data.jsonl}}, got {type(task).__name__} "
            f"{task!r}"
        )
        return None
    found = type_problems(task, where)
    problems += found
    return None if found else task


def task_specs(
    tasks: Any,
    tokenizer: str | None,
    problems: list[str],
    sources: Sequence[TaskSource] = (),
    where: str = "data.tasks",
) -> list[TaskSpec]:
    """``data.tasks`` (or, ``where="data.eval_tasks"``, the evaluation-only tasks, which may be
    none) as TaskSpecs, appending every problem found (types first, then values); ``sources``
    (``data.sources``) claim a task's source before the registered and built-in ones."""
    if not isinstance(tasks, list | tuple):
        problems.append(f"{where} must be a list of tasks, got {type(tasks).__name__} {tasks!r}")
        return []
    specs = [_as_spec(task, f"{where}[{i}]", problems) for i, task in enumerate(tasks)]
    if any(s is None for s in specs) or (not specs and where != "data.tasks"):
        return []
    problems += name_problems([s.name for s in specs], where)
    owners = [find_source(task.source, sources) for task in specs]
    for i, (task, source) in enumerate(zip(specs, owners, strict=True)):
        problems += _source_problems(task, source, f"{where}[{i}]", tokenizer)
        problems += _format_problems(task, source, f"{where}[{i}]")
    return [
        with_task_file(task, source, f"{where}[{i}]", problems)
        for i, (task, source) in enumerate(zip(specs, owners, strict=True))
    ]


def with_task_file(task: TaskSpec, source: TaskSource, where: str, problems: list[str]) -> TaskSpec:
    """A classification task with the instruction and labels of the task.json in its source's data
    folder filled in where its entry leaves them unset (appending a problem for an unreadable file)."""
    folder = source.data_folder(task) if task.format == "classification" else None
    path = folder / TASK_FILE if folder is not None else None
    if path is None or not is_file(path) or (task.labels is not None and task.instruction is not None):
        return task
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        problems.append(f"{where}: {str(path)!r} is not readable as a JSON object ({err}); fix or remove it")
        return task
    labels, instruction = info.get("labels"), info.get("instruction")
    if labels is not None and not (
        isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)
    ):
        problems.append(
            f"{where}: 'labels' in {str(path)!r} must be a non-empty list of strings, got {labels!r}"
        )
        labels = None
    if instruction is not None and not isinstance(instruction, str):
        problems.append(f"{where}: 'instruction' in {str(path)!r} must be a string, got {instruction!r}")
        instruction = None
    return dataclasses.replace(
        task,
        labels=task.labels if task.labels is not None else labels,
        instruction=task.instruction if task.instruction is not None else instruction,
    )


def _format_problems(task: TaskSpec, source: TaskSource, where: str) -> list[str]:
    problems = []
    if task.format not in METRICS_OF_FORMAT:
        return problems  # reported by _source_problems
    if task.metric is not None and task.metric not in METRICS_OF_FORMAT[task.format]:
        problems.append(
            f"{where}.metric: {task.metric!r} does not apply to format {task.format!r}; "
            f"use one of {list(METRICS_OF_FORMAT[task.format])}"
        )
    if task.format == "classification":
        try:
            fields = template_fields(task.template)
        except ValueError as err:
            problems.append(f"{where}.template: {task.template!r} is not a format string ({err})")
        else:
            if fields.count("text") != 1 or task.template.count("{text}") != 1:
                problems.append(
                    f"{where}.template: must contain {{text}} exactly once (where the record's text goes); "
                    f"got {task.template!r}"
                )
            bad = [f for f in fields if not f.isidentifier()]
            if bad:
                problems.append(f"{where}.template: fields must be plain names like {{title}}, got {bad}")
        if task.labels is not None and (not task.labels or len(set(task.labels)) != len(task.labels)):
            problems.append(f"{where}.labels: must be distinct label strings, got {task.labels!r}")
    if task.splits is not None:
        unknown = sorted(set(task.splits) - {"validation", "test"})
        if unknown:
            problems.append(
                f"{where}.splits: keys must be 'validation' and/or 'test' (the source is the training data), "
                f"got {unknown}"
            )
        problems += source.split_problems(task, where)
    return problems


def _source_problems(task: TaskSpec, source: TaskSource, where: str, tokenizer: str | None) -> list[str]:
    problems = []
    if task.format not in METRICS_OF_FORMAT:
        problems.append(
            f"{where}.format: must be 'text', 'prompt_response' or 'classification', got {task.format!r}"
        )
    if not source.synthetic and tokenizer is None:
        problems.append(
            f"{where}.source: {task.source!r} needs data.tokenizer (a name, a folder, or 'tiny'); "
            "only synthetic tasks work without one"
        )
    return problems + source.problems(task, where)


#: Lowest allowed value of each numeric setting.
LOWEST = {
    "max_length": 2,  # a shifted loss needs one input and one target
    "train_size": 1,
    "holdout_size": 1,
    "test_size": 0,
    "batch_size": 1,
    "eval_batch_size": 1,
    "epochs_per_task": 1,
    "seed": 0,
    "synthetic_vocab": 2,
    "num_workers": 0,
}


def validate_data_config(dm: Any, tasks: Any, eval_tasks: Any = ()) -> tuple[list[TaskSpec], list[TaskSpec]]:
    """Every problem of a ``ContinualDataModule``'s arguments (``dm``, its attributes set), its
    task list and its evaluation-only tasks at once, as one :class:`ConfigError`; the task specs of
    both when there is none."""
    # Types first: the checks after them compare values and call str methods, which would raise
    # TypeError/AttributeError on a wrong type instead of naming the field.
    skip = ("tasks", "eval_tasks", "return", "replay")
    hints = {k: v for k, v in get_type_hints(type(dm).__init__).items() if k not in skip}
    problems = type_problems(dm, "data", hints)
    typed = not problems
    sources = dm.sources if typed and dm.sources is not None else []
    specs = task_specs(tasks, dm.tokenizer, problems, sources)
    extra = task_specs(eval_tasks, dm.tokenizer, problems, sources, where="data.eval_tasks")
    both = {s.name for s in specs} & {s.name for s in extra}
    if both:
        problems.append(
            f"data.eval_tasks: {sorted(both)} also in data.tasks; a task is either trained or only "
            "evaluated: rename or remove one"
        )
    if typed:
        problems += [
            f"data.{k}: must be >= {low}, got {getattr(dm, k)}"
            for k, low in LOWEST.items()
            if getattr(dm, k) is not None and getattr(dm, k) < low
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
    return specs, extra
