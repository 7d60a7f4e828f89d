"""A task's routing statistics: gathered from the frozen base model (every LoRA and CRMA off),
written to and read from the run directory (``routing/<task>.safetensors`` and ``.json``).

The feature is the residual stream after decoder layer ``layer`` (1-based: the output of
``layers[layer - 1]``, taken by a forward hook), pooled over a prompt/response example's prompt, or
for text over each prefix of :func:`routing.prefix_lengths`. The maths is
:mod:`crma_lightning.routing.routers`; docs/inference.md ("Routing") the use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from safetensors.torch import load, save
from torch import Tensor, nn

from crma_lightning.adapters.injection import CRMAInjection, find_decoder_layers
from crma_lightning.adapters.lora import lora_disabled
from crma_lightning.core.atomic import atomic_write_bytes, atomic_write_json
from crma_lightning.core.errors import ConfigError
from crma_lightning.core.losses import IGNORE_INDEX
from crma_lightning.routing.routers import (
    SHORTEST_PREFIX,
    FeatureSums,
    Pooling,
    feature_sums,
    prefix_lengths,
    prefix_pool,
)
from crma_lightning.runs.checkpoint import base_model_signature, check_signature
from crma_lightning.runs.rundir import RunDir

STATS_FORMAT = 1
"""Version of the statistics files; a reader refuses another."""

DEFAULT_MAX_EXAMPLES = 512
"""Training examples per task whose features are gathered unless configured otherwise."""


# -- which layer -------------------------------------------------------------------------------
def default_layer(num_layers: int) -> int:
    """A third of the depth, rounded (at least 1): layer 10 of SmolLM2-135M's 30. Chosen by 4-fold
    cross-validation on the training data of the main job's run (benchmarks/results/routing_smollm2.md),
    where layers 6-16 route alike and later ones slightly worse; an early layer also keeps routing
    cheap, since the forward pass stops there."""
    return max(1, round(num_layers / 3))


def resolve_layer(layer: int | None, num_layers: int) -> int:
    """``layer`` as 1..num_layers: None is :func:`default_layer`, a negative value counts from the
    end (-1 is the last layer); anything else out of range is a :class:`ConfigError`."""
    if layer is None:
        return default_layer(num_layers)
    resolved = layer + num_layers + 1 if layer < 0 else layer
    if not 1 <= resolved <= num_layers:
        raise ConfigError(
            f"routing.layer {layer} is outside this model's decoder layers: give 1..{num_layers} (the "
            f"residual stream after that many layers), -1..-{num_layers} from the end, or null for "
            f"{default_layer(num_layers)}"
        )
    return resolved


def num_layers(model: nn.Module) -> int:
    return len(find_decoder_layers(model)[1])


# -- the frozen base's hidden state ------------------------------------------------------------
class _Captured(Exception):
    """Raised by the capture hook to end a forward pass at the routing layer."""


@contextmanager
def frozen_base(model: nn.Module, crma: CRMAInjection | None) -> Iterator[None]:
    """The model as its frozen base: every LoRA and CRMA switched off (restored afterwards)."""
    with ExitStack() as stack:
        stack.enter_context(lora_disabled(model))
        if crma is not None:
            stack.enter_context(crma.disabled())
        yield


@torch.no_grad()
def base_hidden(
    model: nn.Module,
    crma: CRMAInjection | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    layer: int,
    *,
    stop: bool = True,
) -> Tensor:
    """``(B, T, D)`` residual stream after decoder layer ``layer`` (1-based) of the frozen base.

    ``stop`` ends the forward pass there (an exception raised by the hook and caught here), so the
    later layers and the LM head are not computed. Sharded models (FSDP) need the whole forward on
    every rank (each layer's all-gather is a collective): pass ``stop=False``.
    """
    return base_hiddens(model, crma, input_ids, attention_mask, [layer], stop=stop)[layer]


@torch.no_grad()
def base_hiddens(
    model: nn.Module,
    crma: CRMAInjection | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    layers: list[int],
    *,
    stop: bool = True,
) -> dict[int, Tensor]:
    """:func:`base_hidden` at several layers from one forward pass (``stop``: after the deepest)."""
    _, decoder = find_decoder_layers(model)
    captured: dict[int, Tensor] = {}
    last = max(layers)

    def hook_for(layer: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if stop and layer == last:
                raise _Captured

        return hook

    handles = [decoder[layer - 1].register_forward_hook(hook_for(layer)) for layer in set(layers)]
    try:
        with frozen_base(model, crma):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


def prompt_lengths(labels: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per example of a batch: the prompt's length ``(B,)`` and whether the example is text ``(B,)``.

    A prompt/response example's prompt is its unlabelled prefix; a text example (its first token
    scored) has none, so its prompt is the whole example, of which every prefix is a prompt.
    """
    scored = labels != IGNORE_INDEX  # (B, T)
    first = scored.int().argmax(1)  # first scored position, 0 when none
    real = attention_mask.sum(1)
    text = first == 0
    return torch.where(text, real, first), text


def prefix_table(lengths: Tensor, text: Tensor) -> Tensor:
    """``(B, M)`` prefix lengths to pool per example (0 = none): every prefix of
    :func:`routing.prefix_lengths` for text, the whole prompt for prompt/response examples."""
    rows = [
        prefix_lengths(int(n)) if t else [int(n)]
        for n, t in zip(lengths.tolist(), text.tolist(), strict=True)
    ]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.no_grad()
def gather_sums(
    model: nn.Module,
    crma: CRMAInjection | None,
    batches: Iterable[dict[str, Tensor]],
    layer: int,
    pooling: Pooling,
    *,
    stop: bool = True,
    device: torch.device | str | None = None,
) -> FeatureSums:
    """The statistics of the frozen base's pooled features over ``batches`` (dicts with
    ``input_ids``, ``attention_mask``, ``labels`` and optionally ``example_weight``; right-padded)."""
    device = device if device is not None else next(model.parameters()).device
    total: FeatureSums | None = None
    for batch in batches:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = base_hidden(model, crma, ids, mask, layer, stop=stop)  # (B, T, D)
        lengths, text = prompt_lengths(batch["labels"], batch["attention_mask"])
        table = prefix_table(lengths, text).to(hidden.device)  # (B, M)
        feats = prefix_pool(hidden, table, pooling)  # (B, M, D)
        weight = (table > 0).double()
        if "example_weight" in batch:
            weight = weight * batch["example_weight"].to(hidden.device).double()[:, None]
        part = feature_sums(feats.reshape(-1, feats.shape[-1]), weight.reshape(-1))
        total = part if total is None else total + part
    if total is None:
        raise ConfigError("no examples to gather routing statistics from")
    return total


@torch.no_grad()
def prompt_features(
    model: nn.Module,
    crma: CRMAInjection | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    layer: int,
    pooling: Pooling,
    *,
    stop: bool = True,
) -> Tensor:
    """``(B, D)`` float64 feature of each whole (right-padded) prompt: what the router scores
    (``stop``: as in :func:`base_hidden`; False for a sharded model)."""
    hidden = base_hidden(model, crma, input_ids, attention_mask, layer, stop=stop)
    lengths = attention_mask.sum(1, keepdim=True).to(hidden.device)  # (B, 1)
    return prefix_pool(hidden, lengths, pooling)[:, 0]


# -- files -------------------------------------------------------------------------------------
def stats_meta(
    task: str, model: nn.Module, layer: int, pooling: Pooling, examples: int, max_examples: int | None
) -> dict[str, Any]:
    """The JSON record of a task's statistics (everything but the hash)."""
    return {
        "format": STATS_FORMAT,
        "task": task,
        "layer": layer,
        "num_layers": num_layers(model),
        "pooling": pooling,
        "source": "training data: the first examples of the task's training set, through the frozen base",
        "examples": examples,
        "max_examples": max_examples,
        "shortest_prefix": SHORTEST_PREFIX,
        "base_model": base_model_signature(model),
    }


def write_task_stats(run: RunDir, task: str, sums: FeatureSums, meta: dict[str, Any]) -> None:
    """Write ``routing/<task>.safetensors``, then ``routing/<task>.json`` with its hash (atomically each)."""
    data = save(sums.tensors(), metadata={"format": "pt"})
    atomic_write_bytes(run.routing_stats(task), data)
    atomic_write_json(
        run.routing_meta(task),
        {
            **meta,
            "feature_dim": sums.dim,
            "features": float(sums.count),
            "sha256": hashlib.sha256(data).hexdigest(),
        },
    )


def has_task_stats(run: RunDir, task: str) -> bool:
    return run.routing_stats(task).is_file() and run.routing_meta(task).is_file()


def read_task_stats(run: RunDir, task: str) -> tuple[FeatureSums, dict[str, Any]]:
    """The statistics of ``task`` and their record; a :class:`ConfigError` naming the fix if they
    are missing, damaged, or not a matching pair."""
    stats, meta_file = run.routing_stats(task), run.routing_meta(task)
    rebuild = f"rebuild them: python train.py route --run {run.path} --build-stats --overwrite"
    if not stats.is_file() or not meta_file.is_file():
        missing = stats if not stats.is_file() else meta_file
        raise ConfigError(f"task {task!r} has no routing statistics ({missing} is missing); {rebuild}")
    data = stats.read_bytes()
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        tensors = load(data)
        sums = FeatureSums.from_tensors(tensors)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise ConfigError(
            f"the routing statistics of task {task!r} in {run.routing} are damaged ({e}); {rebuild}"
        ) from None
    if meta.get("format") != STATS_FORMAT:
        raise ConfigError(
            f"{meta_file} has format {meta.get('format')!r}; this version reads format {STATS_FORMAT}; "
            f"{rebuild}"
        )
    if meta.get("sha256") != hashlib.sha256(data).hexdigest():
        raise ConfigError(
            f"{stats} does not match {meta_file} (its hash differs: a write was interrupted, or the files "
            f"come from two runs); {rebuild}"
        )
    return sums, meta


def check_stats(metas: dict[str, dict[str, Any]], model: nn.Module, where: RunDir) -> None:
    """The statistics of all tasks were gathered the same way, on this base model."""
    for task, meta in metas.items():
        check_signature(
            meta["base_model"], model, f"the routing statistics of task {task!r} in {where.routing}"
        )
    keys = ("layer", "pooling", "feature_dim")
    seen = {task: tuple(meta.get(k) for k in keys) for task, meta in metas.items()}
    if len(set(seen.values())) > 1:
        listed = "; ".join(f"{t}: {dict(zip(keys, v, strict=True))}" for t, v in seen.items())
        raise ConfigError(
            f"the routing statistics in {where.routing} were gathered in different ways ({listed}); rebuild "
            f"them alike: python train.py route --run {where.path} --build-stats --overwrite"
        )
