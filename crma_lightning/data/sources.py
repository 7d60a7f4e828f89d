"""Reading a task's raw records: local files, shipped corpus domains and hub datasets.

Every way a source can be wrong (missing, empty, not UTF-8, not JSON objects, a field that is not
text, a hub name on an offline machine) becomes one :class:`~crma_lightning.adapters.config.ConfigError`
that names the task, the file or field, and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from crma_lightning import corpus
from crma_lightning.backbone.hub import is_offline
from crma_lightning.core.errors import ConfigError
from crma_lightning.data.tasks import (
    CORPUS_PREFIX,
    FILE_BUILDERS,
    TaskSpec,
    is_file,
    local_path,
    split_sources,
)

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


def load_records(index: int, task: TaskSpec, kind: str, split: str = "train") -> datasets.Dataset:
    """The raw records of one split of a non-synthetic task (``split_sources``), with the fields it
    reads checked to hold text."""
    source = split_sources(task)[split]
    raw = load_hub(index, task, source) if kind == "hub" else load_file(index, task, source)
    check_fields(raw, index, task)
    return raw


def check_fields(raw: datasets.Dataset, index: int, task: TaskSpec) -> None:
    where = f"task '{task.name}' ({task.source})"
    names = {
        "text": ["text_field"],
        "prompt_response": ["prompt_field", "response_field"],
        "classification": ["text_field", "label_field"],
    }[task.format]
    fields = [getattr(task, name) for name in names]
    if task.format == "classification":
        _check_label_field(raw, index, task, where)
        fields, names = fields[:1], names[:1]
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


def _check_label_field(raw: datasets.Dataset, index: int, task: TaskSpec, where: str) -> None:
    field = task.label_field
    if field not in raw.column_names:
        raise ConfigError(
            f"{where}: field {field!r} is not in the data; its fields are {raw.column_names}; "
            f"set data.tasks[{index}].label_field to one of them"
        )
    feature = raw.features[field]
    if isinstance(feature, datasets.ClassLabel):
        return
    dtype = feature.dtype if isinstance(feature, datasets.Value) else None
    if dtype not in ("string", "large_string") and not (dtype or "").startswith(("int", "uint")):
        raise ConfigError(
            f"{where}: label field {field!r} holds {feature} values; a label is a string of the label set or an "
            "integer index into it"
        )


def load_file(index: int, task: TaskSpec, source: str | None = None) -> datasets.Dataset:
    """The records of a local file: ``source`` (a split's file), by default the task's source."""
    source = task.source if source is None else source
    if source.startswith(CORPUS_PREFIX):
        # A shipped domain: gzipped jsonl records {"text": ...}; `datasets` decompresses .gz itself.
        path = Path(corpus.domain_path(source.removeprefix(CORPUS_PREFIX)))
        builder = "json"
    else:
        path = local_path(source)
        builder = FILE_BUILDERS[path.suffix.lower()]
    where = f"task '{task.name}' (data.tasks[{index}].source)"
    if not is_file(path):
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
        raise ConfigError(
            f"{where}: file {str(path)!r} is not UTF-8 text ({err}); {_FILE_SHAPES[builder]}"
        ) from err
    if len(raw) == 0:
        raise ConfigError(f"{where}: file {str(path)!r} is empty (no records)")
    return raw


def load_hub(index: int, task: TaskSpec, split: str | None = None) -> datasets.Dataset:
    """One split of a hub dataset (default ``hub_split``, the training data)."""
    where = f"task '{task.name}' (data.tasks[{index}].source)"
    split = task.hub_split if split is None else split
    try:
        raw = datasets.load_dataset(task.source, task.hub_config, split=split)
    except Exception as err:
        if is_offline() or _caused_by_network(err):
            raise ConfigError(
                f"{where}: {task.source!r} is not a local file, so it was looked up as a hub dataset, but "
                "this machine is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE or no connection) and it is "
                f"not cached; point the source at a local file instead ({' '.join(sorted(FILE_BUILDERS))})"
            ) from err
        raise ConfigError(
            f"{where}: hub dataset {task.source!r} (config {task.hub_config!r}, split {split!r}) "
            f"could not be loaded: {err}"
        ) from err
    if len(raw) == 0:
        raise ConfigError(f"{where}: hub dataset {task.source!r} split {split!r} is empty")
    return raw


def _caused_by(
    err: BaseException | None, kind: type[BaseException] | tuple[type[BaseException], ...]
) -> bool:
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
            return (
                None
                if bad is None
                else f"element {bad} of the list is {_snippet(document[bad])}, not an object"
            )
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
