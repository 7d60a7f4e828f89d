"""Continual-learning data: a LightningDataModule that serves a sequence of tasks, one task per stage.

Task ``k`` is trained during epochs ``[k * epochs_per_task, (k + 1) * epochs_per_task)``; the trainer
runs with ``reload_dataloaders_every_n_epochs=1`` so ``train_dataloader()`` is asked again at every
epoch and hands out the current task. Every task also keeps a fixed holdout set that callbacks
evaluate after later tasks to measure forgetting (``holdout_batches``).

Sources: ``synthetic`` permutation tasks (``crma_lightning.synthetic``), local files (.txt .jsonl
.json .parquet .csv), ``corpus:<domain>`` for a domain of the shipped corpus (``crma_lightning.corpus``,
read like a local .jsonl file) and ``datasets`` hub names.

Batches are dicts of ``input_ids``, ``attention_mask``, ``labels`` (all ``(B, T)`` int64), right-padded
to the longest sequence in the batch. Labels are NOT shifted (the model predicts ``labels[:, 1:]``
from ``logits[:, :-1]``) and are -100 on padding and on prompt tokens.

Distributed training shards here, not through Lightning's sampler (``use_distributed_sampler=False``):
each epoch draws one global permutation of the task's training set from ``(seed, epoch)``, cuts it
into batches, and rank ``r`` of ``W`` takes global batches ``r, r + W, r + 2W, ...``. The permutation
is padded by wrapping around to a multiple of ``batch_size * W`` so that every rank yields the same
number of full batches and every example is seen at least once per epoch.
"""

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_type_hints

import datasets
import numpy as np
import pyarrow as pa
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from crma_lightning import corpus
from crma_lightning.backbone import converted_gguf, resolve_path
from crma_lightning.config import ConfigError, type_problems
from crma_lightning.synthetic import FIRST_TOKEN, permutation_sequences

IGNORE_INDEX = -100
"""Label value that the loss skips (``torch.nn.functional.cross_entropy``'s default ``ignore_index``)."""

TINY_TOKENIZER = "tiny"
"""``tokenizer`` value that selects the 512-token BPE shipped in ``crma_lightning/assets``."""

FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
"""File extension -> ``datasets`` builder used to read it."""

_READ_OPTIONS = {
    "text": {"encoding": "utf-8-sig"},  # drops a UTF-8 byte-order mark instead of training on it
    "csv": {"keep_default_na": False},  # keeps records such as "NA", "None" or "null" as text
}
"""Reader options per builder; the json and csv readers already skip a byte-order mark."""

_FILE_SHAPES = {
    "text": "a .txt file holds UTF-8 text, one record per line",
    "json": 'a .jsonl file holds one JSON object per line, e.g. {"text": "..."}; a .json file, a list of them',
    "csv": "a .csv file holds UTF-8 text: a header line naming the fields, then one record per line",
    "parquet": "a .parquet file is written by a Parquet writer, e.g. pandas.DataFrame.to_parquet",
}
"""What a readable file of each builder looks like, for error messages."""

CORPUS_PREFIX = "corpus:"
"""Task ``source`` prefix naming a domain of the shipped corpus, e.g. ``corpus:medical``."""

_TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")
_MAP_BATCH = 1000


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


