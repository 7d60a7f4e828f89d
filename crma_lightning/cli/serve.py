"""``train.py predict | export | route | test --run``: use a finished run from the command line.

Reads JSON lines (a ``prompt`` or ``input_ids``, an optional ``task``), writes them back in input
order with ``task``, ``routed``, ``completion`` (and ``confidence``, ``router`` when routed),
atomically once all are done; ``test --run`` rebuilds the matrices (:mod:`crma_lightning.serve.matrices`).
Problems the user can fix print one ``error:`` line and exit with status 2. docs/inference.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from crma_lightning.core.atomic import atomic_write_text
from crma_lightning.core.errors import ConfigError

SUBCOMMANDS = ("predict", "export", "route", "test")


def read_prompts(path: str, default_task: str) -> tuple[list[dict[str, Any]], list[Any], list[str]]:
    """Records, prompts and tasks of a jsonl file; a :class:`ConfigError` naming the first bad line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--input {path}: no such file")
    records, prompts, tasks = [], [], []
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"--input {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    shape = (
        'each line must be a JSON object such as {"prompt": "...", "task": "auto"} (or "input_ids": [5, 9])'
    )
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"--input {path} line {number} is not valid JSON ({e}); {shape}") from None
        if not isinstance(record, dict):
            raise ConfigError(f"--input {path} line {number} is not a JSON object; {shape}")
        prompt = record.get("prompt", record.get("input_ids"))
        if not (
            isinstance(prompt, str)
            or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt))
        ):
            raise ConfigError(
                f"--input {path} line {number} has no 'prompt' string or 'input_ids' list of ints; {shape}"
            )
        task = record.get("task", default_task)
        if not isinstance(task, str):
            raise ConfigError(
                f"--input {path} line {number}: 'task' must be a task name or 'auto', got {task!r}"
            )
        records.append(record)
        prompts.append(prompt)
        tasks.append(task)
    if not records:
        raise ConfigError(f"--input {path} has no prompts; {shape}")
    return records, prompts, tasks


def _check_tasks(run: Any, tasks: list[str], path: str) -> None:
    from crma_lightning.serve.run import AUTO

    for number, task in enumerate(tasks, 1):
        if task != AUTO and task not in run.tasks:
            raise ConfigError(
                f"--input {path}: prompt {number} asks for task {task!r}, which is not a completed task of "
                f"this run; use one of {run.tasks} or 'auto'"
            )


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        kw |= {"temperature": args.temperature, "top_p": args.top_p}
    return kw


def _load(args: argparse.Namespace, device: str):
    """``load_run`` with the command line's trust flags (see ``serve.runinfo.check_trusted``)."""
    from crma_lightning.backbone.loading import BackboneConfig
    from crma_lightning.serve.run import load_run

    backbone = BackboneConfig(name_or_path=args.base_model) if args.base_model else None
    return load_run(
        args.run,
        device=device,
        backbone=backbone,
        trust_remote_code=args.trust_remote_code,
        allow_foreign_classes=args.allow_foreign_classes,
    )


def cmd_predict(args: argparse.Namespace) -> None:
    import torch
    from tqdm.auto import tqdm

    records, prompts, tasks = read_prompts(args.input, args.task)
    run = _load(args, args.device)
    _check_tasks(run, tasks, args.input)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc="predict", unit="prompt", disable=args.quiet) as bar:
        results = run.complete(
            prompts,
            tasks,
            crma=not args.no_crma,
            batch_size=args.batch_size,
            progress=bar.update,
            **_routing_kwargs(args),
            **_generation_kwargs(args),
        )
    rows = []
    for record, result in zip(records, results, strict=True):
        row = {**record, "task": result.task, "routed": result.routed, "completion": result.completion}
        if result.routed:
            row |= {"confidence": _rounded(result.confidence), "router": result.router}
        if isinstance(result.completion, str):  # without a tokenizer the completion already is the ids
            row["completion_ids"] = result.completion_ids
        rows.append(row)
    _write_jsonl(args.output, rows)
    print(
        f"wrote {len(rows)} completions to {args.output} ({time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
    )


