"""Benchmark: routing without a task id (``task="auto"``) on a finished run: how often each router
picks the right task, what that does to the holdout losses and the drift, and what it costs.

The two routers of ``crma_lightning.routing.router``:

- ``stats`` (the default): a shared-covariance discriminant over a pooled hidden state of the
  frozen base, from the run's routing statistics (``routing/<task>.*``, gathered from each task's
  training data); one base forward pass per prompt that stops at the routing layer.
- ``loss``: every task's adapter (LoRA_k + the run's CRMA) scores the prompt by its own mean
  next-token loss, the lowest wins; K forward passes for K tasks.

Protocol, on the run's own holdout split (the DataModule rebuilt from the run's ``config.yaml``:
same data, seed and sizes, so the same examples that filled ``continual/loss_matrix.csv``):

- The prompt of a holdout example is what a user would send: for ``prompt_response`` tasks its
  unlabelled prompt; for ``text`` tasks (and synthetic ones) its first P tokens, for each P of
  ``--prompt-tokens`` (at most the example's length - 1).
- Routing accuracy per task = share of that task's holdout examples routed to it.
- Loss rows: the final row L[T, i] (mean loss per labelled token of task i's holdout) evaluated with
  the oracle task id and with the routed one. With routed ids the prompt's own tokens enter both the
  choice and the loss (a small optimistic bias for the loss router), so the loss of the continuation
  alone (tokens after the prompt) is reported too: there the choice never saw the tokens it is
  scored on.
- Drift: ``crma_lightning.evaluation.metrics.drift_pct`` of the run's loss matrix with its final row replaced
  by the oracle row (recomputed, as a check against the CSV) and by each router's row.
- Confidence: the share of prompts whose stats confidence is below each threshold (0.5, 0.9, 0.99;
  sent to the loss router as fallback) and the accuracy of that combination.
- Cost per prompt at one prompt length (16 tokens), at batch 16 and at batch 1: routing alone, and
  routing plus the forward pass of the chosen task (prompts grouped by chosen task, as ``complete``
  does), against one forward pass with the task known.
  Variants run in interleaved rounds (harness.py), median over ``--repeats`` rounds after a warm-up.
- Selection (``--select-layers``): the layer, pooling and shrinkage of the stats router chosen by
  k-fold cross-validation on the run's *training* data (never its holdout): folds are contiguous
  runs of each task's training set (stored grouped by source record), statistics from the other
  folds, accuracy on the held-out fold's prompts at each P.

Run:  python benchmarks/bench_routing.py --run runs/tiny/version_0
A run without routing statistics needs them first: ``python train.py route --run <run> --build-stats``.
Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/routing``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from harness import interleave, machine_line, repo_relative, run_info, table, time_call, write_report

from crma_lightning.core.losses import IGNORE_INDEX, token_losses
from crma_lightning.data.loading import pad
from crma_lightning.evaluation import metrics as clm
from crma_lightning.routing import routers as routing
from crma_lightning.routing.router import DEFAULT_SHRINKAGE
from crma_lightning.routing.stats import (
    base_hiddens,
    num_layers,
    prefix_table,
    prompt_lengths,
    read_task_stats,
)
from crma_lightning.runs.rundir import ACCURACY_MATRIX, BASE_ROW, LOSS_MATRIX
from crma_lightning.serve import TrainedRun, build_routing_stats, load_run

Example = tuple[list[int], list[int]]
"""One holdout example, unpadded: ``(input_ids, labels)``."""

ROUTERS = ("stats", "loss")
BATCH = 16  # prompts per forward pass
COST_PROMPT_TOKENS = 16  # P for the timing
THRESHOLDS = (0.5, 0.9, 0.99)  # stats confidences below which the loss router is the fallback


def holdout_examples(run: TrainedRun, batch_size: int) -> dict[str, list[Example]]:
    """``task -> [(input_ids, labels)]`` of every trained task's holdout set, unpadded."""
    dm = run.info.datamodule()
    dm.setup()
    out = {}
    for task in run.tasks:
        rows = []
        for b in dm.holdout_batches(task, batch_size=batch_size):
            for ids, labels, mask, w in zip(
                b["input_ids"], b["labels"], b["attention_mask"], b["example_weight"], strict=True
            ):
                if w > 0:
                    n = int(mask.sum())
                    rows.append((ids[:n].tolist(), labels[:n].tolist()))
        out[task] = rows
    return out


