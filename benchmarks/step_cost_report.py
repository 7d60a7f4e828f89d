"""benchmarks/results/step_cost.md: what a training step costs in the framework, in one file.

Issue 16's results file, composed from the measurements the other scripts write (each with its own
command, date and machine in its own .md/.json beside this one); it measures nothing itself:

- ``step_cost_{smollm2,smollm2_4x64,tiny}.json`` (bench_step_cost.py): the framework's step against
  the plain PyTorch + peft loop, as a user writes it and like for like (both on the fused paths, or
  both off them), FROZEN and MODULAR, in interleaved rounds, with the targets;
- ``step_profile_{smollm2,tiny}.json`` (profile_step.py): where a fit's time goes;
- ``main_job_{before,after}.json`` (bench_main_job.py): the main job's wall time by phase, at the
  commit before this work and after it;
- ``kernels.json`` (bench_kernels.py): the CRMA block and projection kernels.

Run:  .venv/bin/python benchmarks/step_cost_report.py
"""

from __future__ import annotations

import json

from bench_step_cost import LOADED, ratio_rows
from harness import QUIET_PCT, REPO, write_report

RESULTS = REPO / "benchmarks" / "results"
#: The step-cost runs, in the order they are reported (the issue's shape, the main job's, the toy model).
STEP_COST = ("step_cost_smollm2", "step_cost_smollm2_4x64", "step_cost_tiny")
STEP_FILES = (*STEP_COST, "step_profile_smollm2", "step_profile_tiny")
#: What the measurements above leave, and why (prose: it explains the tables, it is not computed).
LEFT = [
    "## What is left, and why",
    "",
    "- **The like-for-like overhead is not settled (issue 29).** At 4 x 64 the rerun on a quiet "
    "machine (2 threads, 4 rounds of 12 steps, 2026-12-07 17:14 UTC) gives FROZEN / plain_fused 1.026 "
    "[0.907, 1.077] in step time (1.021 [0.903, 1.075] in CPU time) and FROZEN unfused / plain 1.016 "
    "[0.964, 1.120]: medians under 1.03, intervals too wide with 4 rounds to say met or missed. The "
    "8 x 128 runs shared the 2 cores with other engineers' jobs (62-75 % of the CPU), so they ran at "
    "1 thread with 3 rounds of 6 steps; their medians (1.18 and 1.05 in CPU time) come from noisy "
    "rounds whose intervals hold 0.94-0.97. What a profile says instead (next section, robust to "
    "neighbours): Lightning's loop, the callbacks' hooks, the gradient callbacks, logging and data "
    "loading take under 0.5 % of a SmolLM2 step's samples together (MODULAR, 8 x 128, "
    "step_profile_smollm2); the rest is the model's forward, backward and loss, which the plain loop "
    "runs too. The earlier 1.057x came with an earlier, slower fused loss: FROZEN / plain moves with "
    "the loss path, which is why the like-for-like rows are there. 6+ quiet rounds at each shape (the "
    "docstring's commands) are what settles the 1.03 target.",
    "- **The first table's meaning**: FROZEN / plain (0.999 on 2026-12-01, quiet machine, 2 threads) "
    "compares the framework with its fused AdamW and fused loss against a loop without them; it is "
    "what a user gains or pays, not the framework's own overhead. The like-for-like rows isolate that.",
    "- **CRMA's cost on SmolLM2 is 3-4 %, not 2 %** (the quiet runs of 2026-12-01). It is CRMA's own forward and backward: 30 rank-4 "
    "blocks, each reading the (B·T, 576) residual stream and writing it back in the forward, and "
    "passing over the stream's gradient and the saved stream again in the backward (the fused write "
    "and the custom backward already make each of these one GEMM; kernels.md). Lightning's SimpleProfiler "
    "on a 40-step fit at 4 x 64 (development run, not committed) put MODULAR's step 25 ms above "
    "FROZEN's: 10 ms forward, 13 ms backward, 2.6 ms the spectral logger's per-step measurement (kept: "
    "its maxima cover every step). Removing the rest means writing into the decoder layer's own "
    "residual add, a kernel of the model's rather than ours. The Birkhoff projection (n <= 4) would "
    "save at most the projection's ~2 ms and is a different method; the compiled write is slower on CPU.",
    "- **Runs differ by more than one run's interval.** A run of the 8 x 128 table 30 minutes before "
    "the final one, differing only in the loss's chunking (which FROZEN has too), gave MODULAR / FROZEN "
    "1.007 [0.970, 1.016]; the final run of 2026-12-01 gave 1.029 [1.020, 1.044]. Process-to-process variation (memory "
    "layout, thread placement) is not resampled by bootstrapping one run's rounds.",
    "- **Peak memory at the main job's shape is 1.11-1.18x the plain loop's** (1.12-1.13x on "
    "2026-12-01; 1.18x against the plain loop and 1.11x against the fused one in this session's run): "
    "Lightning and `datasets` (with pyarrow) add ~125 MB to the imports, which is 8 % of a 1.6 GB "
    "process; both are on the design card. At 8 x 128 it is within the target on both comparisons.",
    "- **The tiny model** shows the framework's fixed cost per step, the part no model size removes: "
    "like for like, FROZEN's step takes 9.5 ms of CPU more than the plain loop on the fused paths "
    "(97.7 against 88.2 ms, 1.068 [1.035, 1.279], this session, loaded; ~6 ms on the quiet machine "
    "of 2026-12-01) and CRMA's small ops ~5-12 ms. Against SmolLM2's step (0.68 s at 4 x 64 and 2.27 s "
    "at 8 x 128 on 2 quiet threads) 6-10 ms is 0.9-1.5 % and 0.3-0.4 %: within the 1.03 target, as an "
    "estimate rather than a measurement at that shape.",
    "- **Evaluation is 45 % of the main job** (79 s of 176 s under cProfile): 6 rows x 5 tasks x 2 "
    "splits, each one batch of 16 blocks (`data.eval_batch_size` 16 is the whole split), so it is "
    "batched as far as the split allows; through the fused head it no longer forms the logits either.",
    "- **No GPU** was lent, so the bf16 table on a GPU is not here (benchmarks/gpu_check.sh is ready).",
    "",
]


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def step_section(model: str, res: dict) -> list[str]:
    per, s, args = res["summary"]["per_variant"], res["summary"], res["args"]
    others = ", ".join("?" if o is None else f"{o:.0f}" for o in res["others_pct"])
    lines = [
        f"### {model}: batch {args['batch']} x {args['seq']} tokens, LoRA r {args['rank']} on q/k/v/o, fp32",
        "",
        f"`{res['info']['command']}` ({res['info']['date']}; {args['threads']} threads; "
        f"{len(res['rounds']['plain'])} rounds of {args['steps']} steady-state steps per variant; other "
        f"processes took {res['others_pct_median']:.0f} % of the CPU, median over rounds (per round: {others}); "
        f"{res['wall_s'] / 60:.0f} min).",
        "",
        "| variant | seconds per step (median of rounds) | CPU s per step | peak RSS MiB |",
        "|---|---|---|---|",
        *[
            f"| {v} | {per[v]['step_s']:.4f} | {per[v]['step_cpu_s']:.4f} | {per[v]['peak_rss_mb']:.0f} |"
            for v in per
        ],
        "",
        "| ratio (paired by round) | median | 95 % CI | target | verdict |",
        "|---|---|---|---|---|",
        *ratio_rows(s),
    ]
    if res["others_pct_median"] > QUIET_PCT:
        lines += ["", LOADED]
    if "plain_fused" not in per:
        lines += ["", "(Measured before the like-for-like variants existed: against the plain loop only.)"]
    return lines + [""]


