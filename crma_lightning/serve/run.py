"""Load a finished run from its run directory and use it: logits, generation, routing.

``load_run("runs/tiny/version_0")`` rebuilds the base model from the run's ``config.yaml``, puts
every completed task's LoRA back from ``adapters/<task>/`` and, for MODULAR runs, the latest CRMA
from ``adapters/crma/``, checking the base architecture and every tensor's shape. Nothing is
unpickled. ``task="auto"`` routes without a task id (:mod:`crma_lightning.routing.router`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from crma_lightning.adapters.injection import CRMAInjection
from crma_lightning.adapters.lora import activate_lora
from crma_lightning.backbone.loading import BackboneConfig, load_backbone
from crma_lightning.core import losses
from crma_lightning.core.errors import ConfigError
from crma_lightning.data import ContinualDataModule, load_tokenizer
from crma_lightning.evaluation import generation
from crma_lightning.evaluation.generation import Prompt
from crma_lightning.methods.layouts import SHARED_ADAPTER, AdapterLayout
from crma_lightning.routing import routers as routing
from crma_lightning.routing.router import (
    DEFAULT_SHRINKAGE,
    LOSS_FALLBACK,
    RouteDecision,
    RouterName,
    StatsRouter,
    check_routing,
    load_stats_router,
)
from crma_lightning.runs.checkpoint import (
    CRMA_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    load_crma,
    load_lora,
    read_crma_meta,
)
from crma_lightning.runs.runinfo import RunInfo, check_trusted, read_run
from crma_lightning.serve.model import ServedModel

AUTO = "auto"
"""Task value that asks for routing instead of naming a task."""


@dataclass
class Completion:
    """One prompt's result: the task used (``routed`` when chosen by :meth:`TrainedRun.route`)."""

    task: str
    routed: bool
    completion: str | list[int]
    """Decoded text, or token ids for a run without a tokenizer."""
    completion_ids: list[int]
    confidence: float | None = None
    """For a routed prompt, the router's confidence in ``task`` (:class:`RouteDecision`)."""
    router: str | None = None
    """For a routed prompt, what chose ``task`` (``stats``, ``loss``, ``default``, ``naive``)."""