def cmd_route(args: argparse.Namespace) -> None:
    if args.input is None and not args.build_stats:
        raise ConfigError(
            "route needs --input and --output (or --build-stats alone to write routing statistics)"
        )
    if (args.input is None) != (args.output is None):
        raise ConfigError("give both --input and --output, or neither (with --build-stats)")
    records, prompts, _ = read_prompts(args.input, "auto") if args.input else ([], [], [])
    run = _load(args, args.device)
    if args.build_stats:
        from crma_lightning.routing.router import build_routing_stats

        start = time.perf_counter()
        built = build_routing_stats(
            run,
            layer=args.layer,
            pooling=args.pooling,
            max_examples=args.max_examples if args.max_examples else "config",
            batch_size=args.stats_batch_size,
            overwrite=args.overwrite,
            log=lambda m: print(m, file=sys.stderr),
        )
        note = (
            f"built the routing statistics of {built}"
            if built
            else "every task already has routing statistics"
        )
        print(f"{note} in {run.info.run.routing} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    if args.input is None:
        return
    ids = [run.encode(p, f"--input {args.input} prompt {i + 1}") for i, p in enumerate(prompts)]
    decisions = run.route_decisions(
        ids, batch_size=args.batch_size, crma=not args.no_crma, **_routing_kwargs(args)
    )
    rows = []
    for r, d in zip(records, decisions, strict=True):
        row = {
            **r,
            "task": d.task,
            "confidence": _rounded(d.confidence),
            "router": d.router,
            "fallback": d.fallback,
        }
        if d.posterior is not None:
            row["posterior"] = {k: _rounded(v) for k, v in d.posterior.items()}
        if d.losses is not None:
            row["losses"] = {k: _rounded(v) for k, v in d.losses.items()}
        rows.append(row)
    _write_jsonl(args.output, rows)
    print(f"routed {len(rows)} prompts to {args.output}", file=sys.stderr)


def _rounded(v: float | None) -> float | None:
    return None if v is None or v != v else round(v, 6)


def _routing_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"router": args.router, "threshold": args.threshold, "fallback": args.fallback}


def cmd_export(args: argparse.Namespace) -> None:
    from crma_lightning.serve.export import export_task

    run = _load(args, "cpu")
    out = export_task(run, args.task, args.output)
    print(
        f"exported task {args.task!r} to {out} (load it with crma_lightning.serve.load_exported)",
        file=sys.stderr,
    )