def tiny_tokenizer_path() -> str:
    """Folder of the 512-token byte-level BPE shipped with the package (``<pad>`` = 0, eos = 1)."""
    try:
        root = resources.files(__package__)
    except (TypeError, NotADirectoryError):
        # Python < 3.12 cannot anchor resources in a namespace package (no __init__.py, as under an
        # editable install); the folder of this module is the same place.
        root = Path(__file__).parent
    return str(root / "assets" / "tiny_tokenizer")


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub name, local folder, ``tiny`` or ``path/to/model.gguf``; pad falls back to eos."""
    if name == TINY_TOKENIZER:
        name = tiny_tokenizer_path()
    try:
        if name.endswith(".gguf"):
            # The converted checkpoint's fast tokenizer loads in well under a second; reading
            # the GGUF file's vocabulary takes ~4 s on every run.
            path = _local_path(resolve_path(name, "data.tokenizer"))
            folder = converted_gguf(str(path.parent), path.name, "data.tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        else:
            tokenizer = AutoTokenizer.from_pretrained(resolve_path(name, "data.tokenizer"), trust_remote_code=False)
    except ConfigError:
        raise
    except Exception as err:
        # transformers raises OSError, ValueError (bad repo id, folder without a tokenizer) and
        # others depending on what is wrong; all mean the same thing to the user.
        raise ConfigError(
            f"data.tokenizer: {name!r} could not be loaded ({type(err).__name__}: {err}); give a hub name "
            "cached on this machine, a local folder with tokenizer files, path/to/model.gguf, package:<module>/<file>, "
            "or 'tiny'"
        ) from err
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"data.tokenizer: '{name}' has no eos token; the data pipeline ends every example with it"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class PadCollator:
    """Stack examples into a right-padded batch, padded to the longest example in the batch."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[Mapping[str, list[int]]]) -> dict[str, Tensor]:
        length = max(len(ex["input_ids"]) for ex in examples)
        input_ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, ex in enumerate(examples):
            n = len(ex["input_ids"])
            input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class ShardedBatchSampler(Sampler[list[int]]):
    """One rank's batches of one epoch: every ``world_size``-th batch of a seeded global permutation.

    The permutation of ``range(num_examples)`` comes from ``(seed, epoch)``, is tiled to a multiple
    of ``batch_size * world_size`` (the first examples of the epoch repeat), and is cut into batches
    of ``batch_size``; this rank takes batches ``rank, rank + world_size, ...``. ``start`` skips that
    many of this rank's batches without producing their indices; it is read when iteration begins.

    Deliberately not a ``BatchSampler`` and without ``drop_last``: with
    ``use_distributed_sampler=True`` Lightning then refuses to inject its own sampler, loudly.
    """

    def __init__(
        self, num_examples: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_examples < 1 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"need num_examples >= 1, batch_size >= 1, 0 <= rank < world_size; "
                f"got {num_examples}, {batch_size}, rank {rank} of {world_size}"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.start = 0

    def __len__(self) -> int:
        return math.ceil(self.num_examples / (self.batch_size * self.world_size))

    def rank_batches(self) -> np.ndarray:
        """All of this rank's batches this epoch, ``(len(self), batch_size)`` example indices."""
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)
        order = np.resize(perm, len(self) * self.world_size * self.batch_size)  # wraps around
        return order.reshape(-1, self.batch_size)[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        # Materialised now, not lazily, so a later change of `start` cannot affect this iteration.
        return iter(self.rank_batches()[self.start :].tolist())


class ResumableDataLoader(DataLoader):
    """DataLoader over one task's training set that can resume mid-epoch.

    Lightning saves ``state_dict()`` in checkpoints and calls ``load_state_dict()`` on resume
    (it checks ``isinstance(loader, lightning.fabric.utilities.types._Stateful)``). Batches are
    counted in the main process as they are handed out, so the count is exact with workers too.
    After ``load_state_dict`` the next iteration starts ``batches_yielded`` batches into the epoch;
    the skipped batches are never loaded.
    """

    batch_sampler: ShardedBatchSampler

    def __init__(
        self,
        dataset: datasets.Dataset,
        batch_sampler: ShardedBatchSampler,
        collate_fn: PadCollator,
        task: str,
        num_workers: int = 0,
    ) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=num_workers)
        self.task = task
        self._batches_yielded = 0
        self._resume_at = 0

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, "epoch": self.epoch, "batches_yielded": self._batches_yielded}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["epoch"] != self.epoch:
            # The checkpoint's position belongs to an epoch that is over: start this one afresh.
            self._resume_at = 0
            return
        if state_dict["task"] != self.task:
            raise ConfigError(
                f"the checkpoint was taken in epoch {self.epoch} on task '{state_dict['task']}', but the data "
                f"config now trains '{self.task}' in that epoch; resume with the same data.tasks order and "
                "data.epochs_per_task"
            )
        self._resume_at = int(state_dict["batches_yielded"])

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        start, self._resume_at = self._resume_at, 0
        self.batch_sampler.start = min(start, len(self.batch_sampler))
        self._batches_yielded = self.batch_sampler.start
        return self._count(super().__iter__())

    def _count(self, batches: Iterator[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        for batch in batches:
            self._batches_yielded += 1
            yield batch


def _offline() -> bool:
    flags = (os.environ.get("HF_DATASETS_OFFLINE", ""), os.environ.get("HF_HUB_OFFLINE", ""))
    return any(f.upper() in {"1", "ON", "YES", "TRUE"} for f in flags) or bool(datasets.config.HF_HUB_OFFLINE)


def _caused_by(err: BaseException | None, kind: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
    while err is not None:
        if isinstance(err, kind):
            return True
        err = err.__cause__ or err.__context__
    return False


def _caused_by_network(err: BaseException | None) -> bool:
    return _caused_by(err, (ConnectionError, TimeoutError))


def _is_text_feature(feature: Any, numbers: bool) -> bool:
    """Whether a column of this ``datasets`` feature holds text (or, with ``numbers``, scalars written as text)."""
    dtype = feature.dtype if isinstance(feature, datasets.Value) else None
    if dtype in ("string", "large_string", "null"):  # null: every value missing
        return True
    return numbers and dtype is not None and (dtype == "bool" or dtype.startswith(("int", "uint", "float")))


def _json_problem(path: Path) -> str | None:
    """Why a .json/.jsonl file is not JSON objects (one per line, or one list of them), or None.

    Checked here because pyarrow's JSON reader (26.0) kills the process with SIGSEGV on a block
    that starts with a bare ``null`` line (``datasets`` turns a .json list into such lines) and on
    very deep nesting. One more pass over the file in Python costs little next to tokenising it.
    """
    with path.open("rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    # A list, or one object in a .json file, is one document (datasets reads those whole too).
    if head.startswith(b"[") or (head.startswith(b"{") and path.suffix.lower() == ".json"):
        try:
            document = json.loads(path.read_bytes().decode("utf-8-sig"))
        except (ValueError, RecursionError):  # not one JSON document: JSON lines, checked below
            document = None
        if isinstance(document, dict):  # e.g. {"text": [...]}: one record, left to the field checks
            return None
        if isinstance(document, list):
            bad = next((i for i, r in enumerate(document) if not isinstance(r, dict)), None)
            return None if bad is None else f"element {bad} of the list is {_snippet(document[bad])}, not an object"
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                return f"line {number} is not UTF-8 text ({err})"
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError as err:
                return f"line {number} is not valid JSON ({err})"
            except RecursionError:
                return f"line {number} nests lists or objects too deeply to be text records"
            if not isinstance(record, dict):
                return f"line {number} is {_snippet(record)}, not a JSON object"
    return None


def _snippet(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _local_path(source: str) -> Path:
    path = Path(source)
    try:
        return path.expanduser()
    except RuntimeError:  # '~someone/x.txt' for an unknown user: keep it literal, reported as missing
        return path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long for the file system (pathlib only hides "not found" errors)
        return False


def _source_kind(source: str) -> Literal["synthetic", "file", "hub"]:
    if source == "synthetic":
        return "synthetic"
    if source.startswith(CORPUS_PREFIX):
        return "file"
    path = _local_path(source)
    if path.suffix.lower() in FILE_BUILDERS:
        return "file"
    try:
        exists = path.exists()
    except OSError:  # as in _is_file
        exists = False
    return "file" if exists else "hub"


def _tokenize_text(
    batch: dict[str, list], indices: list[int], tokenizer: PreTrainedTokenizerBase, field: str, max_length: int
) -> dict[str, list]:
    """Each record (+ eos) cut into ``max_length`` blocks, each block one example tagged with its record.

    Blocks never span records, so the holdout/train split (by record) cannot put one record's text
    on both sides. Blocks under 2 tokens teach nothing and are dropped; so are blank records.
    """
    eos = tokenizer.eos_token_id
    keep = [(i, t) for i, t in zip(indices, batch[field], strict=True) if isinstance(t, str) and t.strip()]
    encoded = tokenizer([t for _, t in keep]).input_ids if keep else []
    out: dict[str, list] = {"input_ids": [], "labels": [], "record": []}
    for (record, _), ids in zip(keep, encoded, strict=True):
        if not ids or ids[-1] != eos:
            ids = [*ids, eos]
        for lo in range(0, len(ids), max_length):
            block = ids[lo : lo + max_length]
            if len(block) >= 2:
                out["input_ids"].append(block)
                out["labels"].append(block)
                out["record"].append(record)
    return out


def _tokenize_prompt_response(
    batch: dict[str, list],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    prompt_field: str,
    response_field: str,
    max_length: int,
) -> dict[str, list[list[int]]]:
    """prompt + response + eos, truncated to ``max_length``; labels -100 on the prompt.

    The prompt takes the tokenizer's own special tokens (e.g. a Llama BOS); the response none.
    Examples left with no response token or under 2 tokens are dropped.
    """
    eos = tokenizer.eos_token_id
    prompts = ["" if p is None else str(p) for p in batch[prompt_field]]
    responses = ["" if r is None else str(r) for r in batch[response_field]]
    prompt_ids = tokenizer(prompts).input_ids
    response_ids = tokenizer(responses, add_special_tokens=False).input_ids
    out: dict[str, list] = {"input_ids": [], "labels": [], "record": []}
    for record, p, r in zip(indices, prompt_ids, response_ids, strict=True):
        ids = (p + r + [eos])[:max_length]
        if len(ids) <= len(p) or len(ids) < 2:
            continue
        out["record"].append(record)
        out["input_ids"].append(ids)
        out["labels"].append([IGNORE_INDEX] * len(p) + ids[len(p) :])
    return out


def _task_spec(task: Any, where: str, problems: list[str]) -> TaskSpec | None:
    """``task`` (a TaskSpec or a mapping of its fields) as a well-typed TaskSpec; None after adding problems."""
    if isinstance(task, Mapping):
        known = [f.name for f in dataclasses.fields(TaskSpec)]
        if "name" not in task or any(key not in known for key in task):
            problems.append(f"{where}: a task needs a name and takes only the fields {known}; got {list(task)}")
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


class ContinualDataModule(LightningDataModule):
    """A sequence of tasks for continual fine-tuning, each with a training set and a fixed holdout set.

    Args:
        tasks: The tasks in training order.
        tokenizer: Tokenizer name or local folder for ``AutoTokenizer.from_pretrained``, ``tiny`` for the
            one shipped in the package, or ``path/to/model.gguf``. Needed only for non-synthetic tasks.
        max_length: Tokens per example: synthetic sequence length, text block length, truncation length.
        train_size: Training examples per task (fewer, with a warning, if the source runs out).
        holdout_size: Holdout examples per task, set aside before training examples are drawn.
        batch_size: Training examples per batch on each rank.
        eval_batch_size: Examples per batch in ``holdout_batches``.
        epochs_per_task: Epochs spent on each task before moving to the next.
        seed: Seeds the holdout/train split, the per-epoch shuffles and synthetic data.
        synthetic_vocab: Size of the token range a synthetic task permutes (ids ``3 .. 3 + synthetic_vocab - 1``).
        synthetic_jump: Probability that a synthetic sequence jumps to a random token instead of
            following the permutation; > 0 keeps holdout sequences distinct from training ones.
        num_workers: DataLoader worker processes for training batches.
    """

    def __init__(
        self,
        tasks: list[TaskSpec],
        tokenizer: str | None = None,
        max_length: int = 128,
        train_size: int = 500,
        holdout_size: int = 100,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        epochs_per_task: int = 1,
        seed: int = 0,
        synthetic_vocab: int = 64,
        synthetic_jump: float = 0.2,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.tasks = tasks  # checked and made a list of TaskSpec by _validate
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train_size = train_size
        self.holdout_size = holdout_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.epochs_per_task = epochs_per_task
        self.seed = seed
        self.synthetic_vocab = synthetic_vocab
        self.synthetic_jump = synthetic_jump
        self.num_workers = num_workers
        self._validate()
        self._hf_tokenizer: PreTrainedTokenizerBase | None = None
        self._train: dict[str, datasets.Dataset] = {}
        self._holdout: dict[str, datasets.Dataset] = {}

    def _validate(self) -> None:
        # Types first: the checks after them compare values and call str methods, which would raise
        # TypeError/AttributeError on a wrong type instead of naming the field.
        hints = {k: v for k, v in get_type_hints(type(self).__init__).items() if k not in ("tasks", "return")}
        problems = type_problems(self, "data", hints)
        if isinstance(self.tasks, list | tuple):
            specs = [_task_spec(task, f"data.tasks[{i}]", problems) for i, task in enumerate(self.tasks)]
        else:
            problems.append(
                f"data.tasks must be a list of tasks, got {type(self.tasks).__name__} {self.tasks!r}"
            )
        if problems:
            raise ConfigError("invalid data config:\n  - " + "\n  - ".join(problems))
        self.tasks = specs
        lowest = {
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
        for field, low in lowest.items():
            if getattr(self, field) < low:
                problems.append(f"data.{field}: must be >= {low}, got {getattr(self, field)}")
        if not 0.0 <= self.synthetic_jump < 1.0:
            problems.append(f"data.synthetic_jump: must lie in [0, 1), got {self.synthetic_jump}")
        if not self.tasks:
            problems.append("data.tasks: is empty; list at least one task, e.g. `- name: a` (synthetic)")
        seen: set[str] = set()
        for i, task in enumerate(self.tasks):
            where = f"data.tasks[{i}]"
            if not _TASK_NAME.fullmatch(task.name):
                problems.append(
                    f"{where}.name: {task.name!r} must be non-empty letters, digits, '_' or '-' "
                    "(it becomes a module key and a metric name)"
                )
            elif task.name in seen:
                problems.append(f"{where}.name: {task.name!r} is used twice; task names must be unique")
            seen.add(task.name)
            if task.format not in ("text", "prompt_response"):
                problems.append(f"{where}.format: must be 'text' or 'prompt_response', got {task.format!r}")
            kind = _source_kind(task.source)
            if kind != "synthetic" and self.tokenizer is None:
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
                path = _local_path(task.source)
                if path.suffix.lower() not in FILE_BUILDERS:
                    problems.append(f"{where}.source: {task.source!r} is not one of {sorted(FILE_BUILDERS)}")
                elif not _is_file(path):
                    problems.append(
                        f"{where}.source: file {task.source!r} does not exist (cwd {os.getcwd()})"
                    )
        if problems:
            raise ConfigError("invalid data config:\n  - " + "\n  - ".join(problems))

    # ----------------------------------------------------------------------------- task schedule

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def total_epochs(self) -> int:
        return self.num_tasks * self.epochs_per_task

    def task_index_at_epoch(self, epoch: int) -> int:
        """Index of the task trained in ``epoch``; epochs past the schedule stay on the last task."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    # ----------------------------------------------------------------------------- tokens

    @property
    def hf_tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The loaded tokenizer (lazily), or None when ``data.tokenizer`` is not set."""
        if self._hf_tokenizer is None and self.tokenizer is not None:
            self._hf_tokenizer = load_tokenizer(self.tokenizer)
        return self._hf_tokenizer

    @property
    def pad_token_id(self) -> int:
        tokenizer = self.hf_tokenizer
        return 0 if tokenizer is None else tokenizer.pad_token_id

    @property
    def vocab_size(self) -> int:
        """Token ids the data can contain: ``len(tokenizer)``, or ``3 + synthetic_vocab`` without a tokenizer."""
        tokenizer = self.hf_tokenizer
        return FIRST_TOKEN + self.synthetic_vocab if tokenizer is None else len(tokenizer)

    # ----------------------------------------------------------------------------- building

    def prepare_data(self) -> None:
        """Download hub datasets and the tokenizer into the local caches (runs once per node)."""
        if _offline():
            return
        if self.tokenizer is not None:
            load_tokenizer(self.tokenizer)  # fills the hub cache that setup() reads on every rank
        for i, task in enumerate(self.tasks):
            if _source_kind(task.source) == "hub":
                self._load_hub(i, task)

    def setup(self, stage: str | None = None) -> None:
        """Tokenise every task and split it into holdout and training sets; later calls do nothing."""
        if len(self._train) == self.num_tasks:
            return
        for i, task in enumerate(self.tasks):
            if task.name in self._train:
                continue
            examples = self._examples(i, task)
            self._holdout[task.name], self._train[task.name] = self._split(task, examples)

    def _examples(self, index: int, task: TaskSpec) -> datasets.Dataset:
        kind = _source_kind(task.source)
        if kind == "synthetic":
            if self.hf_tokenizer is not None and FIRST_TOKEN + self.synthetic_vocab > len(self.hf_tokenizer):
                raise ConfigError(
                    f"data.synthetic_vocab: task '{task.name}' uses ids up to {FIRST_TOKEN + self.synthetic_vocab - 1}"
                    f" but the tokenizer has {len(self.hf_tokenizer)}; lower data.synthetic_vocab"
                )
            try:
                seqs = permutation_sequences(
                    self.seed,
                    task.name,
                    self.train_size + self.holdout_size,
                    self.max_length,
                    self.synthetic_vocab,
                    self.synthetic_jump,
                ).tolist()
            except MemoryError as err:  # numpy refuses absurd sizes at once; say which settings to lower
                raise ConfigError(
                    f"task '{task.name}': {self.train_size + self.holdout_size} synthetic sequences of "
                    f"data.max_length={self.max_length} over data.synthetic_vocab={self.synthetic_vocab} tokens do "
                    "not fit in memory; lower data.train_size, data.holdout_size, data.max_length or "
                    "data.synthetic_vocab"
                ) from err
            return datasets.Dataset.from_dict({"input_ids": seqs, "labels": seqs})
        raw = self._load_file(index, task) if kind == "file" else self._load_hub(index, task)
        where = f"task '{task.name}' ({task.source})"
        fields = [task.text_field] if task.format == "text" else [task.prompt_field, task.response_field]
        names = ["text_field"] if task.format == "text" else ["prompt_field", "response_field"]
        for field, name in zip(fields, names, strict=True):
            if field not in raw.column_names:
                raise ConfigError(
                    f"{where}: field {field!r} is not in the data; its fields are {raw.column_names}; "
                    f"set data.tasks[{index}].{name} to one of them"
                )
            # Lists and objects would be tokenised as their Python repr, numbers in a text field
            # silently dropped as "blank"; prompt/response numbers are written as text (CSV reads
            # a column of digits as numbers).
            if not _is_text_feature(raw.features[field], numbers=task.format == "prompt_response"):
                feature = raw.features[field]
                held = "values of mixed types" if isinstance(feature, datasets.Json) else f"{feature} values"
                raise ConfigError(
                    f"{where}: field {field!r} holds {held}, not text; set data.tasks[{index}].{name} to a "
                    f"field of strings, or make every {field!r} value a string"
                )
        if task.format == "text":
            fn, fn_kwargs = _tokenize_text, {"field": task.text_field}
        else:
            fn = _tokenize_prompt_response
            fn_kwargs = {"prompt_field": task.prompt_field, "response_field": task.response_field}
        tokenized = raw.map(
            fn,
            batched=True,
            with_indices=True,
            batch_size=_MAP_BATCH,
            remove_columns=raw.column_names,
            fn_kwargs={"tokenizer": self.hf_tokenizer, "max_length": self.max_length, **fn_kwargs},
            desc=f"tokenising {task.name}",
        )
        if len(tokenized) == 0:
            if task.format == "text":
                reason = f"every {task.text_field!r} record is blank or missing"
            else:
                reason = (
                    f"no example has a response token within data.max_length={self.max_length} and at least "
                    f"2 tokens: prompts fill max_length or {task.prompt_field!r}/{task.response_field!r} are "
                    "empty; raise data.max_length or fix the fields"
                )
            raise ConfigError(f"{where}: no usable example ({len(raw)} records): {reason}")
        return tokenized

    def _load_file(self, index: int, task: TaskSpec) -> datasets.Dataset:
        if task.source.startswith(CORPUS_PREFIX):
            # A shipped domain: gzipped jsonl records {"text": ...}; `datasets` decompresses .gz itself.
            path = Path(corpus.domain_path(task.source.removeprefix(CORPUS_PREFIX)))
            builder = "json"
        else:
            path = _local_path(task.source)
            builder = FILE_BUILDERS[path.suffix.lower()]
        where = f"task '{task.name}' (data.tasks[{index}].source)"
        if not _is_file(path):
            raise ConfigError(f"{where}: file {str(path)!r} does not exist")
        if path.stat().st_size == 0:
            raise ConfigError(f"{where}: file {str(path)!r} is empty")
        if path.suffix.lower() in (".json", ".jsonl"):  # not the shipped .jsonl.gz domains
            problem = _json_problem(path)
            if problem:
                raise ConfigError(
                    f"{where}: file {str(path)!r} could not be read as json: {problem}; {_FILE_SHAPES['json']}"
                )
        try:
            raw = datasets.load_dataset(
                builder, data_files=str(path.resolve()), split="train", **_READ_OPTIONS.get(builder, {})
            )
        except Exception as err:
            cause = err.__cause__ or err
            if _caused_by(err, UnicodeDecodeError):
                problem = f"is not UTF-8 text ({cause})"
            elif "corresponds to no data" in str(cause):  # datasets' words for a file without records
                problem = "has no records"
            else:
                problem = f"could not be read as {builder} ({type(cause).__name__}: {cause})"
            raise ConfigError(f"{where}: file {str(path)!r} {problem}; {_FILE_SHAPES[builder]}") from err
        try:
            # The json and parquet readers take string bytes as they are; invalid UTF-8 would only
            # surface as a UnicodeDecodeError in the middle of tokenisation.
            raw.data.validate(full=True)
        except pa.ArrowInvalid as err:
            raise ConfigError(f"{where}: file {str(path)!r} is not UTF-8 text ({err}); {_FILE_SHAPES[builder]}") from err
        if len(raw) == 0:
            raise ConfigError(f"{where}: file {str(path)!r} is empty (no records)")
        return raw

    def _load_hub(self, index: int, task: TaskSpec) -> datasets.Dataset:
        where = f"task '{task.name}' (data.tasks[{index}].source)"
        try:
            raw = datasets.load_dataset(task.source, task.hub_config, split=task.hub_split)
        except Exception as err:
            if _offline() or _caused_by_network(err):
                raise ConfigError(
                    f"{where}: {task.source!r} is not a local file, so it was looked up as a hub dataset, but "
                    "this machine is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE or no connection) and it is "
                    f"not cached; point the source at a local file instead ({' '.join(sorted(FILE_BUILDERS))})"
                ) from err
            raise ConfigError(
                f"{where}: hub dataset {task.source!r} (config {task.hub_config!r}, split {task.hub_split!r}) "
                f"could not be loaded: {err}"
            ) from err
        if len(raw) == 0:
            raise ConfigError(f"{where}: hub dataset {task.source!r} split {task.hub_split!r} is empty")
        return raw

    def _split(self, task: TaskSpec, examples: datasets.Dataset) -> tuple[datasets.Dataset, datasets.Dataset]:
        """Seeded split by source record: holdout = the first ``holdout_size`` examples of the shuffled
        records, train = up to ``train_size`` examples of the records after them.

        A record cut into several blocks lies wholly on one side: the rest of the record that
        completes the holdout is used for neither.
        """
        n = len(examples)
        if n <= self.holdout_size:
            raise ConfigError(
                f"task '{task.name}' ({task.source}) has {n} examples after tokenisation, which leaves none for "
                f"training after data.holdout_size={self.holdout_size}; lower data.holdout_size or add data"
            )
        records = np.asarray(examples["record"]) if "record" in examples.column_names else np.arange(n)
        ids, dense = np.unique(records, return_inverse=True)
        rank = np.random.default_rng(self.seed).permutation(len(ids))[dense]  # shuffled position of each record
        order = np.lexsort((np.arange(n), rank))  # examples grouped by shuffled record, in-record order kept
        holdout = order[: self.holdout_size]
        rest = order[self.holdout_size :]
        rest = rest[rank[rest] != rank[holdout[-1]]]
        train = rest[: self.train_size]
        if len(train) == 0:
            raise ConfigError(
                f"task '{task.name}' ({task.source}): no training example is left after data.holdout_size="
                f"{self.holdout_size} (the source has {len(ids)} records); lower data.holdout_size or add data"
            )
        if len(train) < self.train_size:
            rank_zero_warn(
                f"task '{task.name}' ({task.source}): only {len(train)} training examples after the holdout, "
                f"fewer than data.train_size={self.train_size}; using all of them"
            )
        return examples.select(holdout), examples.select(train)

    def _require(self, task: str) -> None:
        if task not in self.task_names:
            raise ConfigError(f"unknown task {task!r}; the tasks are {self.task_names}")
        self.setup()

    # ----------------------------------------------------------------------------- loaders

    def train_dataloader(self) -> ResumableDataLoader:
        """The current epoch's task, this rank's shard (see the module docstring)."""
        trainer = self.trainer
        if trainer is None:
            return self.train_dataloader_for_epoch(0)
        epoch_bound = trainer.max_epochs is None or trainer.max_epochs < 0 or trainer.max_epochs > 1
        if self.total_epochs > 1 and epoch_bound and trainer.reload_dataloaders_every_n_epochs != 1:
            raise ConfigError(
                "trainer.reload_dataloaders_every_n_epochs must be 1 with several task epochs "
                f"({self.num_tasks} tasks x data.epochs_per_task={self.epochs_per_task}): the training data "
                "changes with the epoch"
            )
        return self.train_dataloader_for_epoch(trainer.current_epoch, trainer.global_rank, trainer.world_size)

    def train_dataloader_for_epoch(
        self, epoch: int, rank: int = 0, world_size: int = 1
    ) -> ResumableDataLoader:
        """Training batches of ``epoch``'s task for ``rank`` of ``world_size``, shuffled by ``(seed, epoch)``."""
        task = self.task_names[self.task_index_at_epoch(epoch)]
        self._require(task)
        data = self._train[task]
        sampler = ShardedBatchSampler(len(data), self.batch_size, self.seed, epoch, rank, world_size)
        return ResumableDataLoader(data, sampler, PadCollator(self.pad_token_id), task, self.num_workers)

    def train_batches_per_epoch(self, task_index: int, world_size: int = 1) -> int:
        """Batches each rank yields in one epoch of task ``task_index``."""
        task = self.task_names[task_index]
        self._require(task)
        return math.ceil(len(self._train[task]) / (self.batch_size * world_size))

    def holdout_batches(
        self, task: str, rank: int = 0, world_size: int = 1, batch_size: int | None = None
    ) -> list[dict[str, Tensor]]:
        """The holdout set of ``task``, examples ``rank::world_size``, in order, batched.

        Every rank gets the same number of batches with the same batch sizes (collectives inside
        a sharded forward, and all-gathers of per-example losses, need that): ranks short of
        ``ceil(holdout / world_size)`` examples repeat a real example with ``example_weight`` 0.
        Each batch carries ``example_weight`` ``(B,)`` float32, 1.0 for real examples.
        """
        if not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self._require(task)
        holdout = self._holdout[task]
        batch_size = batch_size or self.eval_batch_size
        indices = list(range(len(holdout)))[rank::world_size]
        weights = [1.0] * len(indices)
        per_rank = math.ceil(len(holdout) / world_size)
        indices += [0] * (per_rank - len(indices))
        weights += [0.0] * (per_rank - len(weights))
        collate = PadCollator(self.pad_token_id)
        batches = []
        for lo in range(0, per_rank, batch_size):
            rows = holdout[indices[lo : lo + batch_size]]
            examples = [
                {"input_ids": a, "labels": b} for a, b in zip(rows["input_ids"], rows["labels"], strict=True)
            ]
            batch = collate(examples)
            batch["example_weight"] = torch.tensor(weights[lo : lo + batch_size], dtype=torch.float32)
            batches.append(batch)
        return batches

    def _holdout_loaders(self) -> list[DataLoader]:
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit":
            # During fit, callbacks.evaluation.ContinualEvaluation evaluates every task at task
            # boundaries; a per-epoch validation loop would only repeat that work.
            return []
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return [
            DataLoader(self.holdout_batches(task, rank, world), batch_size=None, shuffle=False)
            for task in self.task_names
        ]

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per task over its holdout set (rank shard), for ``validate``; empty during fit."""
        return self._holdout_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        """Same as :meth:`val_dataloader`, for the ``test`` subcommand."""
        return self._holdout_loaders()