class TrainedRun(ServedModel):
    """A finished (or partly finished) run, ready for inference. Build it with :func:`load_run`.

    ``model`` is the plain transformers model with every task's LoRA (peft named adapters) and,
    for MODULAR, the CRMA blocks; exactly one LoRA is active at a time (:meth:`serving`).
    """

    def __init__(
        self,
        info: RunInfo,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase | None,
        crma: CRMAInjection | None,
    ) -> None:
        super().__init__(model, tokenizer, crma)
        self.info = info
        self._routers: dict[float, StatsRouter] = {}

    # -- tasks -----------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """The tasks this run can serve (those it completed), in training order."""
        return list(self.info.trained)

    @property
    def strategy(self) -> str:
        return self.info.strategy

    @property
    def layout(self) -> AdapterLayout:
        return self.info.layout

    def adapter_for(self, task: str) -> str:
        """The LoRA serving ``task``: its own, or under NAIVE the shared one (as at the end of the run)."""
        if task not in self.info.tasks:
            raise ConfigError(
                f"unknown task {task!r}; this run's tasks are {self.tasks} (or 'auto' to route)"
            )
        if task not in self.info.trained:
            raise ConfigError(
                f"task {task!r} was never completed in {self.info.run_dir} (no "
                f"{self.info.run.adapter(task)}); completed tasks: {self.tasks}"
            )
        return self.layout.adapter_for(task, self.info.tasks)

    @contextmanager
    def serving(self, task: str | None, crma: bool = True) -> Iterator[None]:
        """Serve as ``task`` (its LoRA active) with CRMA on or off; restores the CRMA switch."""
        if task is None:
            raise ConfigError(f"name a task to serve: one of {self.tasks}, or 'auto' to route")
        self.adapter_for(task)  # a clear error for an unknown or unfinished task
        activate_lora(self.model, self.layout.active_for(task, self.info.trained))
        with super().serving(task, crma):
            yield

    # -- generation ------------------------------------------------------------------------
    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        task: str,
        crma: bool = True,
        batch_size: int = 8,
        *,
        router: RouterName = "stats",
        threshold: float = 0.0,
        fallback: str = LOSS_FALLBACK,
        **generate_kwargs: Any,
    ) -> str | list[int] | list[str | list[int]]:
        """Complete ``prompt`` (text or token ids, or a list of them) as ``task`` would.

        ``task="auto"`` routes each prompt first (:meth:`route_decisions`; ``router``, ``threshold``,
        ``fallback`` as there). ``generate_kwargs`` are transformers generation arguments
        (``max_new_tokens`` defaults to 32; greedy unless ``do_sample=True``). Returns the
        completion (without the prompt), or a list of them.
        """
        single = generation.is_single(prompt)
        results = self.complete(
            [prompt] if single else list(prompt),
            task,
            crma,
            batch_size,
            router=router,
            threshold=threshold,
            fallback=fallback,
            **generate_kwargs,
        )
        texts = [r.completion for r in results]
        return texts[0] if single else texts

    def complete(
        self,
        prompts: Sequence[Prompt],
        tasks: str | Sequence[str],
        crma: bool = True,
        batch_size: int = 8,
        progress: Callable[[int], object] | None = None,
        *,
        router: RouterName = "stats",
        threshold: float = 0.0,
        fallback: str = LOSS_FALLBACK,
        **generate_kwargs: Any,
    ) -> list[Completion]:
        """Completions of ``prompts``, each as its task (one name for all, or one per prompt;
        ``auto`` routes: :meth:`route_decisions` with ``router``, ``threshold``, ``fallback``; the
        loss router scores with CRMA as set by ``crma``). Prompts are batched per task; results come
        back in input order. ``progress``, if given, is called with the number of prompts finished
        by each batch."""
        tasks = [tasks] * len(prompts) if isinstance(tasks, str) else list(tasks)
        if len(tasks) != len(prompts):
            raise ConfigError(f"got {len(prompts)} prompts but {len(tasks)} tasks")
        ids = [self.encode(p, f"prompt {i}") for i, p in enumerate(prompts)]
        auto = [i for i, t in enumerate(tasks) if t == AUTO]
        for t in set(tasks) - {AUTO}:
            self.adapter_for(t)  # unknown names fail before any work
        decisions: dict[int, RouteDecision] = {}
        if auto:
            chosen = self.route_decisions(
                [ids[i] for i in auto],
                batch_size,
                crma,
                router=router,
                threshold=threshold,
                fallback=fallback,
            )
            for i, d in zip(auto, chosen, strict=True):
                tasks[i], decisions[i] = d.task, d
        out: list[Completion | None] = [None] * len(prompts)
        for task in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == task]
            for lo in range(0, len(rows), batch_size):
                chunk = rows[lo : lo + batch_size]
                new = self.generate_ids([ids[i] for i in chunk], task, crma, batch_size, **generate_kwargs)
                for i, row in zip(chunk, new, strict=True):
                    d = decisions.get(i)
                    out[i] = Completion(
                        task,
                        d is not None,
                        self.decode(row),
                        row,
                        d.confidence if d else None,
                        d.router if d else None,
                    )
                if progress is not None:
                    progress(len(chunk))
        return out  # type: ignore[return-value]

    # -- routing ---------------------------------------------------------------------------
    def stats_router(self, shrinkage: float = DEFAULT_SHRINKAGE) -> StatsRouter:
        """The router built from the run's routing statistics (loaded once per shrinkage)."""
        if shrinkage not in self._routers:
            self._routers[shrinkage] = load_stats_router(self, shrinkage)
        return self._routers[shrinkage]

    def forget_router(self) -> None:
        """Drop the loaded statistics router (after its files changed)."""
        self._routers.clear()

    def route_losses(self, prompts: Sequence[list[int]], batch_size: int = 16, crma: bool = True) -> Tensor:
        """``(N, K)`` mean next-token loss of each prompt under each of the K :attr:`tasks`."""
        return torch.stack(
            [self.prompt_losses(prompts, task, crma, batch_size) for task in self.tasks], dim=1
        )

    def choose(self, losses: Tensor) -> list[str]:
        """The task with the lowest loss in each row of :meth:`route_losses`' ``(N, K)`` output.

        A 1-token prompt has no next-token loss (NaN); it goes to the last completed task. Under
        NAIVE every task is served by the same LoRA, so routing is moot: the last task is returned.
        """
        if self.layout.shared_lora:
            return [self.tasks[-1]] * losses.shape[0]
        best = torch.nan_to_num(losses, nan=float("inf")).argmin(dim=1)
        scorable = torch.isfinite(losses).all(dim=1)
        return [self.tasks[int(k)] if ok else self.tasks[-1] for k, ok in zip(best, scorable, strict=True)]

    def route_decisions(
        self,
        prompts: Sequence[list[int]],
        batch_size: int = 16,
        crma: bool = True,
        *,
        router: RouterName = "stats",
        threshold: float = 0.0,
        fallback: str = LOSS_FALLBACK,
        shrinkage: float = DEFAULT_SHRINKAGE,
    ) -> list[RouteDecision]:
        """How each tokenised prompt is routed (:class:`RouteDecision`: task, confidence, router).

        ``router``: ``stats`` (the run's routing statistics; one partial base forward per prompt) or
        ``loss`` (lowest prompt loss under LoRA_k + CRMA; K forward passes). A decision whose
        confidence is below ``threshold`` goes to ``fallback``: ``loss`` (the loss router) or a task
        name. Under NAIVE every task is the same model, so the last task is returned unrouted.
        """
        check_routing(self, router, threshold, fallback)
        prompts = list(prompts)
        if self.layout.shared_lora:  # one shared LoRA: nothing to score
            return [RouteDecision(self.tasks[-1], None, self.layout.name) for _ in prompts]
        if not prompts:
            return []
        if router == "stats":
            scores, losses = self.stats_router(shrinkage).scores(self, prompts, batch_size), None
        else:
            losses = self.route_losses(prompts, batch_size, crma)
            scores = routing.loss_scores(losses, torch.tensor([len(p) - 1 for p in prompts]))
        out = self._decisions(scores, router, losses)
        low = [i for i, d in enumerate(out) if d.confidence is None or d.confidence < threshold]
        if low and not (fallback == LOSS_FALLBACK and router == "loss"):
            if fallback == LOSS_FALLBACK:
                redo = self.route_decisions([prompts[i] for i in low], batch_size, crma, router="loss")
            else:
                redo = [RouteDecision(fallback, None, "default") for _ in low]
            for i, d in zip(low, redo, strict=True):
                out[i] = RouteDecision(d.task, out[i].confidence, d.router, True, out[i].posterior, d.losses)
        return out

    def _decisions(self, scores: Tensor, router: str, losses: Tensor | None) -> list[RouteDecision]:
        choice, confidence = routing.decide(scores)
        posterior = routing.posterior(scores).tolist()
        out = []
        for row, (k, c) in enumerate(zip(choice.tolist(), confidence.tolist(), strict=True)):
            scorable = c == c  # a NaN confidence: a 1-token prompt under the loss router
            out.append(
                RouteDecision(
                    self.tasks[k] if scorable else self.tasks[-1],
                    c if scorable else None,
                    router,
                    posterior=dict(zip(self.tasks, posterior[row], strict=True)) if scorable else None,
                    losses=None
                    if losses is None
                    else dict(zip(self.tasks, losses[row].tolist(), strict=True)),
                )
            )
        return out

    def route_ids(
        self, prompts: Sequence[list[int]], batch_size: int = 16, crma: bool = True, **routing_options: Any
    ) -> list[str]:
        """The task chosen for each tokenised prompt (:meth:`route_decisions`, same options)."""
        return [d.task for d in self.route_decisions(prompts, batch_size, crma, **routing_options)]

    def route(
        self,
        prompts: Prompt | Sequence[Prompt],
        batch_size: int = 16,
        crma: bool = True,
        **routing_options: Any,
    ) -> str | list[str]:
        """The task chosen for ``prompt`` (or for each of a list of prompts) without a task id;
        ``routing_options`` as :meth:`route_decisions` (``router``, ``threshold``, ``fallback``)."""
        single = generation.is_single(prompts)
        items = [prompts] if single else list(prompts)
        chosen = self.route_ids(
            [self.encode(p, f"prompt {i}") for i, p in enumerate(items)], batch_size, crma, **routing_options
        )
        return chosen[0] if single else chosen

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def holdout_loss(
        self, task: str, crma: bool = True, dm: ContinualDataModule | None = None, split: str = "validation"
    ) -> float:
        """Mean next-token loss on ``task``'s validation (holdout) or ``test`` set (the run's own
        split), served as ``task``.

        With the run's final adapters this is the run's last loss-matrix row (within float
        summation order); ``crma=False`` is the paper's inference ablation.
        """
        dm = dm or self.info.datamodule()
        total = tokens = 0.0
        with self.serving(task, crma):
            for batch in dm.holdout_batches(task, split=split):
                logits = self.model(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                    use_cache=False,
                ).logits
                s = losses.token_stats(
                    logits, batch["labels"].to(self.device), batch["example_weight"].to(self.device)
                )
                total, tokens = total + float(s.loss_sum), tokens + float(s.tokens)
        return total / max(tokens, 1.0)