def profile_section(model: str, res: dict) -> list[str]:
    total, in_step = res["samples"], sum(res["step"].values())
    a = res["args"]
    lines = [
        f"### {model}, {a['strategy']}, one task of {a['steps']} steps "
        f"(`profile_step.py --model {model} --strategy {a['strategy']} --steps {a['steps']}`, {res['wall_s']:.0f} s)",
        "",
        "| phase of the run | share | | part of a training step | share of the steps |",
        "|---|---|---|---|---|",
    ]
    phases = list(res["phases"].items())
    steps = list(res["step"].items())
    for i in range(max(len(phases), len(steps))):
        p = f"{phases[i][0]} | {100 * phases[i][1] / total:.1f} %" if i < len(phases) else " | "
        q = f"{steps[i][0]} | {100 * steps[i][1] / in_step:.1f} %" if i < len(steps) else " | "
        lines.append(f"| {p} | | {q} |")
    return lines + [""]


def main_job_section(before: dict, after: dict) -> list[str]:
    keys = list(dict.fromkeys([*before["shares_s"], *after["shares_s"]]))
    lines = [
        f"`bench_main_job.py` at {before['commit']} (before issue 16's work: the CRMA kernels as they were, "
        f"the loss over a transposed copy of the logits) and at {after['commit']} (after), each one `train.py fit --config "
        f"{after['config']}` under cProfile on the 2-core machine, alone. cProfile slows Python-heavy code "
        "more than torch's kernels, so the per-step callback shares are upper bounds. The two commits do "
        "not run the same job everywhere: between them the evaluation protocol (issue 13) added a test "
        "split scored beside validation in every evaluation, which doubles the evaluation's work and "
        "runs the base row's before the first step; compare the training steps.",
        "",
        "| phase | before s | before % | after s | after % |",
        "|---|---|---|---|---|",
    ]
    for k in keys:
        b, a = before["shares_s"].get(k), after["shares_s"].get(k)
        cell = lambda v, run: "" if v is None else f"{v:.1f} | {100 * v / run['wall_s']:.1f} %"  # noqa: E731
        lines.append(f"| {k} | {cell(b, before) or ' | '} | {cell(a, after) or ' | '} |")
    lines += [
        f"| **wall time** | {before['wall_s']:.1f} | | {after['wall_s']:.1f} | |",
        f"| start-up to the first training step | {before['startup_to_first_step_s']:.1f} | | "
        f"{after['startup_to_first_step_s']:.1f} | |",
        "",
    ]
    return lines


