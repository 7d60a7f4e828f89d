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
  length (``--cost-prompt-tokens``, default the largest P).

Run:  .venv/bin/python benchmarks/bench_routing.py --run runs/tiny/version_0
Works on any finished run dir (synthetic, text or prompt/response tasks; random-init, local-folder
or GGUF backbones). Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/routing``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crma_lightning import metrics as clm
from crma_lightning.checkpoint import atomic_write_json, atomic_write_text
from crma_lightning.data import IGNORE_INDEX
from crma_lightning.serve import generation
from crma_lightning.serve.run import TrainedRun, load_run


def holdout_examples(run: TrainedRun, batch_size: int) -> dict[str, list[tuple[list[int], list[int]]]]:
    """``task -> [(input_ids, labels)]`` of every trained task's holdout set, unpadded."""
    dm = run.info.datamodule()
    dm.setup()
    out = {}
    for task in run.tasks:
        rows = []
        for batch in dm.holdout_batches(task, batch_size=batch_size):
            for ids, labels, mask, w in zip(
                batch["input_ids"],
                batch["labels"],
                batch["attention_mask"],
                batch["example_weight"],
                strict=True,
            ):
                if w > 0:
                    n = int(mask.sum())
                    rows.append((ids[:n].tolist(), labels[:n].tolist()))
        out[task] = rows
    return out


@torch.no_grad()
def token_scores(run: TrainedRun, examples: list[tuple[list[int], list[int]]], batch_size: int):
    """Per example and per adapter: next-token NLL and correctness at every position, as
    ``nll[k][e]``, ``correct[k][e]`` float arrays of length len(example) - 1 (NaN where unlabelled)."""
    nll, correct = [], []
    for task in run.tasks:
        nll_k, cor_k = [], []
        with run.using(task):
            for lo in range(0, len(examples), batch_size):
                chunk = examples[lo : lo + batch_size]
                ids, mask = generation.pad_batch([e[0] for e in chunk], run.pad_id, "right", run.device)
                labels, _ = generation.pad_batch([e[1] for e in chunk], IGNORE_INDEX, "right", run.device)
                logits = run.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
                target = labels[:, 1:]  # (B, T-1)
                safe = target.clamp_min(0)
                token_nll = F.cross_entropy(logits.transpose(1, 2), safe, reduction="none")  # (B, T-1)
                hit = (logits.argmax(-1) == safe).float()
                labelled = target != IGNORE_INDEX
                for row, e in enumerate(chunk):
                    n = len(e[0]) - 1
                    keep = labelled[row, :n]
                    nll_k.append(torch.where(keep, token_nll[row, :n], torch.nan).cpu().numpy())
                    cor_k.append(torch.where(keep, hit[row, :n], torch.nan).cpu().numpy())
        nll.append(nll_k)
        correct.append(cor_k)
    return nll, correct


def prompt_length(example: tuple[list[int], list[int]], p: int) -> int:
    """Tokens of the example sent as the prompt: the unlabelled prefix, or else the first ``p``."""
    labels = example[1]
    first = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), 0)
    if first > 0:
        return first
    return max(1, min(p, len(example[0]) - 1))


def row(values, choice, start=None):
    """Mean over labelled tokens (from ``start[e]`` on, if given) of ``values[choice[e]][e]``, pooled."""
    total, count = 0.0, 0
    for e, k in enumerate(choice):
        v = values[k][e]
        if start is not None:
            v = v[max(start[e] - 1, 0) :]  # position j predicts token j + 1
        v = v[~np.isnan(v)]
        total += float(v.sum())
        count += v.size
    return total / count if count else float("nan")


