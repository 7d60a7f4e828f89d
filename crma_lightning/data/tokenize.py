"""Tokenizers and tokenisation: from raw records (or synthetic tasks) to ``input_ids``/``labels``.

Examples are lists of token ids with unshifted labels (``IGNORE_INDEX`` on unscored tokens, see
:mod:`crma_lightning.core.losses`) and the index of the source record they came from, so the
holdout split can keep a record's blocks on one side.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import datasets
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from crma_lightning.backbone.hub import converted_gguf, resolve_path
from crma_lightning.core.errors import ConfigError
from crma_lightning.core.losses import IGNORE_INDEX
from crma_lightning.data.sources import local_path
from crma_lightning.data.synthetic import FIRST_TOKEN, permutation_sequences
from crma_lightning.data.tasks import DEFAULT_INSTRUCTION, TASK_FILE, TaskSpec

TINY_TOKENIZER = "tiny"
"""``tokenizer`` value that selects the 512-token BPE shipped in ``crma_lightning/assets``."""

_MAP_BATCH = 1000


def tiny_tokenizer_path() -> str:
    """Folder of the 512-token byte-level BPE shipped with the package (``<pad>`` = 0, eos = 1)."""
    try:
        root = resources.files("crma_lightning")
    except (TypeError, NotADirectoryError):
        # Python < 3.12 cannot anchor resources in a namespace package (no __init__.py, as under an
        # editable install); the package folder above this module is the same place.
        root = Path(__file__).parents[1]
    return str(root / "assets" / "tiny_tokenizer")


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub name, local folder, ``tiny`` or ``path/to/model.gguf``; pad falls
    back to eos."""
    if name == TINY_TOKENIZER:
        name = tiny_tokenizer_path()
    try:
        if name.endswith(".gguf"):
            # The converted checkpoint's tokenizer, not the GGUF file's (docs/decisions.md).
            path = local_path(resolve_path(name, "data.tokenizer"))
            folder = converted_gguf(str(path.parent), path.name, "data.tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                resolve_path(name, "data.tokenizer"), trust_remote_code=False
            )
    except ConfigError:
        raise
    except Exception as err:
        # transformers raises OSError, ValueError (bad repo id, folder without a tokenizer) and
        # others depending on what is wrong; all mean the same thing to the user.
        raise ConfigError(
            f"data.tokenizer: {name!r} could not be loaded ({type(err).__name__}: {err}); give a hub name "
            "cached on this machine, a local folder with tokenizer files, path/to/model.gguf, "
            "package:<module>/<file>, or 'tiny'"
        ) from err
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"data.tokenizer: '{name}' has no eos token; the data pipeline ends every example with it"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_text(
    batch: dict[str, list],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    field: str,
    max_length: int,
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


def tokenize_prompt_response(
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


def choice_ids(task: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """The target of each label of a classification task: ``answer_prefix`` + label, then eos."""
    eos = tokenizer.eos_token_id
    targets = tokenizer(
        [task.answer_prefix + label for label in task.labels], add_special_tokens=False
    ).input_ids
    return [[*ids, eos] for ids in targets]


def resolve_labels(task: TaskSpec, raw: datasets.Dataset, index: int) -> TaskSpec:
    """A classification task with its label set: given, else the label field's class names; every
    label value of ``raw`` checked to be in the set (a string of it, or an index into it)."""
    where = f"task '{task.name}' ({task.source})"
    feature = raw.features[task.label_field]
    labels = task.labels
    if labels is None and isinstance(feature, datasets.ClassLabel):
        labels = list(feature.names)
    if labels is None:
        raise ConfigError(
            f"{where}: a classification task needs its label set: set data.tasks[{index}].labels, or put a "
            f'{TASK_FILE} with "labels" beside the data'
        )
    values = raw.unique(task.label_field)
    unknown = [
        v
        for v in values
        if not (isinstance(v, str) and v in labels) and not (isinstance(v, int) and 0 <= v < len(labels))
    ]
    if unknown:
        raise ConfigError(
            f"{where}: label values {sorted(map(repr, unknown))[:5]} are not in the label set {labels} "
            f"(a label is one of its strings or an index into it); fix data.tasks[{index}].labels or the data"
        )
    return dataclasses.replace(task, labels=list(labels), instruction=task.instruction or DEFAULT_INSTRUCTION)


def tokenize_classification(
    batch: dict[str, list],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    max_length: int,
) -> dict[str, list]:
    """``template`` filled from each record + ``answer_prefix`` + label + eos; labels -100 on the prompt.

    The prompt is tokenised in three pieces, the template before ``{text}`` (with the tokenizer's
    special tokens, e.g. a Llama BOS), the text and the template after it, so that only the text is
    cut when the example would exceed ``max_length`` (with room for the longest label): the
    instruction, options and answer cue always survive. Training and evaluation use the same pieces.
    ``target`` is the label's index in ``task.labels``.
    """
    labels = task.labels
    position = {label: i for i, label in enumerate(labels)}
    head, tail = task.template.split("{text}")
    common = {"instruction": task.instruction, "options": ", ".join(labels)}
    records = [dict(zip(batch, row, strict=True)) for row in zip(*batch.values(), strict=True)]
    try:
        heads = [head.format_map({**r, **common}) for r in records]
        tails = [tail.format_map({**r, **common}) for r in records]
    except (KeyError, IndexError) as err:
        raise ConfigError(
            f"task '{task.name}': template field {err} is not a field of the data ({list(batch)}) nor "
            "instruction/options/text; fix data.tasks[].template"
        ) from None
    texts = ["" if r[task.text_field] is None else str(r[task.text_field]) for r in records]
    head_ids = tokenizer(heads).input_ids
    text_ids = tokenizer(texts, add_special_tokens=False).input_ids
    tail_ids = tokenizer(tails, add_special_tokens=False).input_ids
    choices = choice_ids(task, tokenizer)
    longest = max(len(c) for c in choices)
    out: dict[str, list] = {"input_ids": [], "labels": [], "record": [], "target": []}
    for record, r, h, x, t in zip(indices, records, head_ids, text_ids, tail_ids, strict=True):
        budget = max_length - len(h) - len(t) - longest
        if budget < 1:
            continue  # not even one text token fits: dropped (an error if every example is)
        value = r[task.label_field]
        target = position[value] if isinstance(value, str) else int(value)
        prompt = h + x[:budget] + t
        out["input_ids"].append(prompt + choices[target])
        out["labels"].append([IGNORE_INDEX] * len(prompt) + choices[target])
        out["record"].append(record)
        out["target"].append(target)
    return out


def tokenize_records(
    raw: datasets.Dataset, task: TaskSpec, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Tokenise a task's records (``format: text``, ``prompt_response`` or ``classification``, whose
    labels are resolved already); an error if none is usable."""
    where = f"task '{task.name}' ({task.source})"
    if task.format == "text":
        fn, fn_kwargs = tokenize_text, {"field": task.text_field}
    elif task.format == "classification":
        fn, fn_kwargs = tokenize_classification, {"task": task}
    else:
        fn = tokenize_prompt_response
        fn_kwargs = {"prompt_field": task.prompt_field, "response_field": task.response_field}
    tokenized = raw.map(
        fn,
        batched=True,
        with_indices=True,
        batch_size=_MAP_BATCH,
        remove_columns=raw.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, **fn_kwargs},
        desc=f"tokenising {task.name}",
    )
    if len(tokenized) == 0:
        if task.format == "text":
            reason = f"every {task.text_field!r} record is blank or missing"
        elif task.format == "classification":
            reason = (
                "the template and the longest label leave no room for text within "
                f"data.max_length={max_length}; raise data.max_length or shorten the template"
            )
        else:
            reason = (
                f"no example has a response token within data.max_length={max_length} and at least "
                f"2 tokens: prompts fill max_length or {task.prompt_field!r}/{task.response_field!r} are "
                "empty; raise data.max_length or fix the fields"
            )
        raise ConfigError(f"{where}: no usable example ({len(raw)} records): {reason}")
    return tokenized


def synthetic_examples(
    task: TaskSpec,
    count: int,
    seed: int,
    max_length: int,
    vocab: int,
    jump: float,
    tokenizer: PreTrainedTokenizerBase | None,
    stream: int = 0,
) -> datasets.Dataset:
    """``count`` permutation sequences of a synthetic task (``crma_lightning.data.synthetic``), every token
    scored; ``stream`` > 0 gives further sequences of the task (its test set) from their own generator."""
    if tokenizer is not None and FIRST_TOKEN + vocab > len(tokenizer):
        raise ConfigError(
            f"data.synthetic_vocab: task '{task.name}' uses ids up to {FIRST_TOKEN + vocab - 1}"
            f" but the tokenizer has {len(tokenizer)}; lower data.synthetic_vocab"
        )
    try:
        seqs = permutation_sequences(
            seed,
            task.name,
            count,
            max_length,
            vocab,
            jump,
            stream,
        ).tolist()
    except MemoryError as err:  # numpy refuses absurd sizes at once; say which settings to lower
        raise ConfigError(
            f"task '{task.name}': {count} synthetic sequences of "
            f"data.max_length={max_length} over data.synthetic_vocab={vocab} tokens do "
            "not fit in memory; lower data.train_size, data.holdout_size, data.max_length or "
            "data.synthetic_vocab"
        ) from err
    return datasets.Dataset.from_dict({"input_ids": seqs, "labels": seqs})