def kernels_section(k: dict) -> list[str]:
    rows = [t for t in k["timings"] if t["variant"] != "old"]
    lines = [
        f"`{k['meta']['command']}` ({k['meta']['date']}, {k['meta']['threads']} thread, {k['meta']['rounds']}); "
        "forward + backward per call, CPU time, against the formulation before (`old`); the full table "
        "with wall times and the bound is kernels.md.",
        "",
        "| section | variant | CPU us | vs old (95 % CI) | compile s |",
        "|---|---|---|---|---|",
    ]
    for t in rows:
        c = t["cpu"]
        compile_s = "" if t["compile_s"] is None else f"{t['compile_s']:.1f}"
        lines.append(
            f"| {t['section']} | {t['variant']} | {c['median_us']:.0f} | {c['ratio_vs_old']:.2f} "
            f"[{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}] | {compile_s} |"
        )
    return lines + [""]


def main() -> None:
    lines = [
        "# What a training step costs in the framework",
        "",
        "Issue 16's question: a user pays the whole training step inside `train.py fit` (data, forward, "
        "loss, backward, clipping, optimizer, every callback), not CRMA's forward alone. Composed by "
        "`python benchmarks/step_cost_report.py` from the files named in each section.",
        "",
        "## Protocol",
        "",
        "Five variants at the same shape, each a fresh process, in interleaved rounds (a different one "
        "first each round): `plain`, a plain PyTorch + peft loop as a user writes it (`get_peft_model`, "
        "forward with labels, which forms the full logits, backward, torch's default per-tensor AdamW step, "
        "zero_grad: ../shared/bench/plain_lora_loop.py); `plain_fused`, the same loop on the framework's "
        "two fused paths (`AdamW(fused=True)`, and the loss from the final hidden states through "
        "`losses.head_token_stats`, the function `model.fused_loss` uses); `frozen`, `train.py fit` with "
        "a LoRA only, one task (fused AdamW and fused loss are its defaults); `frozen_unfused`, the same "
        "with `--model.fused_loss false` and AdamW `foreach: false` (which `optim.fused_adam` leaves "
        "alone); `modular`, `train.py fit` with CRMA. FROZEN / plain is the step against what a user "
        "would write (target 1.05); FROZEN / plain_fused and FROZEN unfused / plain are like for like, "
        "the framework's own overhead (Lightning's loop, the callbacks, logging; target 1.03). "
        "A step is the interval between consecutive "
        "training-batch starts in steady state (the plain loop times its loop and drops its first 3 steps; "
        "`train.py` is timed by `crma_lightning.callbacks.resources.ResourceMonitor`, first step excluded). Each variant "
        "gives its median step per round; the ratios are paired by round, with a bootstrap 95 % interval "
        "of their median. Peak memory is `ru_maxrss` of each process (model load, evaluation and steps).",
        "",
        "## The step, against the plain loop and like for like",
        "",
    ]
    for name in STEP_COST:
        if res := load(name):
            lines += step_section(res["args"]["model"], res)
    lines += [
        "## Where a fit's time goes (py-spy)",
        "",
        "Shares of the samples of busy threads (`profile_step.py`'s docstring), so a shared machine slows "
        "but does not skew them. With `model.fused_loss` the part named loss also holds the output "
        "head's two matmuls (its forward and the hidden states' gradient), which the forward and the "
        "backward held before: on SmolLM2 (vocabulary 49,152, width 576) the head is a large part of "
        "the model's FLOPs.",
        "",
    ]
    for model in ("smollm2", "tiny"):
        if res := load(f"step_profile_{model}"):
            lines += profile_section(model, res)
    before, after = load("main_job_before"), load("main_job_after")
    if before and after:
        lines += ["## The main job, before and after", "", *main_job_section(before, after)]
    if k := load("kernels"):
        lines += ["## The CRMA kernels", "", *kernels_section(k)]
    lines += LEFT
    text = "\n".join(lines)
    inputs = [f"{n}.json" for n in (*STEP_FILES, "main_job_before", "main_job_after", "kernels")]
    write_report(
        RESULTS / "step_cost", text, {"composed_from": [n for n in inputs if (RESULTS / n).exists()]}
    )
    print(text)


if __name__ == "__main__":
    main()