def cmd_test(args: argparse.Namespace) -> None:
    from crma_lightning.evaluation.report import table
    from crma_lightning.serve.matrices import evaluate_run, write_run_matrices

    run = _load(args, args.device)
    dm = run.info.datamodule()
    start = time.perf_counter()
    tables = evaluate_run(run, dm, args.split, args.batch_size, args.task_id, args.router)
    summary = write_run_matrices(run, dm, tables, args.split, args.task_id, args.router)
    rows, tasks = tables["main"], list(dm.evaluated_task_names)
    if args.task_id == "none":
        print(f"{args.split}: every row evaluated without the task id")
    print(
        table(rows["loss"], tasks, f"{args.split} loss ({run.strategy}; rows: after training, columns: task)")
    )
    print()
    print(
        table(
            rows["accuracy"],
            tasks,
            f"{args.split} task metric ({', '.join(sorted(set(summary['task_metric'].values())))})",
        )
    )
    if "no_task_id" in tables:
        print()
        print(table(tables["no_task_id"]["accuracy"], tasks, f"{args.split} task metric without the task id"))
    keys = ("final_avg_accuracy", "bwt", "fwt", "forgetting", "final_avg_loss")
    print("  ".join(f"{k}={'n/a' if summary.get(k) is None else format(summary[k], '.4g')}" for k in keys))
    where = run.info.run.results_of(args.split).relative_to(run.info.run_dir)
    print(f"wrote {where}/ in {time.perf_counter() - start:.1f}s", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description="Use a finished crma-lightning run.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run", required=True, help="run directory (`fit` prints it as `run dir:`)")
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
        p.add_argument(
            "--trust-remote-code", action="store_true", help="allow a run whose config sets trust_remote_code"
        )
        p.add_argument(
            "--allow-foreign-classes",
            action="store_true",
            help="allow a config naming classes from other packages",
        )
        p.add_argument(
            "--base-model",
            help="load the adapters onto this base (hub name or folder) instead of config.yaml's",
        )

    p = sub.add_parser("predict", help="complete every prompt of a jsonl file")
    common(p)
    p.add_argument(
        "--input", required=True, help='jsonl: {"prompt": "..." | "input_ids": [...], "task": optional}'
    )
    p.add_argument("--output", required=True, help="jsonl of the input objects plus task, routed, completion")
    p.add_argument(
        "--task", default="auto", help="task for lines without one: a task name or 'auto' (route; default)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --do-sample)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--no-crma", action="store_true", help="switch CRMA off (the LoRA alone)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    routing_options(p)
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("route", help="choose a task for every prompt of a jsonl file (no generation)")
    common(p)
    p.add_argument("--input", help='jsonl: {"prompt": "..." | "input_ids": [...]}')
    p.add_argument(
        "--output", help="jsonl of the input objects plus task, confidence, router, posterior (and losses)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    p.add_argument("--no-crma", action="store_true", help="score with CRMA off (loss router)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    routing_options(p)
    p.add_argument(
        "--build-stats",
        action="store_true",
        help="first write the routing statistics of every task that lacks them (runs trained before they "
        "existed)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="with --build-stats: rebuild every task's statistics"
    )
    p.add_argument(
        "--layer",
        type=int,
        help="with --build-stats: decoder layer of the feature (default: the config's, else a third of the "
        "depth)",
    )
    p.add_argument(
        "--pooling",
        choices=["mean", "last"],
        help="with --build-stats: pooling over the prompt (default mean)",
    )
    p.add_argument(
        "--max-examples",
        type=int,
        help="with --build-stats: training examples per task (default: the config's, else 512)",
    )
    p.add_argument("--stats-batch-size", type=int, help="with --build-stats: examples per forward pass")
    p.set_defaults(fn=cmd_route)

    p = sub.add_parser(
        "export", help="write one task's model: merged weights + CRMA, and its LoRA in PEFT format"
    )
    common(p)
    p.add_argument("--task", required=True, help="the task to export")
    p.add_argument("--output", required=True, help="directory to write (replaced atomically if it exists)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser(
        "test", help="rebuild every row of the matrices from the run's adapters and score a split"
    )
    common(p)
    p.add_argument("--split", choices=("test", "validation"), default="test", help="held-out split to score")
    p.add_argument(
        "--task-id",
        choices=("oracle", "both", "none"),
        default="oracle",
        help="both: also evaluate without the task id; none: only without it",
    )
    p.add_argument(
        "--router",
        choices=["stats", "loss"],
        default="stats",
        help="without the task id, route by the run's routing statistics (default) or by the lowest prompt "
        "loss",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="examples per batch (default data.eval_batch_size)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.set_defaults(fn=cmd_test)
    return parser


def routing_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--router",
        choices=["stats", "loss"],
        default="stats",
        help="stats: the run's routing statistics, one partial forward pass (default); loss: lowest prompt "
        "loss over every task's adapter, one forward pass per task",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.0,
        help="send decisions with a lower confidence (posterior probability of the chosen task) to "
        "--fallback",
    )
    p.add_argument("--fallback", default="loss", help="'loss' (the loss router) or a task name")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if (getattr(args, "batch_size", 1) or 1) < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        raise SystemExit(2)
    try:
        args.fn(args)
    except ConfigError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
