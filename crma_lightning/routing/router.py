"""Routing without a task id for a loaded run: the statistics router and the loss router.

``stats`` (the default) classifies a pooled hidden state of the frozen base with the run's routing
statistics (``crma_lightning.routing.routers``); ``loss`` picks the task whose adapter gives the
prompt the lowest mean next-token loss. Each decision has a confidence (the chosen task's posterior
probability); below ``threshold`` it goes to the ``fallback``. docs/inference.md ("Routing").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor, nn

from crma_lightning.core.errors import ConfigError
from crma_lightning.data.loading import pad
from crma_lightning.routing.routers import FeatureSums, LinearRouter, Pooling, fit_lda
from crma_lightning.routing.stats import (
    DEFAULT_MAX_EXAMPLES,
    check_stats,
    gather_sums,
    has_task_stats,
    num_layers,
    prompt_features,
    read_task_stats,
    resolve_layer,
    stats_meta,
    write_task_stats,
)

if TYPE_CHECKING:
    from crma_lightning.adapters.injection import CRMAInjection
    from crma_lightning.runs.runinfo import RunInfo


class LoadedRun(Protocol):
    """What routing reads of a loaded run (a :class:`crma_lightning.serve.TrainedRun`)."""

    info: RunInfo
    tasks: list[str]
    model: nn.Module
    crma: CRMAInjection | None
    pad_id: int
    device: torch.device

    def adapter_for(self, task: str) -> str: ...

    def forget_router(self) -> None: ...


FeatureCache = dict[tuple[Any, ...], Tensor]
"""Pooled frozen-base features of prompt batches, by (layer, pooling, prompts): see
:meth:`StatsRouter.features`."""

RouterName = Literal["stats", "loss"]
ROUTERS = ("stats", "loss")
LOSS_FALLBACK = "loss"

DEFAULT_SHRINKAGE = 0.3
"""Shrinkage of the shared covariance toward its diagonal; chosen with the layer by cross-validation
on the main job's training data (benchmarks/results/routing_smollm2.md: 0.1-0.5 route alike)."""


@dataclass
class RouteDecision:
    """How one prompt was routed."""

    task: str
    confidence: float | None
    """The router's posterior probability of its choice (in [1/K, 1]); what ``threshold`` is compared
    with. None where it has none: a 1-token prompt under the loss router, or NAIVE (nothing to route)."""
    router: str
    """What chose ``task``: ``stats``, ``loss``, ``default`` (the named fallback task) or ``naive``."""
    fallback: bool = False
    """Whether the threshold sent the prompt from the router asked for to the fallback."""
    posterior: dict[str, float] | None = None
    """The asked-for router's probability of every task."""
    losses: dict[str, float] | None = None
    """Each task's mean loss on the prompt, where the loss router ran."""


class StatsRouter:
    """The discriminant of a run's routing statistics, and the features it scores."""

    def __init__(
        self, tasks: list[str], sums: dict[str, FeatureSums], meta: dict[str, Any], shrinkage: float
    ) -> None:
        self.tasks = list(tasks)
        self.layer: int = meta["layer"]
        self.pooling: Pooling = meta["pooling"]
        self.shrinkage = shrinkage
        self.lda: LinearRouter = fit_lda([sums[t] for t in self.tasks], shrinkage)

    @torch.no_grad()
    def features(
        self,
        model: nn.Module,
        crma: CRMAInjection | None,
        prompts: Sequence[list[int]],
        pad_id: int,
        stop: bool = True,
        cache: FeatureCache | None = None,
    ) -> Tensor:
        """``(N, D)`` pooled frozen-base features of one right-padded batch of prompts, on the CPU
        (``stop=False`` for a sharded model: every rank runs the whole forward). They depend only
        on the frozen base and the prompts: with ``cache``, a batch seen before is not run again."""
        key = (self.layer, self.pooling, tuple(tuple(p) for p in prompts))
        if cache is not None and key in cache:
            return cache[key]
        device = next(model.parameters()).device
        ids, mask = pad(list(prompts), pad_id, "right")
        feats = prompt_features(
            model, crma, ids.to(device), mask.to(device), self.layer, self.pooling, stop=stop
        ).cpu()
        if cache is not None:
            cache[key] = feats
        return feats

    @torch.no_grad()
    def batch_scores(
        self,
        model: nn.Module,
        crma: CRMAInjection | None,
        prompts: Sequence[list[int]],
        pad_id: int,
        stop: bool = True,
        cache: FeatureCache | None = None,
    ) -> Tensor:
        """``(N, K)`` discriminants of one batch of prompts (:meth:`features`)."""
        return self.lda.scores(self.features(model, crma, prompts, pad_id, stop, cache))

    def scores(self, run: LoadedRun, prompts: Sequence[list[int]], batch_size: int) -> Tensor:
        """``(N, K)`` discriminants of the prompts, in batches of ``batch_size``."""
        return torch.cat(
            [
                self.batch_scores(run.model, run.crma, prompts[lo : lo + batch_size], run.pad_id)
                for lo in range(0, len(prompts), batch_size)
            ]
        )

    def route(
        self,
        model: nn.Module,
        crma: CRMAInjection | None,
        pad_id: int,
        stop: bool = True,
        cache: FeatureCache | None = None,
    ) -> Callable[[list[list[int]]], Tensor]:
        """A function from prompts to the index of the task each is routed to (the highest
        discriminant, no threshold): for evaluation without the task id
        (``evaluator.RowEvaluator.routed``); ``cache`` keeps each batch's features across rows."""
        return lambda prompts: self.batch_scores(model, crma, prompts, pad_id, stop, cache).argmax(1)


