"""Task specs and the validation of a task list: the one place that says what a valid task is.

A task is a name (the key of its adapter, metrics and files) and a source: ``synthetic``, a local
file, a folder of split files (``train.jsonl``, ``validation.jsonl``, ``test.jsonl``),
``corpus:<domain>`` (a shipped domain) or a ``datasets`` hub name. Its format says what an example
is (a text block, a prompt and response, or a classification prompt whose target is a label) and
its task metric (``metric``) what the accuracy matrix holds for it.

A classification task is rendered in the prompt format of the O-LoRA code (Wang et al. 2023,
``CL_Benchmark``): ``<instruction>\nOption: <labels joined by ", "> \n<text>\nAnswer:`` with the label
as the target; ``template`` changes it. Its instruction and label set come from the task entry, else
from a ``task.json`` beside the data (``{"instruction": ..., "labels": [...]}``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_type_hints

from crma_lightning import corpus
from crma_lightning.adapters.lora import SHARED_ADAPTER
from crma_lightning.core.errors import raise_problems, type_problems
from crma_lightning.data.replay import replay_problems

RESERVED_TASK_NAMES = ("crma", "crma_history")
"""Task names that would collide with a run-directory entry (``adapters/crma/``, ``adapters/crma_history/``)."""

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
LOCAL_PREFIXES = ("/", "./", "../", "~")
"""Sources starting with these are local paths (files or folders), never hub names."""
SourceKind = Literal["synthetic", "file", "folder", "hub"]
Metric = Literal["token_accuracy", "exact_match", "label_accuracy", "rougeL"]

SPLITS = ("train", "validation", "test")
"""A task's splits. ``train`` is the source itself; validation (the holdout the matrices use during
``fit``) and test come from ``splits``/a folder's files when given, else are cut from the source."""

OLORA_TEMPLATE = "{instruction}\nOption: {options} \n{text}\nAnswer:"
"""The prompt of the O-LoRA code's classification tasks (``CL_Benchmark``); the target is the label."""

DEFAULT_INSTRUCTION = "Choose one from the option."
"""Instruction of a classification task whose entry and task.json give none."""

TASK_FILE = "task.json"
"""Beside a classification task's data: ``{"instruction": ..., "labels": [...]}`` (other keys ignored)."""

DEFAULT_METRIC: dict[str, Metric] = {
    "text": "token_accuracy",
    "prompt_response": "token_accuracy",
    "classification": "exact_match",
}
"""The task metric of each format unless ``metric`` says otherwise."""

METRICS_OF_FORMAT: dict[str, tuple[Metric, ...]] = {
    "text": ("token_accuracy",),
    "prompt_response": ("token_accuracy", "exact_match", "rougeL"),
    "classification": ("exact_match", "label_accuracy", "token_accuracy"),
}
"""The task metrics each format can have."""


@dataclass
class TaskSpec:
    """One task of the continual-learning sequence."""

    name: str
    """Unique task name; the key of the task's adapter state, metrics (``val/<name>/loss``) and checkpoints."""
    source: str = "synthetic"
    """``synthetic``, a local file (.txt .jsonl .json .parquet .csv), ``corpus:<domain>`` (a shipped domain,
    see ``crma_lightning.corpus.DOMAINS``), or a ``datasets`` hub name."""
    format: Literal["text", "prompt_response", "classification"] = "text"
    """``text``: records are concatenated with eos and cut into ``max_length`` blocks, every token
    trained. ``prompt_response``: one example per record, loss on the response (+ eos) only.
    ``classification``: one example per record, ``template`` filled from the record, loss on
    ``answer_prefix`` + the label (+ eos) only."""
    text_field: str = "text"
    """Record field holding the text (``format: text``). A .txt file has one field, ``text``."""
    prompt_field: str = "prompt"
    """Record field holding the prompt (``format: prompt_response``)."""
    response_field: str = "response"
    """Record field holding the response (``format: prompt_response``)."""
    hub_config: str | None = None
    """Configuration name of a hub dataset (the second argument of ``datasets.load_dataset``)."""
    hub_split: str = "train"
    """Split of a hub dataset that is the task's training data (and, unless ``splits`` names
    others, its validation and test data, cut from it by ``data.seed``)."""
    splits: dict[str, str] | None = None
    """Validation and test data given apart from the training data: ``{validation: ..., test: ...}``,
    each a file (for a file source) or a split name of the same hub dataset (for a hub source). A
    folder source finds ``validation.*`` and ``test.*`` files itself. A split not given is cut from
    the training data by ``data.seed``."""
    label_field: str = "label"
    """Record field holding the label (``format: classification``): a label string of ``labels``,
    or an index into ``labels`` (e.g. a hub ClassLabel)."""
    labels: list[str] | None = None
    """The label set (``format: classification``), in index order. Default: ``labels`` of the
    task.json beside the data, else the label field's class names (a hub ClassLabel)."""
    instruction: str | None = None
    """The instruction (``format: classification``). Default: the task.json's, else
    'Choose one from the option.'."""
    template: str = OLORA_TEMPLATE
    """Prompt of a classification example (default: the O-LoRA code's). ``{instruction}``,
    ``{options}`` (the labels joined by ', '), ``{text}`` (the text field, cut to fit
    ``data.max_length``; required) and any record field by name."""
    answer_prefix: str = " "
    """Text put before the label in the target (a space: 'Answer: World' is how text reads)."""
    metric: Metric | None = None
    """The task metric, the accuracy matrix's value for this task: ``token_accuracy`` (default for
    text and prompt_response), ``exact_match`` of the greedy answer (default for classification;
    also for prompt_response), ``label_accuracy`` (classification: the label scored highest),
    ``rougeL`` (prompt_response: ROUGE-L F1 of the greedy answer against the response)."""

    @property
    def task_metric(self) -> Metric:
        """``metric``, or the format's default (:data:`DEFAULT_METRIC`)."""
        return self.metric or DEFAULT_METRIC.get(self.format, "token_accuracy")

    @property
    def generates(self) -> bool:
        """Whether evaluating it generates answers (exact match or ROUGE-L are computed)."""
        return self.format == "classification" or self.task_metric in ("exact_match", "rougeL")


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
    """``synthetic``; ``file`` for a corpus domain, a known extension or an existing file; ``folder``
    for an existing directory; else ``hub``."""
    if source == "synthetic":
        return "synthetic"
    if source.startswith(CORPUS_PREFIX):
        return "file"
    path = local_path(source)
    if path.suffix.lower() in FILE_BUILDERS:
        return "file"
    try:
        if path.is_dir():
            return "folder"
        exists = path.exists()
    except OSError:  # as in is_file
        exists = False
    # A hub name is never written as a path: a missing './x' or '../x' is a local path, reported missing.
    return "file" if exists or source.startswith(LOCAL_PREFIXES) else "hub"


