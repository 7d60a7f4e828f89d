"""One row of the continual-learning matrices: every task's held-out split under one model state.

Used by the evaluation callback during ``fit`` (the live module, after each task) and by
``train.py test --run`` (a finished run, rebuilt as it was after each task); the metrics are
docs/method.md §4's and :mod:`crma_lightning.evaluation.task_metrics`'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from crma_lightning.backbone.output_head import batch_token_stats
from crma_lightning.core import losses
from crma_lightning.core.errors import ConfigError
from crma_lightning.data.tasks import TaskSpec
from crma_lightning.data.tokenize import choice_ids
from crma_lightning.evaluation import metrics as clm
from crma_lightning.evaluation import task_metrics as tm
from crma_lightning.evaluation.generation import generate_ids

METRICS = ("loss", "token_accuracy", "exact_match", "label_accuracy", "rougeL", "routing_accuracy")
"""What a row holds per task (NaN where a metric does not apply), besides ``accuracy``: the task metric."""
EXTRA = METRICS[1:]
"""Metrics with a matrix of their own besides L (``loss``) and A (``accuracy``)."""

Route = Callable[[list[list[int]]], Tensor]
"""Prompts (token ids) -> the index of the candidate each goes to ``(N,)``: a router that needs no
adapter (the statistics router, ``serve.router.StatsRouter.route``)."""

Rows = dict[str, dict[str, list[float | None]]]
"""Matrices by metric (``loss``, ``accuracy``, then :data:`EXTRA`): row name -> value per task;
None where the cell was not scored (``evaluation.schedule``), NaN where the metric does not apply."""

SCHEDULES = ("full", "seen", "minimal")
PER_EXAMPLE = {"exact_match": "exact", "label_accuracy": "label_correct"}
"""Task metrics whose per-example scores a result carries (``examples``), and the quantity they are."""
"""``evaluation.schedule``: which cells each row scores (:func:`scheduled_tasks`)."""


def scheduled_tasks(schedule: str, tasks: Sequence[str], row: int) -> list[str]:
    """The training tasks that row ``row`` (0: the base row; k: after task k) scores: ``full`` every
    task; ``seen`` tasks 1..k (the lower triangle); ``minimal`` task k (the diagonal, drift and BWT)
    and k + 1 (the superdiagonal, FWT), and every task in the final row. The base row is always
    scored in full: it is the zero-shot reference (FWT, general drift) and costs O(T)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"evaluation.schedule: must be one of {list(SCHEDULES)}, got {schedule!r}")
    tasks = list(tasks)
    if schedule == "full" or row == 0 or row == len(tasks):
        return tasks
    if schedule == "seen":
        return tasks[:row]
    return tasks[row - 1 : row + 1]


def add_row(rows: Rows, name: str, result: dict[str, dict[str, float]], tasks: Sequence[str]) -> None:
    """Put one evaluated row (:meth:`RowEvaluator.oracle`'s result) into ``rows`` as row ``name``;
    a task the result lacks is an unscored cell (None)."""
    for metric in ("loss", "accuracy", *EXTRA):
        rows.setdefault(metric, {})[name] = [result[t][metric] if t in result else None for t in tasks]


def _value(v: float | None) -> bool:
    """A scored cell whose metric applies."""
    return v is not None and not math.isnan(v)


def extra_matrices(rows: Rows) -> Rows:
    """The :data:`EXTRA` matrices worth a file: defined for some task, and not A itself (token
    accuracy when every task's metric is token accuracy)."""
    out = {}
    for metric in EXTRA:
        m = rows.get(metric, {})
        values = [v for row in m.values() for v in row]
        if any(_value(v) for v in values) and m != rows.get("accuracy"):
            out[metric] = m
    return out


def as_array(m: dict[str, list[float | None]]) -> np.ndarray:
    """A matrix's rows as float64, unscored cells NaN (for figures and scalars)."""
    return np.array([[np.nan if v is None else v for v in row] for row in m.values()], dtype=np.float64)