def command_line(argv: list[str]) -> str:
    """The command, shell-quoted, without ``--note`` (a remark, not a setting)."""
    kept, skip = [], False
    for a in argv:
        if a.startswith("--note="):
            continue
        if skip or a == "--note":
            skip = not skip
            continue
        kept.append(a)
    return shlex.join(["python", "benchmarks/bench_routing.py", *kept])


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def read_matrix(path: Path, tasks: list[str]) -> tuple[list[str], np.ndarray] | None:
    if not path.is_file():
        return None
    lines = [ln.split(",") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    header = lines[0][1:]
    cols = [header.index(t) for t in tasks]
    names = [ln[0] for ln in lines[1:]]
    return names, np.array([[float(ln[1 + c]) for c in cols] for ln in lines[1:]])


def main(argv: list[str] | None = None) -> dict:
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
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/routing", help="output path without extension")
    ap.add_argument("--note", default="", help="a line for the report, e.g. the command that trained the run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = os.getloadavg()[0]

    run = load_run(args.run, device=args.device)
    tasks = run.tasks
    K = len(tasks)
    per_task = holdout_examples(run, args.batch_size)
    examples = [e for t in tasks for e in per_task[t]]
    truth = np.array([k for k, t in enumerate(tasks) for _ in per_task[t]])
    nll, correct = token_scores(run, examples, args.batch_size)
    oracle = truth.tolist()

    def _subset(choice, start, sel):
        idx = np.flatnonzero(sel)
        sub_choice = [choice[e] for e in idx]
        sub_start = None if start is None else [start[e] for e in idx]
        return sub_choice, sub_start

    def sub_values(values, sel):
        idx = np.flatnonzero(sel)
        return [[values[k][e] for e in idx] for k in range(K)]

    def rowwise(values, choice, start=None):
        out = []
        for i in range(K):
            sel = truth == i
            c, s = _subset(choice, start, sel)
            out.append(row(sub_values(values, sel), c, s))
        return out

    result: dict = {
        "command": command_line(sys.argv[1:] if argv is None else argv),
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({args.threads} thread(s)), device {args.device}",
        "load_avg_1min_start": round(load0, 2),
        "run_dir": str(Path(args.run).resolve()),
        "note": args.note,
        "strategy": run.strategy,
        "base_model": run.info.backbone.label,
        "tasks": tasks,
        "holdout_examples": {t: len(per_task[t]) for t in tasks},
        "router": "argmin over tasks of the prompt's mean next-token loss under LoRA_k + CRMA",
        "oracle": {
            "loss": rowwise(nll, oracle),
            "accuracy": rowwise(correct, oracle),
        },
        "by_prompt_tokens": {},
    }
    csv = read_matrix(run.info.run_dir / "continual" / "loss_matrix.csv", tasks)
    acc_csv = read_matrix(run.info.run_dir / "continual" / "accuracy_matrix.csv", tasks)
    matrix = acc_matrix = None
    if csv is not None and csv[0][1:] == tasks:  # base row + one row per trained task
        matrix, acc_matrix = csv[1], acc_csv[1]
        result["csv_final_row"] = matrix[-1].tolist()
        result["oracle_vs_csv_max_abs_diff"] = float(
            np.max(np.abs(matrix[-1] - np.array(result["oracle"]["loss"])))
        )

    def drift_with(final_loss, final_acc):
        if matrix is None or K < 2:
            return None, None
        L, A = matrix.copy(), acc_matrix.copy()
        L[-1], A[-1] = final_loss, final_acc
        return clm.drift_pct(L), clm.bwt(A)

    result["oracle"]["drift_pct"], result["oracle"]["bwt"] = drift_with(
        result["oracle"]["loss"], result["oracle"]["accuracy"]
    )
    if matrix is not None and K >= 2:
        result["csv_drift_pct"] = clm.drift_pct(matrix)

    for p in args.prompt_tokens:
        starts = [prompt_length(e, p) for e in examples]
        prompts = [e[0][:s] for e, s in zip(examples, starts, strict=True)]
        chosen = run.route_ids(prompts, batch_size=args.batch_size)
        choice = [tasks.index(t) for t in chosen]
        confusion = np.zeros((K, K), dtype=int)
        for i, k in zip(truth, choice, strict=True):
            confusion[i, k] += 1
        routed_loss = rowwise(nll, choice)
        routed_acc = rowwise(correct, choice)
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
                "oracle_loss": rowwise(nll, oracle, starts),
                "routed_loss": rowwise(nll, choice, starts),
            },
        }

    # Cost, at one prompt length.
    p = args.cost_prompt_tokens or max(args.prompt_tokens)
    prompts = [e[0][: prompt_length(e, p)] for e in examples]
    few = prompts[: args.timing_prompts]
    first = tasks[0]

    def known_task(batch):
        def fn():
            with run.using(first):
                generation.prompt_losses(run.model, batch_prompts, pad_id=run.pad_id, batch_size=batch)

        return fn

    batch_prompts = prompts
    t_route = timed(lambda: run.route_ids(prompts, batch_size=args.batch_size), args.repeats)
    t_known = timed(known_task(args.batch_size), args.repeats)
    batch_prompts = few
    t_route_1 = timed(lambda: run.route_ids(few, batch_size=1), args.repeats)
    t_known_1 = timed(known_task(1), args.repeats)
    result["cost"] = {
        "prompt_tokens": p,
        "batch_size": args.batch_size,
        "route_ms_per_prompt": 1e3 * t_route / len(prompts),
        "one_forward_ms_per_prompt": 1e3 * t_known / len(prompts),
        "route_ms_per_prompt_batch1": 1e3 * t_route_1 / len(few),
        "one_forward_ms_per_prompt_batch1": 1e3 * t_known_1 / len(few),
        "forward_passes_per_prompt": K,
    }
    result["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), result)
    atomic_write_text(out.with_suffix(".md"), render(result))
    print(render(result))
    return result


def _f(x, digits=4):
    return "—" if x is None else f"{x:.{digits}f}"


def render(r: dict) -> str:
    tasks = r["tasks"]
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
        "|---|" + "---|" * (len(tasks) + 1),
    ]
    for p, b in r["by_prompt_tokens"].items():
        accs = " | ".join(f"{b['routing_accuracy'][t]:.3f}" for t in tasks)
        lines.append(
            f"| {p} (mean {b['mean_prompt_tokens']:.1f}) | {accs} | {b['routing_accuracy_all']:.3f} |"
        )
    lines += ["", "## Final-row holdout loss L[T, i] and drift: oracle vs routed task ids", ""]
    lines += [
        "| evaluation | " + " | ".join(tasks) + " | drift_pct | bwt |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    if "csv_final_row" in r:
        lines.append(
            "| run's loss_matrix.csv | "
            + " | ".join(_f(v) for v in r["csv_final_row"])
            + f" | {_f(r.get('csv_drift_pct'), 3)} | |"
        )
    o = r["oracle"]
    lines.append(
        "| oracle (recomputed) | "
        + " | ".join(_f(v) for v in o["loss"])
        + f" | {_f(o['drift_pct'], 3)} | {_f(o['bwt'])} |"
    )
    for p, b in r["by_prompt_tokens"].items():
        x = b["routed"]
        lines.append(
            f"| routed, P={p} | "
            + " | ".join(_f(v) for v in x["loss"])
            + f" | {_f(x['drift_pct'], 3)} | {_f(x['bwt'])} |"
        )
    if "oracle_vs_csv_max_abs_diff" in r:
        lines += ["", f"Oracle row vs the run's CSV: max |diff| = {r['oracle_vs_csv_max_abs_diff']:.2e}."]
    lines += [
        "",
        "Loss on the continuation only (tokens after the prompt; the router never saw them):",
        "",
        "| P | " + " | ".join(f"{t} oracle / routed" for t in tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for p, b in r["by_prompt_tokens"].items():
        c = b["continuation"]
        lines.append(
            f"| {p} | "
            + " | ".join(
                f"{_f(a)} / {_f(z)}" for a, z in zip(c["oracle_loss"], c["routed_loss"], strict=True)
            )
            + " |"
        )
    first = next(iter(r["by_prompt_tokens"]))
    lines += ["", f"Confusion at P={first} (rows: true task, columns: routed task):", ""]
    lines += ["| true \\ routed | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for t, c in zip(tasks, r["by_prompt_tokens"][first]["confusion"], strict=True):
        lines.append(f"| {t} | " + " | ".join(str(v) for v in c) + " |")
    c = r["cost"]
    lines += [
        "",
        f"## Cost per prompt (P={c['prompt_tokens']}, {c['forward_passes_per_prompt']} forward passes per prompt)",
        "",
        "| batch | routing ms/prompt | one forward, task known, ms/prompt | ratio |",
        "|---|---|---|---|",
        f"| {c['batch_size']} | {c['route_ms_per_prompt']:.2f} | {c['one_forward_ms_per_prompt']:.2f} | "
        f"{c['route_ms_per_prompt'] / c['one_forward_ms_per_prompt']:.1f}x |",
        f"| 1 | {c['route_ms_per_prompt_batch1']:.2f} | {c['one_forward_ms_per_prompt_batch1']:.2f} | "
        f"{c['route_ms_per_prompt_batch1'] / c['one_forward_ms_per_prompt_batch1']:.1f}x |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