def load_run(
    run_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    backbone: BackboneConfig | None = None,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
    allow_foreign_classes: bool = False,
) -> TrainedRun:
    """Load a run from its run directory: base model, CRMA state and every completed task's LoRA.

    A run directory is data: its ``config.yaml`` is read with ``yaml.safe_load`` and nothing in it
    is executed; a config that would run code (see :func:`check_trusted`) is refused unless the
    matching flag is passed.

    Args:
        run_dir: the directory ``fit`` printed as ``run dir:`` (holds ``config.yaml`` and ``adapters/``).
        device: where to put the model.
        backbone: load this base model instead of the one in ``config.yaml`` (e.g. after moving the
            weights); it must be the same architecture, or loading fails naming what differs.
        tokenizer: override ``data.tokenizer`` of the config likewise.
        trust_remote_code: allow a config that sets ``model.backbone.trust_remote_code``.
        allow_foreign_classes: allow a config that names classes from outside this project.
    """
    info = read_run(run_dir, allow_foreign_classes)
    overridden = backbone is not None
    if overridden:
        info.backbone = backbone
    check_trusted(
        info,
        info.run.read_config(),
        trust_remote_code=trust_remote_code or overridden,
        allow_foreign_classes=allow_foreign_classes,
        check_base=not overridden,
    )
    if tokenizer is not None:
        info.data["tokenizer"] = tokenizer
    meta = None
    if info.layout.crma:
        if not (info.run.crma / CRMA_WEIGHTS).is_file():
            raise ConfigError(
                f"{info.run_dir} is a {info.strategy} run but has no {info.run.crma / CRMA_WEIGHTS}; the "
                "CRMA state is missing (copy the whole run directory, adapters/ included)"
            )
        meta = read_crma_meta(info.run.crma)
        saved = {"strategy": meta.get("strategy"), "tasks": meta.get("tasks")}
        if saved != {"strategy": info.strategy, "tasks": info.tasks}:
            raise ConfigError(
                f"{info.run.crma} was written by a run with {saved}, but {info.run.config_file} says "
                f"strategy {info.strategy!r}, tasks {info.tasks}; the run directory mixes two runs"
            )
    model = load_backbone(info.backbone).to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for name in info.layout.adapter_names(info.trained):
        # A shared LoRA (NAIVE): adapters/<last task>/ holds it as the run ended.
        source = info.run.adapter(info.trained[-1] if name == SHARED_ADAPTER else name)
        _check_adapter_dir(source)
        with warnings.catch_warnings():
            # Several named adapters on one model is exactly what we want (as in lora.add_lora).
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
            load_lora(model, name, source)
    crma = load_crma(model, info.run.crma) if meta is not None else None
    model.to(device)  # LoRA and CRMA tensors are created on the CPU
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    tok = load_tokenizer(info.tokenizer_name) if info.tokenizer_name else None
    if tok is not None and len(tok) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(
            f"data.tokenizer {info.tokenizer_name!r} has {len(tok)} tokens but the model's embedding has "
            f"{model.get_input_embeddings().num_embeddings} rows; this is not the tokenizer the run used"
        )
    return TrainedRun(info, model, tok, crma)


def _check_adapter_dir(directory: Path) -> None:
    if not (directory / PEFT_CONFIG).is_file() or not (directory / PEFT_WEIGHTS).is_file():
        raise ConfigError(
            f"{directory} is incomplete (needs {PEFT_CONFIG} and {PEFT_WEIGHTS}); the run directory is "
            "damaged"
        )