def summarize_rows(rows: Rows) -> dict[str, float | None]:
    """The continual-learning summary (``metrics.summarize``: drift on L; BWT, FWT, forgetting and the
    final average on A, the task metric) over the tasks trained so far (the first column per row
    after the base; evaluation-only tasks' columns come after the training tasks'), plus
    ``final_avg_<metric>`` of the other metrics; empty before the first task ends. A metric whose
    cells were not scored is None."""
    loss, acc = clm.as_masked(list(rows["loss"].values())), clm.as_masked(list(rows["accuracy"].values()))
    done = loss.shape[0] - 1  # rows after the base row
    if done < 1:
        return {}
    # Rows 0..done, columns 0..done-1.
    out: dict[str, float | None] = clm.summarize(loss[: done + 1, :done], acc[: done + 1, :done])
    for metric, m in extra_matrices(rows).items():
        last = list(m.values())[done][:done]
        out[f"final_avg_{metric}"] = (
            None
            if None in last or not any(_value(v) for v in last)
            else float(np.nanmean(np.array(last, dtype=np.float64)))
        )
    return out


def general_drift(rows: Rows, columns: Sequence[str], eval_tasks: Sequence[str]) -> dict[str, Any] | None:
    """How the evaluation-only tasks moved from the base row to the latest row, in drift_pct's sign
    convention (positive = worse): per task the loss change in % of the base's
    (``loss_pct = 100 (L[last, g] - L[base, g]) / L[base, g]``) and the task metric's drop
    (``metric_drop = A[base, g] - A[last, g]``), and their means over the tasks; None without
    evaluation-only tasks or before the first task ends."""
    names = list(rows.get("loss", {}))
    if not eval_tasks or len(names) < 2:
        return None
    out: dict[str, Any] = {"tasks": {}}
    for g in eval_tasks:
        c = list(columns).index(g)
        lb, lf = rows["loss"][names[0]][c], rows["loss"][names[-1]][c]
        ab, af = rows["accuracy"][names[0]][c], rows["accuracy"][names[-1]][c]
        out["tasks"][g] = {
            "loss_base": lb,
            "loss_final": lf,
            "loss_pct": 100.0 * (lf - lb) / lb,
            "metric_base": ab,
            "metric_final": af,
            "metric_drop": ab - af,
        }
    per = out["tasks"].values()
    out["mean_loss_pct"] = float(np.mean([t["loss_pct"] for t in per]))
    out["mean_metric_drop"] = float(np.mean([t["metric_drop"] for t in per]))
    return out


@dataclass
class TaskData:
    """What the evaluator needs of one task on one split (from ``ContinualDataModule``)."""

    spec: TaskSpec
    batches: list[dict[str, Tensor]]
    """This rank's shard, batched (``holdout_batches``): as many batches on every rank."""
    choices: list[list[int]] | None
    """Label targets (classification), in label order."""
    budget: int
    """Tokens to generate per answer."""

    @property
    def name(self) -> str:
        return self.spec.name


def task_data(
    dm,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
    only: Sequence[str] | None = None,
) -> list[TaskData]:
    """Every evaluated task of a ``ContinualDataModule`` on ``split`` (its training tasks, then its
    evaluation-only ones; ``only``: those of them), this rank's shard."""
    out = []
    for task in dm.evaluated_task_names:
        if only is not None and task not in only:
            continue
        spec = dm.spec(task)
        generates = spec.generates and dm.split_size(task, split) > 0
        out.append(
            TaskData(
                spec,
                dm.holdout_batches(task, rank, world_size, batch_size, split=split),
                label_targets(dm, task),
                answer_budget(dm, task, split) if generates else 0,
            )
        )
    return out


def label_targets(dm, task: str) -> list[list[int]] | None:
    """Token ids of each label's target (``answer_prefix`` + label + eos) of a classification task
    of a ``ContinualDataModule``, in label order; None for other formats."""
    spec = dm.spec(task)
    return choice_ids(spec, dm.hf_tokenizer) if spec.format == "classification" else None


def answer_budget(dm, task: str, split: str = "validation") -> int:
    """Tokens to generate for ``task``'s answers: the longest target of the split (its longest label
    for classification), eos included; a property of the whole split, so every rank generates the
    same number of tokens."""
    choices = label_targets(dm, task)
    if choices is not None:
        return max(len(c) for c in choices)
    labels = dm.held_out(task, split)["labels"]
    return max((sum(t != losses.IGNORE_INDEX for t in row[1:]) for row in labels), default=1)