def load_stats_router(
    run: LoadedRun, shrinkage: float = DEFAULT_SHRINKAGE, tasks: Sequence[str] | None = None
) -> StatsRouter:
    """The statistics router of ``tasks`` (default: every completed task) of ``run``; a
    :class:`ConfigError` that names the fix when statistics are missing, damaged, mixed, or were
    made for another base model."""
    rd = run.info.run
    tasks = list(run.tasks if tasks is None else tasks)
    missing = [t for t in tasks if not has_task_stats(rd, t)]
    if missing:
        raise ConfigError(
            f"{rd.path} has no routing statistics for tasks {missing} "
            f"({rd.routing.name}/<task>.safetensors): the run predates them or was trained with "
            "routing.enabled false. Build them (the base model is frozen, so they can be made afterwards): "
            f"python train.py route --run {rd.path} --build-stats (serve.build_routing_stats(run)); or route "
            "by adapter loss: router='loss' (--router loss)"
        )
    read = {t: read_task_stats(rd, t) for t in tasks}
    metas = {t: meta for t, (_, meta) in read.items()}
    check_stats(metas, run.model, rd)
    return StatsRouter(tasks, {t: s for t, (s, _) in read.items()}, metas[tasks[0]], shrinkage)


def check_routing(run: LoadedRun, router: str, threshold: float, fallback: str) -> None:
    """One clear error for a routing option that cannot work."""
    if router not in ROUTERS:
        raise ConfigError(f"router must be one of {list(ROUTERS)}, got {router!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold is a probability: give a number in [0, 1], got {threshold}")
    if fallback != LOSS_FALLBACK and fallback not in run.tasks:
        raise ConfigError(
            f"fallback must be 'loss' or a completed task of this run {run.tasks}, got {fallback!r}"
        )


def build_routing_stats(
    run: LoadedRun,
    tasks: Sequence[str] | None = None,
    *,
    layer: int | None = None,
    pooling: Pooling | None = None,
    max_examples: int | None | Literal["config"] = "config",
    batch_size: int | None = None,
    overwrite: bool = False,
    log: Callable[[str], object] | None = None,
) -> list[str]:
    """Gather and write the routing statistics of ``tasks`` (default: every completed task) that lack
    them, or of all of them with ``overwrite``; returns the tasks written. Files of other tasks are
    not opened for writing, so continuing a sequence adds a task's statistics without touching the
    earlier ones.

    Because the base model is frozen, this gives what the ``routing`` callback would have written
    at each task's end (the same examples, batches and layer: equal to float rounding). Settings not
    given come from statistics already present (new ones must match them), then from the run's
    ``routing:`` config section, then the defaults.
    """
    info, rd = run.info, run.info.run
    tasks = list(run.tasks if tasks is None else tasks)
    for t in tasks:
        run.adapter_for(t)  # unknown or never-completed tasks fail here
    config = info.routing_config
    present = [t for t in run.tasks if has_task_stats(rd, t) and (not overwrite or t not in tasks)]
    kept = read_task_stats(rd, present[0])[1] if present else {}
    depth = num_layers(run.model)
    layer = resolve_layer(layer if layer is not None else kept.get("layer", config.get("layer")), depth)
    pooling = pooling or kept.get("pooling") or config.get("pooling") or "mean"
    if kept and (layer, pooling) != (kept["layer"], kept["pooling"]):
        raise ConfigError(
            f"the statistics of {present} use layer {kept['layer']}, pooling {kept['pooling']!r}; new ones "
            f"must match (got layer {layer}, pooling {pooling!r}), or rebuild all of them with --overwrite"
        )
    if max_examples == "config":
        max_examples = kept.get("max_examples", config.get("max_examples", DEFAULT_MAX_EXAMPLES))
    dm = info.datamodule()
    batch_size = batch_size or config.get("batch_size") or dm.eval_batch_size
    todo = [t for t in tasks if overwrite or not has_task_stats(rd, t)]
    for t in todo:
        if log is not None:
            log(
                f"routing statistics of task {t!r}: layer {layer} of {depth}, {pooling} pooling, "
                f"up to {max_examples} training examples -> {rd.routing_stats(t)}"
            )
        batches = dm.train_examples(t, batch_size=batch_size, limit=max_examples)
        sums = gather_sums(run.model, run.crma, batches, layer, pooling, stop=True, device=run.device)
        examples = min(dm.num_train_examples(t), max_examples or dm.num_train_examples(t))
        write_task_stats(rd, t, sums, stats_meta(t, run.model, layer, pooling, examples, max_examples))
    run.forget_router()
    return todo
