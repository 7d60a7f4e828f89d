"""Fuzzing: generated configs and data files thrown at config parsing and the data module.

The property everywhere: whatever the input (odd encodings, NUL bytes, invalid UTF-8, BOMs, CRLF,
a 1 MB line, wrong types, empty fields, JSON lines that are not objects, numbers where text is
expected, missing columns, empty files), nothing escapes but ``ConfigError``, and its message names
the field (``data.tasks[0].source``, ``data.holdout_size``, ...) or the file. Valid-but-odd files
load, and every record comes back token for token. Real files, the real tokenizer, no mocks.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import inspect
import io
import itertools
import json
import re
import sys
from pathlib import Path
from unittest.mock import patch

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from crma_lightning.adapters.config import CRMAConfig, LoRAConfig
from crma_lightning.backbone.loading import BackboneConfig
from crma_lightning.cli.fit import ContinualCLI, main
from crma_lightning.core.errors import ConfigError
from crma_lightning.data import IGNORE_INDEX, ContinualDataModule, TaskSpec, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SUFFIXES = [".txt", ".jsonl", ".json", ".csv", ".parquet"]
FIELD_NAMES = ["text", "prompt", "response", "other", ""]
_names = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def _private_datasets_cache(tmp_path_factory):
    # Module-scoped (hypothesis re-runs a test body without re-running function fixtures).
    cache, datasets.config.HF_DATASETS_CACHE = (
        datasets.config.HF_DATASETS_CACHE,
        str(tmp_path_factory.mktemp("hf")),
    )
    datasets.disable_progress_bars()
    yield
    datasets.config.HF_DATASETS_CACHE = cache
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _write(workdir: Path, suffix: str, content: bytes) -> Path:
    # A fresh name per example: never let a cache keyed by path serve an earlier example's data.
    path = workdir / f"f{next(_names)}{suffix}"
    path.write_bytes(content)
    return path


def _load(path: Path, task: dict | None = None, **kwargs) -> ContinualDataModule:
    config = {"tokenizer": "tiny", "max_length": 16, "train_size": 8, "holdout_size": 1, "batch_size": 2}
    dm = ContinualDataModule([TaskSpec("t", source=str(path), **(task or {}))], **{**config, **kwargs})
    dm.setup()
    return dm


def _event(label: str) -> None:
    """Tally outcomes for ``--hypothesis-show-statistics`` (a no-op in the plain tests)."""
    if currently_in_test_context():
        event(label)


def _assert_clear(err: ConfigError, *names: str) -> None:
    """The message names one of ``names`` (a file path or a field) and does not echo the input."""
    message = str(err)
    _event("ConfigError: " + re.sub(r"'[^']*'|\d+", "_", message.splitlines()[-1])[:60])
    assert any(name in message for name in names), message
    assert len(message) < 4000, message[:500]


def _assert_well_formed(dm: ContinualDataModule) -> None:
    _event("loaded")
    for task in dm.task_names:
        batches = [
            *dm.holdout_batches(task),
            *dm.train_dataloader_for_epoch(dm.task_names.index(task) * dm.epochs_per_task),
        ]
        assert batches
        for batch in batches:
            ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
            assert ids.shape == labels.shape == mask.shape and ids.shape[1] <= dm.max_length
            assert ((ids >= 0) & (ids < dm.vocab_size)).all()
            assert ((labels == IGNORE_INDEX) | (labels == ids)).all()
            assert (mask.sum(1) >= 2).all()


# ----------------------------------------------------------------------------- generated files

_texts = st.one_of(st.text(max_size=30), st.text(alphabet="\x00\r\n\t \ufeff\u2028é", max_size=6))
_scalars = st.one_of(
    _texts,
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.booleans(),
    st.none(),
)
_values = st.one_of(
    _scalars,
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def _records(draw) -> list:
    """Records that are mostly objects of text, sometimes of any JSON value, sometimes not objects."""
    values = draw(st.sampled_from([_texts, _texts, _values]))
    record = st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=4)
    if draw(st.integers(0, 3)) == 0:  # a JSON line that is a number, a list, a string, null
        record = st.one_of(record, _values)
    return draw(st.lists(record, max_size=12))


def _serialise(suffix: str, records: list, data: st.DataObject) -> bytes:
    if suffix == ".jsonl":
        ascii_only = data.draw(st.booleans())
        return "\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in records).encode(
            "utf-8", "surrogatepass"
        )
    if suffix == ".json":
        return json.dumps(records).encode()
    if suffix == ".txt":
        return "\n".join(str(r.get("text") if isinstance(r, dict) else r) for r in records).encode(
            "utf-8", "replace"
        )
    rows = [r if isinstance(r, dict) else {"text": r} for r in records]
    if suffix == ".csv":
        columns = sorted({k for r in rows for k in r}) or ["text"]
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows([[r.get(c, "") for c in columns] for r in rows])
        return out.getvalue().encode("utf-8", "replace")
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError, OverflowError):  # mixed types no Parquet column can hold
        table = pa.table({"text": [json.dumps(r) for r in rows]})
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def _mangle(content: bytes, data: st.DataObject) -> bytes:
    """Re-encode, change line ends, splice in bytes, truncate: some of the damage files suffer."""
    encoding = data.draw(st.sampled_from(["keep", "utf-8-bom", "utf-16", "latin-1"]))
    if encoding != "keep":
        text = content.decode("utf-8", "replace")
        content = b"\xef\xbb\xbf" + content if encoding == "utf-8-bom" else text.encode(encoding, "replace")
    if data.draw(st.booleans()):
        content = content.replace(b"\n", b"\r\n")
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.integers(0, len(content)))
        junk = data.draw(
            st.sampled_from([b"\x00", b"\xff", b"\x80\x80", b"\xef\xbb\xbf", b"\r", b'"', b"{", b","])
        )
        content = content[:at] + junk + content[at:]
    if data.draw(st.booleans()):
        content = content[: data.draw(st.integers(0, len(content)))]
    return content


_task_options = st.fixed_dictionaries(
    {"format": st.sampled_from(["text", "prompt_response"])},
    optional={
        "text_field": st.sampled_from(FIELD_NAMES),
        "prompt_field": st.sampled_from(FIELD_NAMES),
        "response_field": st.sampled_from(FIELD_NAMES),
    },
)
_sizes = st.fixed_dictionaries(
    {
        "max_length": st.sampled_from([2, 3, 16, 64]),
        "holdout_size": st.integers(1, 3),
        "train_size": st.sampled_from([1, 4, 50]),
        "batch_size": st.integers(1, 4),
        "eval_batch_size": st.integers(1, 3),
    }
)


@settings(FUZZ, max_examples=80)
@given(data=st.data(), suffix=st.sampled_from(SUFFIXES), records=_records(), task=_task_options, sizes=_sizes)
def test_generated_files_load_or_fail_naming_the_file(workdir, data, suffix, records, task, sizes):
    content = _serialise(suffix, records, data)
    if data.draw(st.booleans(), label="mangle"):
        content = _mangle(content, data)
    path = _write(workdir, suffix, content)
    try:
        dm = _load(path, task, **sizes)
    except ConfigError as err:
        _assert_clear(err, str(path))
        return
    _assert_well_formed(dm)


@settings(FUZZ, max_examples=40)
@given(suffix=st.sampled_from(SUFFIXES), content=st.binary(max_size=400), task=_task_options)
def test_random_bytes_load_or_fail_naming_the_file(workdir, suffix, content, task):
    path = _write(workdir, suffix, content)
    try:
        dm = _load(path, task)
    except ConfigError as err:
        _assert_clear(err, str(path))
        return
    _assert_well_formed(dm)


# ----------------------------------------------------------------------------- valid but odd files

# Anything but surrogates (not encodable) and the line breaks that end a .txt record.
_record_text = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), min_size=1, max_size=30
)
_records_text = st.lists(_record_text.filter(str.strip), min_size=2, max_size=8)


def _odd_but_valid(suffix: str, rows: list[dict[str, str]], bom: bool, crlf: bool) -> bytes:
    newline = "\r\n" if crlf else "\n"
    if suffix == ".txt":
        body = "".join(row["text"] + newline for row in rows)
    elif suffix == ".jsonl":
        body = "".join(json.dumps(row, ensure_ascii=False) + newline for row in rows)
    elif suffix == ".json":
        body = json.dumps(rows, ensure_ascii=False, indent=1).replace("\n", newline)
    elif suffix == ".csv":
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator=newline)
        writer.writeheader()
        writer.writerows(rows)
        body = out.getvalue()
    else:
        out = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), out)
        return out.getvalue()
    return (b"\xef\xbb\xbf" if bom else b"") + body.encode()


@settings(FUZZ, max_examples=40)
@given(
    suffix=st.sampled_from(SUFFIXES),
    fmt=st.sampled_from(["text", "prompt_response"]),
    records=_records_text,
    bom=st.booleans(),
    crlf=st.booleans(),
)
def test_valid_but_odd_files_keep_every_record(workdir, suffix, fmt, records, bom, crlf):
    if suffix == ".txt":
        fmt = "text"  # a .txt file has one field
    rows = [{"text": r} if fmt == "text" else {"prompt": r, "response": r[::-1]} for r in records]
    if suffix == ".csv":
        rows.append({k: "plain words" for k in rows[0]})  # so pandas cannot read a column as numbers
    path = _write(workdir, suffix, _odd_but_valid(suffix, rows, bom, crlf))
    dm = _load(path, {"format": fmt}, max_length=1024, train_size=100, holdout_size=1)
    _assert_well_formed(dm)
    tok = load_tokenizer("tiny")
    examples = [*dm._holdout["t"], *dm._train["t"]]
    if fmt == "text":
        got = [{"text": tok.decode(ex["input_ids"][:-1])} for ex in examples]  # minus the eos
    else:
        got = [
            {
                "prompt": tok.decode(
                    [i for i, y in zip(ex["input_ids"], ex["labels"], strict=True) if y == IGNORE_INDEX]
                ),
                "response": tok.decode([y for y in ex["labels"] if y != IGNORE_INDEX][:-1]),
            }
            for ex in examples
        ]
    key = lambda row: sorted(row.items())  # noqa: E731
    assert sorted(got, key=key) == sorted(rows, key=key)


def test_a_one_megabyte_line_is_cut_into_blocks(workdir):
    line = ("lorem ipsum dolor sit amet " * 40_000)[:1_000_000]
    path = _write(workdir, ".txt", f"{line}\nshort record\n".encode())
    dm = _load(path, max_length=512, train_size=4)
    _assert_well_formed(dm)


def test_csv_records_that_look_like_missing_values_are_kept(workdir):
    path = _write(workdir, ".csv", b"text\nNA\nNone\nnull\nN/A\nnan\n")
    dm = _load(path, train_size=10)
    tok = load_tokenizer("tiny")
    got = sorted(tok.decode(ex["input_ids"][:-1]) for ex in [*dm._holdout["t"], *dm._train["t"]])
    assert got == sorted(["NA", "None", "null", "N/A", "nan"])


# ----------------------------------------------------------------------------- named bad inputs

BAD_FILES = {
    "empty file": (".jsonl", b"", {}, "is empty"),
    "only blank lines": (".txt", b"\n \n\t\n", {}, "blank"),
    "json line not an object": (".jsonl", b'[1, 2]\n"text"\n', {}, "line 1 is [1, 2], not a JSON object"),
    "json lines of numbers": (".jsonl", b"1\n2\n", {}, "one JSON object per line"),
    # A bare null starting a block, or deep nesting, segfaults pyarrow's JSON reader: caught before it.
    "null as the first json line": (".jsonl", b'null\n{"text": "a b"}\n', {}, "line 1 is null"),
    "null after records": (".jsonl", b'{"text": "a b"}\n' * 3 + b"null\n", {}, "line 4 is null"),
    "json list holding null": (".json", b'[null, {"text": "a b"}]', {}, "element 0 of the list is null"),
    "json list of strings": (".json", b'["a b", "c d"]', {}, 'element 0 of the list is "a b"'),
    "deep nesting": (".jsonl", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", {}, "too deeply"),
    "empty objects": (".jsonl", b"{}\n{}\n", {}, "has no records"),
    "invalid utf-8 in a json string": (
        ".jsonl",
        b'{"text": "a"}\n{"text": "caf\xe9"}\n',
        {},
        "line 2 is not UTF-8",
    ),
    "invalid utf-8 text": (".txt", b"caf\xe9\n" * 3, {}, "is not UTF-8 text"),
    "utf-16 text": (".txt", "hello\nworld\n".encode("utf-16"), {}, "is not UTF-8 text"),
    "utf-16 csv": (".csv", "text\nhello\n".encode("utf-16"), {}, "is not UTF-8 text"),
    "NUL inside a json string": (".jsonl", b'{"text": "a\x00b"}\n', {}, "could not be read as json"),
    "csv header only": (".csv", b"text\n", {}, "has no records"),
    "missing column": (".jsonl", b'{"body": "hello"}\n' * 3, {}, "data.tasks[0].text_field"),
    "missing response": (
        ".jsonl",
        b'{"prompt": "q"}\n' * 3,
        {"format": "prompt_response"},
        "data.tasks[0].response_field",
    ),
    "numbers as text": (".jsonl", b'{"text": 1}\n{"text": 2}\n', {}, "data.tasks[0].text_field"),
    "csv column of numbers": (".csv", b"text\n1\n2\n3\n", {}, "data.tasks[0].text_field"),
    "mixed types": (".jsonl", b'{"text": "a b"}\n{"text": 5}\n', {}, "values of mixed types"),
    "list as a prompt": (
        ".jsonl",
        b'{"prompt": ["q"], "response": "a"}\n' * 3,
        {"format": "prompt_response"},
        "data.tasks[0].prompt_field",
    ),
    "object as text": (".jsonl", b'{"text": {"a": 1}}\n' * 3, {}, "data.tasks[0].text_field"),
    "not parquet": (".parquet", b"PAR1 this is not parquet PAR1", {}, "could not be read as parquet"),
    "one record for holdout and train": (".txt", b"only one record\n", {}, "data.holdout_size"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_files_name_the_problem_and_the_file(workdir, case):
    suffix, content, task, says = BAD_FILES[case]
    path = _write(workdir, suffix, content)
    with pytest.raises(ConfigError) as err:
        _load(path, task)
    _assert_clear(err.value, str(path))
    assert says in str(err.value)


def test_numbers_as_prompt_and_response_are_text(workdir):
    path = _write(workdir, ".csv", b"prompt,response\n1,2\n3,4\n5,6\n")
    dm = _load(path, {"format": "prompt_response"})
    _assert_well_formed(dm)


# ----------------------------------------------------------------------------- data module arguments

_anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.floats(),
    st.text(max_size=4),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


_bad_sources = st.sampled_from(
    [
        "corpus:nope",
        "missing.jsonl",
        "notes.docx",
        "~no-such-user-here/a.txt",
        "a" * 300 + ".txt",
        "a\x00b.txt",
        "",
        "no-such-org/no-such-dataset",
    ]
)
_bad_tasks = st.one_of(
    st.builds(
        TaskSpec,
        name=st.sampled_from(["a", "a b", ""]) | _anything,
        source=_bad_sources | _anything,
        format=st.sampled_from(["text", "prompt_response", "chat"]) | _anything,
        text_field=_anything,
        hub_config=_anything,
    ),
    st.fixed_dictionaries(
        {"name": st.sampled_from(["a", "b"])}, optional={"source": _bad_sources, "bogus": _anything}
    ),
    st.dictionaries(st.text(max_size=5), _anything, max_size=3),
    _anything,
)
_good_tasks = st.lists(
    st.builds(TaskSpec, name=st.sampled_from(["a", "b", "c"])),  # synthetic: files are fuzzed above
    min_size=1,
    max_size=3,
    unique_by=lambda t: t.name,
)
_good_arguments = {
    "tasks": _good_tasks,
    "tokenizer": st.just("tiny"),
    "max_length": st.integers(2, 24),
    "train_size": st.integers(1, 24),
    "holdout_size": st.integers(1, 8),
    "batch_size": st.integers(1, 8),
    "eval_batch_size": st.integers(1, 8),
    "epochs_per_task": st.integers(1, 3),
    "seed": st.integers(0, 2**70),
    "synthetic_vocab": st.integers(2, 64),
    "synthetic_jump": st.floats(0, 1, exclude_max=True),
    "num_workers": st.just(0),
}
_bad_arguments = {
    "tasks": st.lists(_bad_tasks, max_size=3) | _anything,
    "tokenizer": st.sampled_from(["", "no/such-tokenizer", "x.gguf", "/"]) | _anything,
    "max_length": st.integers(-(2**70), 1) | _anything,
    "synthetic_jump": st.floats(min_value=1)
    | st.floats(max_value=0, exclude_max=True)
    | st.just(float("nan"))
    | _anything,
    **{name: st.integers(-(2**70), -1) | _anything for name in ["train_size", "seed", "num_workers"]},
    **{
        name: st.integers(-3, 0) | _anything
        for name in ["holdout_size", "batch_size", "eval_batch_size", "epochs_per_task"]
    },
    "synthetic_vocab": st.integers(-3, 1) | _anything,
}


@settings(FUZZ, max_examples=60)
@given(arguments=st.fixed_dictionaries(_good_arguments))
def test_valid_data_module_arguments_load(arguments):
    dm = ContinualDataModule(**arguments)
    dm.setup()
    _assert_well_formed(dm)


@settings(FUZZ, max_examples=150)
@given(data=st.data(), field=st.sampled_from(sorted(_bad_arguments)))
def test_a_bad_data_module_argument_is_named(data, field):
    arguments = data.draw(st.fixed_dictionaries({**_good_arguments, field: _bad_arguments[field]}))
    try:
        dm = ContinualDataModule(**arguments)
        dm.setup()
    except ConfigError as err:
        _assert_clear(err, f"data.{field}")
        return
    _assert_well_formed(dm)  # the "bad" draw was a valid value after all (e.g. tokenizer None)


# ----------------------------------------------------------------------------- adapter and backbone configs

_config_values = _anything | st.sampled_from(
    ["additive", "subspace", "sinkhorn", "birkhoff", "block_output", "float32", "bfloat16", "all-linear"]
)


PREFIXES = {CRMAConfig: "model.crma", LoRAConfig: "model.lora", BackboneConfig: "model.backbone"}


def _config_strategy(cls):
    fields = dataclasses.fields(cls)
    return st.builds(cls, **{f.name: _config_values | st.just(getattr(cls(), f.name)) for f in fields})


@settings(FUZZ, max_examples=300)
@given(
    config=st.one_of(
        _config_strategy(CRMAConfig), _config_strategy(LoRAConfig), _config_strategy(BackboneConfig)
    ),
)
def test_adapter_and_backbone_configs_report_problems_naming_the_field(config):
    prefix = PREFIXES[type(config)]
    problems = config.problems(prefix)
    assert all(isinstance(p, str) and p.startswith((f"{prefix}.", f"{prefix}:")) for p in problems), problems
    if isinstance(config, BackboneConfig):
        return
    if problems:
        with pytest.raises(ConfigError):
            config.validate()
    else:
        assert config.validate() is config


# ----------------------------------------------------------------------------- the CLI


class ParseOnly(ContinualCLI):
    def instantiate_classes(self) -> None:  # parse and validate, build nothing
        pass


def _parse(*args: str) -> tuple[ParseOnly | None, int | None, str]:
    """(cli, None, stderr) when the arguments parse, (None, exit code, stderr) when the parser exits."""
    err = io.StringIO()
    # LightningCLI warns when sys.argv (here pytest's) holds arguments besides `args`.
    argv = patch.object(sys, "argv", ["train.py"])
    with argv, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return ParseOnly(args=list(args), run=False), None, err.getvalue()
        except SystemExit as exit_:
            return None, exit_.code, err.getvalue()


_KEYS = ["max_length", "train_size", "holdout_size", "seed", "synthetic_jump", "tokenizer", "tasks"]
_KEYS += ["streams", "temperature", "form", "r", "dropout", "target_modules"]  # model.crma, model.lora
_YAML_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.floats(allow_nan=False),
    st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=6),
    st.lists(st.integers(0, 3) | st.text(max_size=2), max_size=2),
    st.dictionaries(
        st.sampled_from(["name", "source", "format", "bogus"]),
        st.text(max_size=4) | st.integers(),
        max_size=3,
    ),
    st.lists(
        st.dictionaries(
            st.sampled_from(["name", "source", "format", "bogus"]), st.sampled_from(["a", "b", "x.jsonl", 3])
        ),
        max_size=2,
    ),
)


@pytest.mark.e2e
@settings(FUZZ, max_examples=30)
@given(
    section=st.sampled_from(["data", "model.crma", "model.lora"]),
    key=st.sampled_from(_KEYS),
    value=_YAML_VALUES,
    bom=st.booleans(),
    crlf=st.booleans(),
)
def test_cli_rejects_a_bad_value_naming_its_key(workdir, section, key, value, bom, crlf):
    override: dict = {}
    node = override
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    text = yaml.safe_dump(override, allow_unicode=True)
    content = (b"\xef\xbb\xbf" if bom else b"") + text.replace("\n", "\r\n" if crlf else "\n").encode()
    path = _write(workdir, ".yaml", content)
    cli, code, stderr = _parse("--config", str(REPO / "configs" / "tiny.yaml"), "--config", str(path))
    if cli is None:
        assert code == 2 and "error:" in stderr
        error = stderr[stderr.rindex("error:") :]  # the usage text before it lists every key
        assert section in error and key in error, error
        return
    # Parsed: the key must belong to the section (an unknown key accepted silently is a bug), and
    # the section's own checks take over. A value that passes them must arrive as it was given.
    # (jsonargparse flattens nested mappings into dotted keys, so an empty mapping is no key at all.)
    if value == {}:
        return
    if section == "data":
        assert key in inspect.signature(ContinualDataModule).parameters, (section, key)
        try:
            obj = ContinualDataModule(**cli.config.data.as_dict())
        except ConfigError as err:
            _assert_clear(err, "data.")
            return
    else:
        cls = CRMAConfig if section == "model.crma" else LoRAConfig
        assert key in {f.name for f in dataclasses.fields(cls)}, (section, key)
        obj = cls(**cli.config[section].as_dict())
        problems = obj.problems(section)
        assert all(p.startswith(f"{section}.") for p in problems), problems
        if problems:
            return
    got = getattr(obj, key)
    if key == "tasks":  # TaskSpecs from the given mappings
        got, value = [t.name for t in got], [t["name"] for t in value]
    assert got == value, (section, key, value, got)


@pytest.mark.e2e
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_cli_mangled_config_file_parses_or_exits_with_a_message(workdir, data):
    text = (REPO / "configs" / "tiny.yaml").read_text()
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 20))
        junk = data.draw(
            st.sampled_from(["", "\x00", "\ufeff", ":", "- ", "\t", "{", "'", "é", "\n  x: 1\n"])
        )
        text = text[:at] + junk + text[at + cut :]
    path = _write(workdir, ".yaml", text.encode())
    cli, code, stderr = _parse("--config", str(path))
    assert cli is not None or (code == 2 and "error:" in stderr), stderr[-2000:]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "content",
    [b"data:\n  seed: 0 # caf\xe9\n", "data:\n  seed: 0\n".encode("utf-16")],
    ids=["latin-1", "utf-16"],
)
def test_cli_config_file_that_is_not_utf8_exits_with_a_message(workdir, content):
    # jsonargparse lets the UnicodeDecodeError through the CLI class; the entry point catches it.
    path = _write(workdir, ".yaml", content)
    err = io.StringIO()
    with (
        patch.object(sys, "argv", ["train.py"]),
        contextlib.redirect_stderr(err),
        pytest.raises(SystemExit) as exit_,
    ):
        main(["fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--config", str(path)])
    assert exit_.value.code == 2 and "not UTF-8" in err.getvalue() and "Traceback" not in err.getvalue()