@torch.no_grad()
def token_scores(run: TrainedRun, examples: list[Example], batch_size: int):
    """Per adapter k and example e: next-token NLL and correctness at every position, as float arrays
    ``nll[k][e]``, ``correct[k][e]`` of length len(example) - 1, NaN where the target is unscored."""
    nll, correct = [], []
    for task in run.tasks:
        nll_k, cor_k = [], []
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo : lo + batch_size]
            ids, mask = pad([e[0] for e in chunk], run.pad_id)
            labels, _ = pad([e[1] for e in chunk], IGNORE_INDEX)
            t = token_losses(run.logits(ids, mask, task=task), labels.to(run.device))  # (B, T-1) each
            keep = t.scored.bool()
            nll_b = torch.where(keep, t.nll, torch.nan).cpu().numpy()
            cor_b = torch.where(keep, t.correct, torch.nan).cpu().numpy()
            for row, e in enumerate(chunk):
                n = len(e[0]) - 1
                nll_k.append(nll_b[row, :n])
                cor_k.append(cor_b[row, :n])
        nll.append(nll_k)
        correct.append(cor_k)
    return nll, correct


def prompt_length(example: Example, p: int) -> int:
    """Tokens of the example sent as the prompt: the unlabelled prefix, or else the first ``p``."""
    first = next((i for i, y in enumerate(example[1]) if y != IGNORE_INDEX), 0)
    return first if first > 0 else max(1, min(p, len(example[0]) - 1))


def per_task(
    values, choice: Sequence[int], truth: np.ndarray, start: Sequence[int] | None = None
) -> list[float]:
    """For each true task i: the mean over labelled positions of ``values[choice[e]][e]``, pooled over
    task i's examples e (only positions predicting tokens from ``start[e]`` on, if given)."""
    out = []
    for i in range(len(values)):
        parts = [
            values[choice[e]][e][max(start[e] - 1, 0) if start else 0 :] for e in np.flatnonzero(truth == i)
        ]
        v = np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)
        v = v[~np.isnan(v)]
        out.append(float(v.mean()) if v.size else float("nan"))
    return out


def run_matrices(run: TrainedRun) -> tuple[np.ndarray, np.ndarray] | None:
    """The run's loss and accuracy matrices (base row + one per trained task, trained tasks' columns)."""
    rd = run.info.run
    if not rd.matrix_file(LOSS_MATRIX).is_file():
        return None
    loss, acc = rd.read_matrix(LOSS_MATRIX), rd.read_matrix(ACCURACY_MATRIX)
    if loss.rows != [BASE_ROW, *run.tasks]:
        return None
    cols = [loss.tasks.index(t) for t in run.tasks]
    return loss.values[:, cols], acc.values[:, cols]