class RowEvaluator:
    """Evaluates tasks with a model whose forward ``serve(task)`` sets up; never changes weights.

    For each task: next-token loss and token accuracy over the scored tokens (``losses.token_stats``,
    the sums of training's loss); for classification, from one forward of each batch's prompts
    (:func:`~crma_lightning.evaluation.task_metrics.score_choices`), the loss and token accuracy of
    the example's own label target, the label-set accuracy (every label scored from the prompts' KV
    cache) and exact match of the greedy answer; for a free-text task whose metric asks for it,
    exact match or ROUGE-L of answers from ``generate_ids``.

    Without the task id (:meth:`routed`, for layouts that route) every example is routed to one
    candidate adapter and takes that adapter's numbers: by the statistics router when ``route`` is
    given (each candidate then runs only on its own examples), else by the loss router (every
    candidate scores every prompt, the lowest prompt loss wins). The routing accuracy counts
    examples routed to their own task's adapter; a text block is routed on its first
    ``route_tokens`` tokens. Answers are generated greedily with the KV cache, left padded,
    ``answer_budget`` tokens (the longest label or reference + eos). Sums go through
    :class:`~crma_lightning.evaluation.task_metrics.Sums`, so ranks add up exactly once.
    """

    def __init__(
        self,
        model: nn.Module,
        serve: Callable[[str], AbstractContextManager],
        tokenizer: PreTrainedTokenizerBase | None,
        *,
        pad_id: int,
        route_tokens: int = 16,
        generation_batch_size: int = 16,
        head: nn.Linear | None = None,
        early_stop: bool = False,
        batch_cache: dict[tuple[str, int], dict[str, Tensor]] | None = None,
    ) -> None:
        """``head``: the model's output head, when the loss may be formed from the final hidden
        states without the logits (``crma_lightning.backbone.output_head``; the module's ``fused_head``).
        ``early_stop``: stop generating a batch's answers once every one has ended (eos); only where
        ranks need not run the same forward passes (not a sharded model). ``batch_cache``: where
        :meth:`oracle` keeps each classification batch's per-example outputs, by (task, batch
        index), for :meth:`routed` to take when the statistics router sends a whole batch to its
        own task's adapter (the same forward of the same inputs); share one only between calls
        that see the same model state (one row)."""
        self.model = model
        self.head = head
        self.serve = serve
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.eos_id = None if tokenizer is None else tokenizer.eos_token_id
        self.route_tokens = route_tokens
        self.generation_batch_size = generation_batch_size
        self.early_stop = early_stop and self.eos_id is not None
        self.batch_cache = batch_cache
        # task index -> quantity (``exact``, ``label_correct``, ``loss_sum``, ``tokens``) -> example
        # position -> its value
        self._examples: dict[int, dict[str, dict[int, float]]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- the two modes -------------------------------------------------------------------------
    @torch.no_grad()
    def oracle(self, tasks: Sequence[TaskData]) -> dict[str, dict[str, float]]:
        """Each task evaluated as ``serve(task)`` sets the model up (the task id given)."""
        sums = tm.Sums(len(tasks)).to(self.device)
        self._examples = {}
        for i, task in enumerate(tasks):
            prompts, weights, refs = [], [], []
            with self.serve(task.name):
                seen = 0  # examples (padding included) before this batch: their positions
                for j, batch in enumerate(task.batches):
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    w = batch["example_weight"]
                    at = range(seen, seen + len(w))
                    seen += len(w)
                    if task.choices is not None:  # one forward of the prompts: every metric, the answers
                        scores = self._classify(batch, task)
                        if self.batch_cache is not None:
                            self.batch_cache[task.name, j] = scores
                        sums.update(i, **{k: v * w for k, v in scores.items() if k != "answers"}, examples=w)
                        for q in ("label_correct", "loss_sum", "tokens"):
                            self._keep(i, q, scores[q], w.tolist(), at)
                        if task.budget:
                            self._score_generated(
                                sums, i, scores["answers"], w, self._references(task, batch), at
                            )
                        continue
                    s, _ = batch_token_stats(
                        partial(self._logits, batch), self.head, batch["labels"], w, True
                    )
                    sums.update(i, loss_sum=s.loss_sum, tokens=s.tokens, correct=s.correct, examples=w)
                    self._keep(i, "loss_sum", s.rows[:, 0], w.tolist(), at)
                    self._keep(i, "tokens", s.rows[:, 1], w.tolist(), at)
                    if task.budget:
                        prompts += self._prompts(batch)
                        weights += w.tolist()
                        refs += self._references(task, batch)
                if task.budget and task.choices is None:
                    self._score_answers(sums, i, task, prompts, weights, refs)
        return self._results(tasks, sums)

    @torch.no_grad()
    def routed(
        self, tasks: Sequence[TaskData], candidates: Sequence[str], route: Route | None = None
    ) -> dict[str, dict[str, float]]:
        """Each example served by one candidate (a task name, set up by ``serve``), the task id not
        given: the one ``route`` picks from its prompt (the statistics router), or without ``route``
        the one whose adapters give its prompt the lowest mean next-token loss."""
        candidates = list(candidates)
        sums = tm.Sums(len(tasks)).to(self.device)
        self._examples = {}
        for i, task in enumerate(tasks):
            prompts, weights, refs, chosen = [], [], [], []
            seen = 0
            for j, batch in enumerate(task.batches):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                w = batch["example_weight"]
                at = range(seen, seen + len(w))
                seen += len(w)
                p = self._prompts(batch)
                choice, pick = self._route_batch(batch, p, task, candidates, route, j)
                sums.update(
                    i,
                    loss_sum=pick["loss_sum"] * w,
                    tokens=pick["tokens"] * w,
                    correct=pick["correct"] * w,
                    examples=w,
                )
                if task.choices is not None:
                    sums.update(i, label_correct=pick["label_correct"] * w)
                    self._keep(i, "label_correct", pick["label_correct"], w.tolist(), at)
                    if task.budget:  # each example's greedy answer under the adapter it was routed to
                        self._score_generated(sums, i, pick["answers"], w, self._references(task, batch), at)
                if task.name in candidates:
                    own = choice == candidates.index(task.name)
                    sums.update(i, routed_right=own.double() * w, routable=w)
                if task.budget and task.choices is None:
                    prompts += p
                    weights += w.tolist()
                    refs += self._references(task, batch)
                    chosen += choice.tolist()
            if task.budget and task.choices is None:
                self._score_routed_answers(sums, i, task, candidates, prompts, weights, refs, chosen)
        return self._results(tasks, sums)

    def _route_batch(
        self,
        batch: dict[str, Tensor],
        prompts: list[list[int]],
        task: TaskData,
        candidates: list[str],
        route: Route | None,
        index: int = -1,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Which candidate each example of ``batch`` (``index`` of its task's batches) goes to
        ``(B,)``, and its numbers under that candidate (:meth:`_candidate`'s, per example)."""
        if route is None:  # every candidate scores every prompt; the lowest loss wins
            per = [self._candidate(batch, prompts, task, c, prompt_loss=True) for c in candidates]
            choice = tm.route(torch.stack([c["prompt_loss"] for c in per], dim=1))  # (B,)
            rows = torch.arange(len(choice), device=choice.device)
            return choice, {k: torch.stack([c[k] for c in per], 1)[rows, choice] for k in per[0]}
        choice = route(prompts).to(self.device)
        pick: dict[str, Tensor] = {}
        for c, candidate in enumerate(candidates):  # each candidate serves only its own examples
            rows = (choice == c).nonzero()[:, 0]
            count = _max_over_ranks(len(rows))  # every rank runs the same forward passes
            if count == 0:
                continue
            whole = count == len(rows) == len(choice)  # every example, in order, no filler
            kept = self.batch_cache.get((task.name, index)) if self.batch_cache is not None else None
            if whole and candidate == task.name and kept is not None:
                out = kept  # the oracle ran this very forward (same adapters, same inputs)
            else:
                filler = rows[:1] if len(rows) else torch.zeros(1, dtype=torch.long, device=self.device)
                padded = torch.cat([rows, filler.expand(count - len(rows))])  # padding: computed, dropped
                sub = {k: v[padded] for k, v in batch.items()}
                out = self._candidate(sub, [prompts[k] for k in padded.tolist()], task, candidate)
            for k, v in out.items():
                pick.setdefault(k, v.new_zeros((len(choice), *v.shape[1:])))[rows] = v[: len(rows)]
        return choice, pick

    # -- pieces ----------------------------------------------------------------------------------
    def _logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits

    def _prompts(self, batch: dict[str, Tensor]) -> list[list[int]]:
        """Each example's prompt tokens (before its answer)."""
        n = tm.prompt_lengths(batch["labels"], batch["attention_mask"], self.route_tokens).tolist()
        return [row[:k] for row, k in zip(batch["input_ids"].tolist(), n, strict=True)]

    def _candidate(
        self,
        batch: dict[str, Tensor],
        prompts: list[list[int]],
        task: TaskData,
        candidate: str,
        prompt_loss: bool = False,
    ) -> dict[str, Tensor]:
        """Per example of ``batch`` served as ``candidate``: the answer's loss sum, scored and correct
        tokens, (classification) whether the best label is its own and the greedy answer, and with
        ``prompt_loss`` the prompt's mean loss (the loss router's score)."""
        with self.serve(candidate):
            if task.choices is not None:
                return self._classify(batch, task, prompts, prompt_loss=prompt_loss)
            logits = self._logits(batch)
            stats = tm.per_example(logits, batch["labels"])
            out = {k: stats[k] for k in ("loss_sum", "tokens", "correct")}
            if prompt_loss:
                lengths = torch.tensor([len(p) for p in prompts], device=self.device)
                out["prompt_loss"] = tm.per_example(logits, tm.prompt_labels(batch["input_ids"], lengths))[
                    "mean"
                ]
        return out

    def _classify(
        self,
        batch: dict[str, Tensor],
        task: TaskData,
        prompts: list[list[int]] | None = None,
        prompt_loss: bool = False,
    ) -> dict[str, Tensor]:
        """A classification batch from one forward of its prompts (``task_metrics.score_choices``), per
        example: the loss sum, scored and correct tokens of its own label's target (the numbers a
        forward of prompt + target gives), whether the best-scored label is its own, the greedy
        answer (``(B, budget)`` ids) and, with ``prompt_loss``, the routing score."""
        scores = tm.score_choices(
            self.model,
            prompts or self._prompts(batch),
            task.choices,
            self.pad_id,
            task.budget,
            prompt_loss,
            stop_at=self.eos_id if self.early_stop else None,
        )
        target = batch["target"][:, None]
        lengths = torch.tensor([len(c) for c in task.choices], device=self.device, dtype=torch.float32)
        out = {
            "loss_sum": -scores.log_likelihood.gather(1, target)[:, 0],
            "tokens": lengths[target[:, 0]],
            "correct": scores.correct.gather(1, target)[:, 0],
            "label_correct": (scores.log_likelihood.argmax(1) == target[:, 0]).double(),
            "answers": scores.answers,
        }
        if prompt_loss:
            out["prompt_loss"] = scores.prompt_loss
        return out

    def _references(self, task: TaskData, batch: dict[str, Tensor]) -> list[str]:
        """Each example's reference answer: its label (classification), else its scored tokens
        without the final eos, decoded."""
        if task.choices is not None:
            return [task.spec.labels[t] for t in batch["target"].tolist()]
        out = []
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
            answer = [t for t, y in zip(ids[1:], labels[1:], strict=True) if y != losses.IGNORE_INDEX]
            if answer and answer[-1] == self.eos_id:
                answer = answer[:-1]
            out.append(self._decode(answer))
        return out

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:  # synthetic runs: the token ids as words
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _texts(self, rows: list[list[int]]) -> list[str]:
        """Generated token ids, cut at the first eos, decoded."""
        return [self._decode(row[: row.index(self.eos_id)] if self.eos_id in row else row) for row in rows]

    def _answers(self, prompts: list[list[int]], budget: int) -> list[str]:
        """Greedy answers of ``budget`` tokens (every one generated, the same work on every rank,
        unless ``early_stop``), cut at the first eos, decoded."""
        new = generate_ids(
            self.model,
            prompts,
            pad_id=self.pad_id,
            eos_id=self.eos_id if self.early_stop else None,
            batch_size=self.generation_batch_size,
            max_new_tokens=budget,
            do_sample=False,
            use_cache=True,
        )
        return self._texts(new)

    def _score_texts(
        self,
        sums: tm.Sums,
        i: int,
        answers: list[str],
        refs: list[str],
        weights: list[float],
        at: Sequence[int],
    ) -> None:
        """Exact match and ROUGE-L of ``answers`` against ``refs``, real examples (weight > 0) only;
        ``at``: the examples' positions in their task (for the per-example scores)."""
        real = [k for k, w in enumerate(weights) if w > 0]
        texts, references = [answers[k] for k in real], [refs[k] for k in real]
        exact = tm.exact_matches(texts, references)
        sums.update(i, exact=exact, rouge=tm.rouge_l_sum(texts, references))
        self._keep(i, "exact", exact, [1.0] * len(real), [at[k] for k in real])

    def _keep(self, i: int, quantity: str, values: Tensor, weights: list[float], at: Sequence[int]) -> None:
        """Each real example's 0/1 score of ``quantity`` at its position in task ``i``."""
        kept = self._examples.setdefault(i, {}).setdefault(quantity, {})
        for v, w, k in zip(values.tolist(), weights, at, strict=True):
            if w > 0:
                kept[k] = float(v)

    def _score_generated(
        self, sums: tm.Sums, i: int, answers: Tensor, weights: Tensor, refs: list[str], at: Sequence[int]
    ) -> None:
        """Exact match (and ROUGE-L) of greedy answers ``(B, budget)``, cut at the first eos."""
        self._score_texts(sums, i, self._texts(answers.tolist()), refs, weights.tolist(), at)

    def _score_answers(self, sums: tm.Sums, i: int, task: TaskData, prompts, weights, refs) -> None:
        answers = self._answers(prompts, task.budget)
        self._score_texts(sums, i, answers, refs, weights, range(len(prompts)))

    def _score_routed_answers(self, sums, i, task, candidates, prompts, weights, refs, chosen) -> None:
        """Greedy answers, each under the candidate its example was routed to."""
        for c, candidate in enumerate(candidates):
            rows = [k for k, x in enumerate(chosen) if x == c]
            count = _max_over_ranks(len(rows))
            if count == 0:
                continue
            padded = rows + [rows[0] if rows else 0] * (count - len(rows))  # padding: generated, dropped
            with self.serve(candidate):
                answers = self._answers([prompts[k] for k in padded], task.budget)[: len(rows)]
            self._score_texts(sums, i, answers, [refs[k] for k in rows], [weights[k] for k in rows], rows)

    def _results(self, tasks: Sequence[TaskData], sums: tm.Sums) -> dict[str, dict[str, float]]:
        """Per task: every metric of :data:`METRICS` (NaN where it does not apply) and ``accuracy``,
        the task metric."""
        v = sums.compute().tolist()  # synced over ranks
        out = {}
        for i, (task, row) in enumerate(zip(tasks, v, strict=True)):
            q = dict(zip(tm.QUANTITIES, row, strict=True))
            generated = task.budget > 0
            r = {
                # As before test sets existed: a task with no scored token has loss 0 (tokens >= 1).
                "loss": q["loss_sum"] / max(q["tokens"], 1.0),
                "token_accuracy": q["correct"] / max(q["tokens"], 1.0),
                "exact_match": tm.ratio(q["exact"], q["examples"]) if generated else float("nan"),
                "label_accuracy": tm.ratio(q["label_correct"], q["examples"])
                if task.choices
                else float("nan"),
                "routing_accuracy": tm.ratio(q["routed_right"], q["routable"]),
                "rougeL": tm.ratio(q["rouge"], q["examples"])
                if generated and task.spec.format != "classification"
                else float("nan"),
            }
            r["accuracy"] = r[task.spec.task_metric]
            # the task metric per example, for paired intervals; exact match and label accuracy only
            per = PER_EXAMPLE.get(task.spec.task_metric)
            kept = self._examples.get(i, {}).get(per, {}) if per else {}
            # a collective when several ranks evaluate: called on every rank alike
            r["examples"] = (_gathered([kept[k] for k in sorted(kept)]) or None) if per else None
            # each example's loss sum and token count (with the task id), for paired intervals on the loss
            q = self._examples.get(i, {})
            losses = [[q["loss_sum"][k], q["tokens"][k]] for k in sorted(q.get("loss_sum", {}))]
            r["example_losses"] = _gathered(losses) or None
            out[task.name] = r
        return out


def _gathered(values: list[float]) -> list[float]:
    """Every rank's ``values``, rank 0's first (``values`` itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    out: list[list[float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return [v for part in out for v in part or []]


def _max_over_ranks(n: int) -> int:
    """The largest ``n`` over all ranks (``n`` itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
