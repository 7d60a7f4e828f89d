"""GPU check: run the GPU tests (``pytest -m gpu``, tests/gpu/test_gpu.py), write a report naming the device.

The checks themselves are tests (tests/gpu/test_gpu.py, skipped without CUDA): bf16 tokens/s of MODULAR
against FROZEN, ``train.py fit`` with FSDP1 on one node and its resume, an NF4 base, the fused loss
on CUDA (against Liger's fused linear cross-entropy when installed), and the memory plan's estimate
against ``torch.cuda.max_memory_allocated``. This script runs them once and writes
``gpu_check.json`` (the device, pytest's outcome and every test's measurements) and ``gpu_check.md``
into ``--out``.

Run:  bash benchmarks/gpu_check.sh   (or: python benchmarks/gpu_check.py --out DIR)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"


def run(out: Path, timeout: float, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "checks.json"
        env = {
            **os.environ,
            "CRMA_GPU_RESULTS": str(results),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu/test_gpu.py", "-q", "-rA"]
        cmd += ["-p", "no:cacheprovider", "--durations=0", *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        checks = json.loads(results.read_text()) if results.is_file() else {}
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {
        "device": checks.get("device") or device_name(),
        "torch": checks.get("torch"),
        "command": " ".join(cmd[1:]),
        "exit": proc.returncode,
        "summary": lines[-1] if lines else "",
        "outcomes": [ln for ln in lines if ln.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))],
        "checks": checks.get("checks", {}),
        "tail": "\n".join(lines[-60:]),
    }


def markdown(report: dict) -> str:
    lines = [
        f"# GPU check: {report['device']}",
        "",
        f"`python {report['command']}` (torch {report['torch']}): exit {report['exit']}, {report['summary']}",
        "",
        *[f"- {o}" for o in report["outcomes"]],
        "",
        "```json",
        json.dumps(report["checks"], indent=1),
        "```",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--timeout", type=float, default=1500)
    args, extra = ap.parse_known_args(argv)
    report = run(args.out, args.timeout, extra)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu_check.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return report["exit"]


if __name__ == "__main__":
    raise SystemExit(main())