# -- selection on the training data ------------------------------------------------------------
@torch.no_grad()
def select(
    run: TrainedRun,
    layers: list[int],
    poolings: list[str],
    shrinkages: list[float],
    prompt_tokens: list[int],
    folds: int,
    max_examples: int | None,
    batch_size: int,
) -> dict:
    """k-fold cross-validated routing accuracy of the stats router for each (layer, pooling,
    shrinkage), on the training data only; the statistics are gathered as the callback does."""
    dm = run.info.datamodule()
    dm.setup()
    feats: dict[tuple[int, str], list[torch.Tensor]] = {(la, po): [] for la in layers for po in poolings}
    prompts: dict[tuple[int, str], list[torch.Tensor]] = {(la, po): [] for la in layers for po in poolings}
    weights, labels, fold_of = [], [], []
    for k, task in enumerate(run.tasks):
        n_task = min(dm.num_train_examples(task), max_examples or dm.num_train_examples(task))
        seen = 0
        for batch in dm.train_batches(task, batch_size=batch_size, limit=max_examples):
            ids, mask = batch["input_ids"].to(run.device), batch["attention_mask"].to(run.device)
            hidden = base_hiddens(run.model, run.crma, ids, mask, layers, stop=True)
            lengths, text = prompt_lengths(batch["labels"], batch["attention_mask"])
            table = prefix_table(lengths, text)  # (B, M) training prefixes
            # What a router is asked: the first P tokens of a text example (at most its length - 1),
            # the whole prompt of a prompt/response example.
            asked = torch.stack(
                [
                    torch.where(
                        text, torch.clamp(torch.full_like(lengths, p), max=lengths - 1).clamp_min(1), lengths
                    )
                    for p in prompt_tokens
                ],
                1,
            )
            for (la, po), out in feats.items():
                out.append(routing.prefix_pool(hidden[la].cpu(), table, po))
                prompts[(la, po)].append(routing.prefix_pool(hidden[la].cpu(), asked, po))
            weights.append((table > 0).double())
            b = ids.shape[0]
            labels.append(torch.full((b,), k))
            fold_of.append(torch.tensor([(seen + i) * folds // n_task for i in range(b)]))
            seen += b
    w, y, fold = torch.cat(weights), torch.cat(labels), torch.cat(fold_of)
    rows = []
    for (la, po), parts in feats.items():
        x, asked = torch.cat(parts), torch.cat(prompts[(la, po)])  # (N, M, D), (N, P, D)
        dim = x.shape[-1]
        sums = {
            (k, f): routing.feature_sums(
                x[(y == k) & (fold == f)].reshape(-1, dim), w[(y == k) & (fold == f)].reshape(-1)
            )
            for k in range(len(run.tasks))
            for f in range(folds)
        }
        for lam in shrinkages:
            right = torch.zeros(len(prompt_tokens))
            for f in range(folds):
                train = [
                    sum((sums[(k, g)] for g in range(folds) if g != f), routing.FeatureSums.zeros(dim))
                    for k in range(len(run.tasks))
                ]
                lda = routing.fit_lda(train, lam)
                held = fold == f
                for j in range(len(prompt_tokens)):
                    right[j] += (lda.scores(asked[held, j]).argmax(1) == y[held]).sum()
            acc = (right / len(y)).tolist()
            rows.append(
                {"layer": la, "pooling": po, "shrinkage": lam, "accuracy": acc, "mean": float(np.mean(acc))}
            )
    best = max(rows, key=lambda r: (round(r["mean"], 6), -r["layer"]))
    return {
        "folds": folds,
        "examples": len(y),
        "prompt_tokens": prompt_tokens,
        "rows": rows,
        "best": best,
        "num_layers": num_layers(run.model),
    }


# -- the measurement -------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished run directory")
    ap.add_argument(
        "--prompt-tokens", type=int, nargs="+", default=[4, 8, 16, 64], help="prompt lengths P for text tasks"
    )
    ap.add_argument("--timing-prompts", type=int, default=48, help="prompts timed at batch 1")
    ap.add_argument("--repeats", type=int, default=3, help="timing rounds (median)")
    ap.add_argument(
        "--select-layers",
        type=int,
        nargs="*",
        default=None,
        help="cross-validate these layers on the training data (no value: every layer)",
    )
    ap.add_argument("--no-batch-1", action="store_true", help="time only at batch 16")
    ap.add_argument("--out", default="benchmarks/results/routing", help="output path without extension")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    info = run_info(__file__, argv)
    started = time.perf_counter()

    run = load_run(args.run)
    tasks = run.tasks
    stats_meta = read_task_stats(run.info.run, tasks[0])[1]
    shrinkage = DEFAULT_SHRINKAGE
    run.stats_router(shrinkage)  # missing or damaged statistics fail here, naming the fix
    result: dict = {
        "command": info["command"],
        "date": info["date"],
        "machine": f"{machine_line(info['machine'])}, device cpu",
        "load_avg_1min_start": round(info["load_start"], 2),
        "run_dir": repo_relative(run.info.run_dir),
        "strategy": run.strategy,
        "base_model": run.info.backbone.label,
        "tasks": tasks,
        "stats": {
            "layer": stats_meta["layer"],
            "num_layers": stats_meta["num_layers"],
            "pooling": stats_meta["pooling"],
            "shrinkage": shrinkage,
            "examples_per_task": stats_meta["examples"],
            "features_per_task": stats_meta["features"],
            "feature_dim": stats_meta["feature_dim"],
        },
    }
    if args.select_layers is not None:
        layers = args.select_layers or list(range(1, num_layers(run.model) + 1))
        result["selection"] = select(
            run,
            layers,
            ["mean", "last"],
            [0.1, 0.3, 0.5],
            args.prompt_tokens,
            4,
            stats_meta["max_examples"],
            BATCH,
        )
        print("selection done", result["selection"]["best"], flush=True)
        best = result["selection"]["best"]
        # Serve what the cross-validation chose: its shrinkage, and statistics at its layer/pooling.
        shrinkage = best["shrinkage"]
        if (best["layer"], best["pooling"]) != (stats_meta["layer"], stats_meta["pooling"]):
            build_routing_stats(run, layer=best["layer"], pooling=best["pooling"], overwrite=True, log=print)
            run.forget_router()
            result["stats_rebuilt"] = (
                f"the run's statistics (layer {stats_meta['layer']}, "
                f"{stats_meta['pooling']} pooling) were rebuilt at the selected layer "
                f"{best['layer']}, {best['pooling']} pooling, from the same training examples"
            )
            stats_meta = read_task_stats(run.info.run, tasks[0])[1]
        result["stats"] |= {
            "layer": stats_meta["layer"],
            "pooling": stats_meta["pooling"],
            "shrinkage": shrinkage,
            "features_per_task": stats_meta["features"],
        }

    per_task_examples = holdout_examples(run, BATCH)
    examples = [e for t in tasks for e in per_task_examples[t]]
    truth = np.array([k for k, t in enumerate(tasks) for _ in per_task_examples[t]])
    oracle = truth.tolist()
    nll, correct = token_scores(run, examples, BATCH)
    result |= {
        "holdout_examples": {t: len(per_task_examples[t]) for t in tasks},
        "oracle": {"loss": per_task(nll, oracle, truth), "accuracy": per_task(correct, oracle, truth)},
        "by_prompt_tokens": {},
    }
    matrices = run_matrices(run)
    if matrices is not None:
        result["csv_final_row"] = matrices[0][-1].tolist()
        result["oracle_vs_csv_max_abs_diff"] = float(
            np.max(np.abs(matrices[0][-1] - result["oracle"]["loss"]))
        )

    def drift_with(final_loss: list[float], final_acc: list[float]) -> tuple[float | None, float | None]:
        if matrices is None or len(tasks) < 2:
            return None, None
        loss, acc = (m.copy() for m in matrices)
        loss[-1], acc[-1] = final_loss, final_acc
        return clm.drift_pct(loss), clm.bwt(acc)

    o = result["oracle"]
    o["drift_pct"], o["bwt"] = drift_with(o["loss"], o["accuracy"])
    if matrices is not None and len(tasks) >= 2:
        result["csv_drift_pct"] = clm.drift_pct(matrices[0])

    def evaluate(choice: list[int], starts: list[int], full: np.ndarray) -> dict:
        confusion = np.zeros((len(tasks), len(tasks)), dtype=int)
        np.add.at(confusion, (truth, choice), 1)
        right = np.asarray(choice) == truth
        routed_loss, routed_acc = per_task(nll, choice, truth), per_task(correct, choice, truth)
        drift, bwt = drift_with(routed_loss, routed_acc)
        return {
            "routing_accuracy": {
                t: float(confusion[i, i] / max(confusion[i].sum(), 1)) for i, t in enumerate(tasks)
            },
            "routing_accuracy_all": float(np.trace(confusion) / confusion.sum()),
            "routing_accuracy_full_prompts": float(right[full].mean()) if full.any() else None,
            "confusion": confusion.tolist(),
            "routed": {"loss": routed_loss, "accuracy": routed_acc, "drift_pct": drift, "bwt": bwt},
            "continuation_loss": per_task(nll, choice, truth, starts),
        }

    for p in args.prompt_tokens:
        starts = [prompt_length(e, p) for e in examples]
        prompts = [e[0][:s] for e, s in zip(examples, starts, strict=True)]
        stats = run.route_decisions(prompts, batch_size=BATCH, router="stats", shrinkage=shrinkage)
        loss = run.route_decisions(prompts, batch_size=BATCH, router="loss")
        # Text prompts that got all P tokens (the rest are holdout blocks shorter than P + 1).
        full = np.array([s == p or e[1][0] == IGNORE_INDEX for e, s in zip(examples, starts, strict=True)])
        entry = {
            "mean_prompt_tokens": float(np.mean(starts)),
            "full_prompts": int(full.sum()),
            "oracle_continuation_loss": per_task(nll, oracle, truth, starts),
            "stats": evaluate([tasks.index(d.task) for d in stats], starts, full),
            "loss": evaluate([tasks.index(d.task) for d in loss], starts, full),
        }
        conf = np.array([d.confidence for d in stats])
        right = np.array([d.task == tasks[t] for d, t in zip(stats, truth, strict=True)])
        loss_right = np.array([d.task == tasks[t] for d, t in zip(loss, truth, strict=True)])
        entry["stats"]["confidence"] = {
            "mean_right": float(conf[right].mean()) if right.any() else None,
            "mean_wrong": float(conf[~right].mean()) if (~right).any() else None,
            "fallback": [
                {
                    "threshold": th,
                    "share": float((conf < th).mean()),
                    "accuracy": float(np.where(conf < th, loss_right, right).mean()),
                }
                for th in THRESHOLDS
            ],
        }
        result["by_prompt_tokens"][str(p)] = entry
        print(
            f"P={p}: stats {entry['stats']['routing_accuracy_all']:.3f}, loss "
            f"{entry['loss']['routing_accuracy_all']:.3f}",
            flush=True,
        )

    # Cost, at one prompt length: routing, and routing + the chosen task's forward, against one
    # forward pass with the task known.
    p = COST_PROMPT_TOKENS
    prompts = [e[0][: prompt_length(e, p)] for e in examples]
    few = prompts[: args.timing_prompts]

    def routed_forward(items: list[list[int]], batch: int, router: str) -> None:
        chosen = run.route_ids(items, batch_size=batch, router=router)
        for task in dict.fromkeys(chosen):
            run.prompt_losses(
                [x for x, c in zip(items, chosen, strict=True) if c == task], task, batch_size=batch
            )

    calls = {
        "known": lambda: run.prompt_losses(prompts, tasks[0], batch_size=BATCH),
        "known_1": lambda: run.prompt_losses(few, tasks[0], batch_size=1),
    }
    if args.no_batch_1:
        del calls["known_1"]
    for r in ROUTERS:
        calls[f"{r}_route"] = lambda r=r: run.route_ids(prompts, batch_size=BATCH, router=r)
        calls[f"{r}_total"] = lambda r=r: routed_forward(prompts, BATCH, r)
        if not args.no_batch_1:
            calls[f"{r}_route_1"] = lambda r=r: run.route_ids(few, batch_size=1, router=r)
            calls[f"{r}_total_1"] = lambda r=r: routed_forward(few, 1, r)
    rounds = interleave(
        {k: lambda f=f: time_call(f).wall_s for k, f in calls.items()}, args.repeats, warmup=1
    )
    t = {k: statistics.median(v) for k, v in rounds.values.items()}
    cost: dict = {
        "prompt_tokens": p,
        "batch_size": BATCH,
        "rounds": args.repeats,
        "others_cpu_pct_per_round": rounds.others_pct,
        "ms_per_prompt": {},
    }
    for k, v in t.items():
        cost["ms_per_prompt"][k] = 1e3 * v / (len(few) if k.endswith("_1") else len(prompts))
    ratios = {}
    for k in t:
        base = "known_1" if k.endswith("_1") else "known"
        ratios[k] = statistics.median(
            a / b for a, b in zip(rounds.values[k], rounds.values[base], strict=True)
        )
    for r in ROUTERS:  # the steady state: routing, then a full batch of the chosen task
        for sfx, base in (("", "known"), ("_1", "known_1"))[: 1 if args.no_batch_1 else 2]:
            ratios[f"{r}_route_plus_known{sfx}"] = statistics.median(
                (a + b) / b
                for a, b in zip(rounds.values[f"{r}_route{sfx}"], rounds.values[base], strict=True)
            )
            cost["ms_per_prompt"][f"{r}_route_plus_known{sfx}"] = (
                cost["ms_per_prompt"][f"{r}_route{sfx}"] + cost["ms_per_prompt"][base]
            )
    cost["paired_ratio_vs_known"] = ratios
    result["cost"] = cost
    result["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    text = render(result)
    write_report(args.out, text, result)
    print(text)
    return result


# -- the report ------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 4) -> str:
    return "—" if x is None or x != x else f"{x:.{digits}f}"


def _cells(values: Sequence[float | None], digits: int = 4) -> str:
    return " | ".join(_f(v, digits) for v in values)


ROUTER_TEXT = {
    "stats": "routing statistics: shared-covariance discriminant over the frozen base's layer-{layer} "
    "{pooling}-pooled hidden state (layer {layer} of {num_layers}; shrinkage {shrinkage}); {examples} "
    "training examples per task, {features:.0f} prefix features",
    "loss": "argmin over tasks of the prompt's mean next-token loss under LoRA_k + CRMA",
}


def render(r: dict) -> str:
    tasks, by_p = r["tasks"], r["by_prompt_tokens"]
    s = r["stats"]
    lines = [
        "# Routing without a task id (`task: auto`)",
        "",
        f"- Command: `{r['command']}`",
        f"- Run: `{r['run_dir']}` ({r['strategy']}, base {r['base_model']}, tasks {', '.join(tasks)}; "
        f"holdout examples per task {', '.join(str(v) for v in r['holdout_examples'].values())})",
        *[f"- {note}" for note in r.get("notes", [])],
        f"- Date: {r['date']}; wall time {r.get('wall_s', '—')} s; machine: {r['machine']}; "
        f"load average {r['load_avg_1min_start']} / {r['load_avg_1min_end']}",
        *([f"- Statistics: {r['stats_rebuilt']}."] if "stats_rebuilt" in r else []),
        "- Routers: **stats** = "
        + ROUTER_TEXT["stats"].format(
            layer=s["layer"],
            num_layers=s["num_layers"],
            pooling=s["pooling"],
            shrinkage=s["shrinkage"],
            examples=s["examples_per_task"],
            features=s["features_per_task"] / 1.0,
        ),
        "  **loss** = " + ROUTER_TEXT["loss"] + ".",
        "- Prompt = the first P tokens of a holdout example, at most its length - 1 (the unlabelled prompt "
        "for prompt/response tasks).",
    ]
    if "selection" in r:
        lines += render_selection(r["selection"])
    lines += [
        "",
        "## Routing accuracy (share of each task's holdout examples routed to that task)",
        "",
        "The last column counts only the prompts that got all P tokens (holdout blocks longer than P).",
        "",
    ]
    lines += table(
        ["P (mean tokens)", "router", *tasks, "all", "prompts of P tokens (how many)"],
        [
            [
                f"{p} ({b['mean_prompt_tokens']:.1f})",
                router,
                _cells([x["routing_accuracy"][t] for t in tasks], 3),
            ]
            + [f"{x['routing_accuracy_all']:.3f}"]
            + [f"{_f(x.get('routing_accuracy_full_prompts'), 3)} ({b.get('full_prompts', '—')})"]
            for p, b in by_p.items()
            for router, x in ((router, b[router]) for router in ROUTERS)
        ],
    )
    lines += ["", "## Final-row holdout loss L[T, i] and drift: oracle vs routed task ids", ""]
    o, rows = r["oracle"], []
    if "csv_final_row" in r:  # its bwt cell is empty: "| |"
        rows.append(
            ["run's loss_matrix.csv", _cells(r["csv_final_row"]), _f(r.get("csv_drift_pct"), 3) + " |"]
        )
    rows.append(["oracle (recomputed)", _cells(o["loss"]), _f(o["drift_pct"], 3), _f(o["bwt"])])
    for p, b in by_p.items():
        for router in ROUTERS:
            x = b[router]["routed"]
            rows.append([f"{router}, P={p}", _cells(x["loss"]), _f(x["drift_pct"], 3), _f(x["bwt"])])
    lines += table(["evaluation", *tasks, "drift_pct", "bwt"], rows)
    if "oracle_vs_csv_max_abs_diff" in r:
        lines += ["", f"Oracle row vs the run's CSV: max |diff| = {r['oracle_vs_csv_max_abs_diff']:.2e}."]
    lines += [
        "",
        "Loss on the continuation only (tokens after the prompt; no router saw them), oracle / stats / loss:",
        "",
    ]
    rows = []
    for p, b in by_p.items():
        losses = (
            b["oracle_continuation_loss"],
            b["stats"]["continuation_loss"],
            b["loss"]["continuation_loss"],
        )
        rows.append(
            [p, *(" / ".join(map(_f, x)) for x in [*zip(*losses, strict=True), map(np.nanmean, losses)])]
        )
    lines += table(["P", *tasks, "mean"], rows)
    lines += [
        "",
        "## Confidence of the stats router, and falling back to the loss router",
        "",
        "Confidence = the posterior probability of the chosen task. Below a threshold the prompt goes to the "
        "loss router (K more forward passes).",
        "",
    ]
    fallback = next(iter(by_p.values()))["stats"]["confidence"]["fallback"]
    lines += table(
        ["P", "mean confidence, right / wrong"]
        + [f"threshold {x['threshold']}: share to loss, accuracy" for x in fallback],
        [
            [p, f"{_f(c['mean_right'], 3)} / {_f(c['mean_wrong'], 3)}"]
            + [f"{x['share']:.3f}, {x['accuracy']:.3f}" for x in c["fallback"]]
            for p, c in ((p, b["stats"]["confidence"]) for p, b in by_p.items())
        ],
    )
    first = next(iter(by_p))
    for router in ROUTERS:
        lines += [
            "",
            f"Confusion of the {router} router at P={first} (rows: true task, columns: routed task):",
            "",
        ]
        lines += table(
            ["true \\ routed", *tasks],
            [[t, *c] for t, c in zip(tasks, by_p[first][router]["confusion"], strict=True)],
        )
    c = r["cost"]
    ms, ratio = c["ms_per_prompt"], c["paired_ratio_vs_known"]
    lines += [
        "",
        f"## Cost per prompt (P={c['prompt_tokens']}; median of {c['rounds']} interleaved rounds; ratio = "
        "median of per-round ratios to the known-task forward)",
        "",
        "Two ways to count the chosen task's forward pass: *grouped* runs the prompts routed to each task "
        "as one "
        f"group ({len(r['tasks'])} groups of the {sum(r['holdout_examples'].values())} prompts, each in "
        "batches of "
        f"{c['batch_size']}: leftover batches are smaller, as `complete()` does with these prompts); *+ "
        "known* adds one "
        "known-task forward at the full batch (a stream of prompts, where each task's batch fills up).",
        "",
    ]
    parts = {"route": "route", "route_plus_known": "route + known", "total": "route + grouped forward"}
    keys = [f"{router}_{k}" for router in ROUTERS for k in parts]
    lines += table(
        [
            "batch",
            "one forward, task known",
            *(f"{router}: {x}" for router in ROUTERS for x in parts.values()),
        ],
        [
            [batch, f"{ms['known' + sfx]:.2f} ms"]
            + [
                f"{ms[k + sfx]:.2f} ms ({ratio[k + sfx]:.2f}x)" if k + sfx in ms else "not timed"
                for k in keys
            ]
            for batch, sfx in ((c["batch_size"], ""), (1, "_1"))
            if "known" + sfx in ms
        ],
    )
    others = [x for x in c["others_cpu_pct_per_round"] if x is not None]
    if others:
        lines += [
            "",
            f"Other processes used {min(others):.0f}-{max(others):.0f} % of the machine's CPU during the "
            "timed rounds.",
        ]
    return "\n".join(lines) + "\n"


def render_selection(sel: dict) -> list[str]:
    ps, best = sel["prompt_tokens"], sel["best"]
    columns = sorted({(x["pooling"], x["shrinkage"]) for x in sel["rows"]})
    by_key = {(x["layer"], x["pooling"], x["shrinkage"]): x for x in sel["rows"]}
    lines = [
        "",
        f"## Choosing the layer, pooling and shrinkage ({sel['folds']}-fold cross-validation on the "
        "training data)",
        "",
        f"{sel['examples']} training examples (never the holdout); each cell is the routing accuracy on the "
        "held-out "
        f"fold's prompts, averaged over P = {', '.join(map(str, ps))}; the model has {sel['num_layers']} "
        "decoder layers. "
        f"Best: layer {best['layer']}, {best['pooling']} pooling, shrinkage {best['shrinkage']} "
        f"({', '.join(f'P={p}: {a:.3f}' for p, a in zip(ps, best['accuracy'], strict=True))}).",
        "",
    ]
    layers = sorted({x["layer"] for x in sel["rows"]})
    rows = [[la, *(f"{by_key[(la, po, lam)]['mean']:.3f}" for po, lam in columns)] for la in layers]
    return lines + table(["layer", *(f"{po}, {lam}" for po, lam in columns)], rows)


if __name__ == "__main__":
    main()
