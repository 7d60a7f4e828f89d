"""Benchmark: routing without a task id (``task="auto"``) on a finished run — how often it picks the
right task, what it does to the holdout losses and the drift, and what it costs per prompt.

The router (``crma_lightning.serve.run.TrainedRun.route_ids``) scores a prompt with every task's
adapter (LoRA_k + the run's CRMA) by the prompt's own mean next-token loss and picks the lowest.

Protocol, on the run's own holdout split (the DataModule rebuilt from the run's ``config.yaml``:
same data, seed and sizes, so the same examples that filled ``continual/loss_matrix.csv``):

- The prompt of a holdout example is what a user would send: for ``prompt_response`` tasks its
  unlabelled prompt; for ``text`` tasks (and synthetic ones) its first P tokens, for each P of
  ``--prompt-tokens`` (at most the example's length - 1).
- Routing accuracy per task = share of that task's holdout examples routed to it.
- Loss rows: the final row L[T, i] (mean loss per labelled token of task i's holdout) evaluated with
  the oracle task id and with the routed one. With routed ids the prompt's own tokens enter both the
  choice and the loss (a small optimistic bias), so the loss of the continuation alone (tokens
  after the prompt) is reported too: there the choice never saw the tokens it is scored on.
- Drift: ``crma_lightning.metrics.drift_pct`` of the run's loss matrix with its final row replaced
  by the oracle row (recomputed, as a check against the CSV) and by the routed row.
- Cost: wall time of routing (K forward passes over the prompt, K = number of tasks) per prompt,
  at ``--batch-size`` and at batch 1, next to one forward pass with the task known; at one prompt
  length (``--cost-prompt-tokens``, default the largest P). The four are timed in interleaved
  rounds (harness.py), median over ``--repeats`` rounds after one warm-up round.

Run:  .venv/bin/python benchmarks/bench_routing.py --run runs/tiny/version_0
Works on any finished run dir (synthetic, text or prompt/response tasks; random-init, local-folder
or GGUF backbones). Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/routing``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence

import numpy as np
import torch
from harness import interleave, machine_line, repo_relative, run_info, time_call, write_report

from crma_lightning import metrics as clm
from crma_lightning.data.loading import pad
from crma_lightning.losses import IGNORE_INDEX, token_losses
from crma_lightning.rundir import ACCURACY_MATRIX, BASE_ROW, LOSS_MATRIX
from crma_lightning.serve import TrainedRun, load_run

Example = tuple[list[int], list[int]]
"""One holdout example, unpadded: ``(input_ids, labels)``."""


def holdout_examples(run: TrainedRun, batch_size: int) -> dict[str, list[Example]]:
    """``task -> [(input_ids, labels)]`` of every trained task's holdout set, unpadded."""
    dm = run.info.datamodule()
    dm.setup()
    out = {}
    for task in run.tasks:
        rows = []
        for b in dm.holdout_batches(task, batch_size=batch_size):
            for ids, labels, mask, w in zip(b["input_ids"], b["labels"], b["attention_mask"], b["example_weight"],
                                            strict=True):  # fmt: skip
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


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished run directory")
    ap.add_argument(
        "--prompt-tokens", type=int, nargs="+", default=[4, 8, 16], help="prompt lengths P for text tasks"
    )
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    ap.add_argument(
        "--cost-prompt-tokens", type=int, default=None, help="P for the timing (default: the largest)"
    )
    ap.add_argument("--timing-prompts", type=int, default=48, help="prompts timed at batch 1")
    ap.add_argument("--repeats", type=int, default=3, help="timing rounds (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/routing", help="output path without extension")
    ap.add_argument("--note", default="", help="a line for the report, e.g. the command that trained the run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = run_info(__file__, argv, drop=("--note",))

    run = load_run(args.run, device=args.device)
    tasks = run.tasks
    per_task_examples = holdout_examples(run, args.batch_size)
    examples = [e for t in tasks for e in per_task_examples[t]]
    truth = np.array([k for k, t in enumerate(tasks) for _ in per_task_examples[t]])
    oracle = truth.tolist()
    nll, correct = token_scores(run, examples, args.batch_size)
    result: dict = {
        "command": info["command"],
        "date": info["date"],
        "machine": f"{machine_line(info['machine'])}, device {args.device}",
        "load_avg_1min_start": round(info["load_start"], 2),
        "run_dir": repo_relative(run.info.run_dir),
        "note": args.note,
        "strategy": run.strategy,
        "base_model": run.info.backbone.label,
        "tasks": tasks,
        "holdout_examples": {t: len(per_task_examples[t]) for t in tasks},
        "router": "argmin over tasks of the prompt's mean next-token loss under LoRA_k + CRMA",
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

    for p in args.prompt_tokens:
        starts = [prompt_length(e, p) for e in examples]
        chosen = run.route_ids(
            [e[0][:s] for e, s in zip(examples, starts, strict=True)], batch_size=args.batch_size
        )
        choice = [tasks.index(t) for t in chosen]
        confusion = np.zeros((len(tasks), len(tasks)), dtype=int)
        np.add.at(confusion, (truth, choice), 1)
        routed_loss, routed_acc = per_task(nll, choice, truth), per_task(correct, choice, truth)
        drift, bwt = drift_with(routed_loss, routed_acc)
        result["by_prompt_tokens"][str(p)] = {
            "mean_prompt_tokens": float(np.mean(starts)),
            "routing_accuracy": {
                t: float(confusion[i, i] / max(confusion[i].sum(), 1)) for i, t in enumerate(tasks)
            },
            "routing_accuracy_all": float(np.trace(confusion) / confusion.sum()),
            "confusion": confusion.tolist(),
            "routed": {"loss": routed_loss, "accuracy": routed_acc, "drift_pct": drift, "bwt": bwt},
            "continuation": {
                "oracle_loss": per_task(nll, oracle, truth, starts),
                "routed_loss": per_task(nll, choice, truth, starts),
            },
        }

    # Cost, at one prompt length: routing (K forward passes) against one forward with the task known.
    p = args.cost_prompt_tokens or max(args.prompt_tokens)
    prompts = [e[0][: prompt_length(e, p)] for e in examples]
    few = prompts[: args.timing_prompts]
    calls = {
        "route": lambda: run.route_ids(prompts, batch_size=args.batch_size),
        "known": lambda: run.prompt_losses(prompts, tasks[0], batch_size=args.batch_size),
        "route_1": lambda: run.route_ids(few, batch_size=1),
        "known_1": lambda: run.prompt_losses(few, tasks[0], batch_size=1),
    }
    rounds = interleave(
        {k: lambda f=f: time_call(f).wall_s for k, f in calls.items()}, args.repeats, warmup=1
    )
    t = {k: statistics.median(v) for k, v in rounds.values.items()}
    result["cost"] = {
        "prompt_tokens": p,
        "batch_size": args.batch_size,
        "route_ms_per_prompt": 1e3 * t["route"] / len(prompts),
        "one_forward_ms_per_prompt": 1e3 * t["known"] / len(prompts),
        "route_ms_per_prompt_batch1": 1e3 * t["route_1"] / len(few),
        "one_forward_ms_per_prompt_batch1": 1e3 * t["known_1"] / len(few),
        "forward_passes_per_prompt": len(tasks),
    }
    result["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    text = render(result)
    write_report(args.out, text, result)
    print(text)
    return result


def _f(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _cells(values: Sequence[float | None], digits: int = 4) -> str:
    return " | ".join(_f(v, digits) for v in values)


def render(r: dict) -> str:
    tasks, by_p, n = r["tasks"], r["by_prompt_tokens"], len(r["tasks"])
    lines = [
        "# Routing without a task id (`task: auto`)",
        "",
        f"- Command: `{r['command']}`",
        f"- Run: `{r['run_dir']}` ({r['strategy']}, base {r['base_model']}, tasks {', '.join(tasks)}; "
        f"holdout examples per task {', '.join(str(v) for v in r['holdout_examples'].values())})",
        *([f"- {r['note']}"] if r.get("note") else []),
        f"- Date: {r['date']}; machine: {r['machine']}; load average {r['load_avg_1min_start']} / {r['load_avg_1min_end']}",
        f"- Router: {r['router']}. Prompt = the first P tokens of a holdout example (the unlabelled prompt "
        "for prompt/response tasks).",
        "",
        "## Routing accuracy (share of each task's holdout examples routed to that task)",
        "",
        "| prompt tokens P | " + " | ".join(tasks) + " | all |",
        "|---|" + "---|" * (n + 1),
    ]
    for p, b in by_p.items():
        accs = _cells([b["routing_accuracy"][t] for t in tasks], 3)
        lines.append(
            f"| {p} (mean {b['mean_prompt_tokens']:.1f}) | {accs} | {b['routing_accuracy_all']:.3f} |"
        )
    lines += ["", "## Final-row holdout loss L[T, i] and drift: oracle vs routed task ids", "",
              "| evaluation | " + " | ".join(tasks) + " | drift_pct | bwt |", "|---|" + "---|" * (n + 2)]  # fmt: skip
    if "csv_final_row" in r:
        lines.append(
            f"| run's loss_matrix.csv | {_cells(r['csv_final_row'])} | {_f(r.get('csv_drift_pct'), 3)} | |"
        )
    o = r["oracle"]
    lines.append(f"| oracle (recomputed) | {_cells(o['loss'])} | {_f(o['drift_pct'], 3)} | {_f(o['bwt'])} |")
    for p, b in by_p.items():
        x = b["routed"]
        lines.append(f"| routed, P={p} | {_cells(x['loss'])} | {_f(x['drift_pct'], 3)} | {_f(x['bwt'])} |")
    if "oracle_vs_csv_max_abs_diff" in r:
        lines += ["", f"Oracle row vs the run's CSV: max |diff| = {r['oracle_vs_csv_max_abs_diff']:.2e}."]
    lines += ["", "Loss on the continuation only (tokens after the prompt; the router never saw them):", "",
              "| P | " + " | ".join(f"{t} oracle / routed" for t in tasks) + " |", "|---|" + "---|" * n]  # fmt: skip
    for p, b in by_p.items():
        c = b["continuation"]
        pairs = " | ".join(
            f"{_f(a)} / {_f(z)}" for a, z in zip(c["oracle_loss"], c["routed_loss"], strict=True)
        )
        lines.append(f"| {p} | {pairs} |")
    first = next(iter(by_p))
    lines += ["", f"Confusion at P={first} (rows: true task, columns: routed task):", "",
              "| true \\ routed | " + " | ".join(tasks) + " |", "|---|" + "---|" * n]  # fmt: skip
    for t, c in zip(tasks, by_p[first]["confusion"], strict=True):
        lines.append(f"| {t} | " + " | ".join(str(v) for v in c) + " |")
    c = r["cost"]
    lines += [
        "",
        f"## Cost per prompt (P={c['prompt_tokens']}, {c['forward_passes_per_prompt']} forward passes per prompt)",
        "",
        "| batch | routing ms/prompt | one forward, task known, ms/prompt | ratio |",
        "|---|---|---|---|",
    ]
    for batch, sfx in ((c["batch_size"], ""), (1, "_batch1")):
        route, one = c[f"route_ms_per_prompt{sfx}"], c[f"one_forward_ms_per_prompt{sfx}"]
        lines.append(f"| {batch} | {route:.2f} | {one:.2f} | {route / one:.1f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