def folder_file(folder: Path, split: str) -> Path | None:
    """``<folder>/<split>.<ext>`` for the first known extension that exists, else None."""
    return next((folder / f"{split}{ext}" for ext in FILE_BUILDERS if is_file(folder / f"{split}{ext}")), None)


def split_sources(task: TaskSpec) -> dict[str, str]:
    """Where each split of a non-synthetic task comes from: a file path, or a hub split name.

    ``train`` is always present; ``validation`` and ``test`` only when given (``splits``, or a
    folder's ``validation.*``/``test.*`` files), else they are cut from the training data.
    """
    kind = source_kind(task.source)
    given = dict(task.splits or {})
    if kind == "hub":
        return {"train": task.hub_split, **given}
    if kind == "folder":
        folder = local_path(task.source)
        found = {s: str(f) for s in SPLITS if (f := folder_file(folder, s)) is not None}
        return {**found, **given}
    return {"train": task.source, **given}


def data_folder(task: TaskSpec) -> Path | None:
    """The folder of a task's local data (where its task.json would be), None for other sources."""
    kind = source_kind(task.source)
    if kind == "folder":
        return local_path(task.source)
    if kind == "file" and not task.source.startswith(CORPUS_PREFIX):
        return local_path(task.source).parent
    return None


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
        problems += _format_problems(task, f"data.tasks[{i}]")
    return [with_task_file(task, f"data.tasks[{i}]", problems) for i, task in enumerate(specs)]


def with_task_file(task: TaskSpec, where: str, problems: list[str]) -> TaskSpec:
    """A classification task with the instruction and labels of the task.json beside its data
    filled in where its entry leaves them unset (appending a problem for an unreadable file)."""
    folder = data_folder(task) if task.format == "classification" else None
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
    if labels is not None and not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
        problems.append(f"{where}: 'labels' in {str(path)!r} must be a non-empty list of strings, got {labels!r}")
        labels = None
    if instruction is not None and not isinstance(instruction, str):
        problems.append(f"{where}: 'instruction' in {str(path)!r} must be a string, got {instruction!r}")
        instruction = None
    return dataclasses.replace(
        task,
        labels=task.labels if task.labels is not None else labels,
        instruction=task.instruction if task.instruction is not None else instruction,
    )


def _format_problems(task: TaskSpec, where: str) -> list[str]:
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
                    f"{where}.template: must contain {{text}} exactly once (where the record's text goes); got {task.template!r}"
                )
            bad = [f for f in fields if not f.isidentifier()]
            if bad:
                problems.append(f"{where}.template: fields must be plain names like {{title}}, got {bad}")
        if task.labels is not None and (not task.labels or len(set(task.labels)) != len(task.labels)):
            problems.append(f"{where}.labels: must be distinct label strings, got {task.labels!r}")
    if task.splits is not None:
        kind = source_kind(task.source)
        unknown = sorted(set(task.splits) - {"validation", "test"})
        if unknown:
            problems.append(
                f"{where}.splits: keys must be 'validation' and/or 'test' (the source is the training data), got {unknown}"
            )
        if kind == "synthetic":
            problems.append(f"{where}.splits: a synthetic task has no files; remove splits")
        elif kind != "hub":
            for split, file in task.splits.items():
                path = local_path(str(file))
                if path.suffix.lower() not in FILE_BUILDERS:
                    problems.append(f"{where}.splits.{split}: {file!r} is not one of {sorted(FILE_BUILDERS)}")
                elif not is_file(path):
                    problems.append(f"{where}.splits.{split}: file {file!r} does not exist (cwd {os.getcwd()})")
    return problems


def _source_problems(task: TaskSpec, where: str, tokenizer: str | None) -> list[str]:
    problems = []
    if task.format not in METRICS_OF_FORMAT:
        problems.append(
            f"{where}.format: must be 'text', 'prompt_response' or 'classification', got {task.format!r}"
        )
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
        if not is_file(path):
            problems.append(f"{where}.source: file {task.source!r} does not exist (cwd {os.getcwd()})")
        elif path.suffix.lower() not in FILE_BUILDERS:
            problems.append(f"{where}.source: {task.source!r} is not one of {sorted(FILE_BUILDERS)}")
    elif kind == "folder" and folder_file(local_path(task.source), "train") is None:
        problems.append(
            f"{where}.source: folder {task.source!r} has no train file (train{'|'.join(FILE_BUILDERS)}); "
            "a folder source holds train.jsonl and optionally validation.jsonl, test.jsonl, task.json"
        )
    return problems


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
    return specs
