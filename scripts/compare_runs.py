"""Compare two run directories: every adapter and routing tensor, every matrix CSV and the summary.

    python scripts/compare_runs.py runs/tiny/version_0 /tmp/other/tiny/version_0

Exit 0 when the tensors and matrices are bit-identical (or within --atol) and the summaries differ
only in timings; what a refactor that changes no behaviour must show.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from crma_lightning.runs.rundir import read_matrix_csv

TIMINGS = {"evaluation_s", "evaluation_reused_cells"}  # how a run was computed, not what


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--atol", type=float, default=0.0, help="largest tensor difference allowed (default 0)")
    args = p.parse_args(argv)
    ok, worst, n = True, 0.0, 0
    for f in sorted(args.a.rglob("*.safetensors")):
        g = args.b / f.relative_to(args.a)
        if not g.is_file():
            print(f"missing in {args.b}: {f.relative_to(args.a)}")
            ok = False
            continue
        x, y = load_file(f), load_file(g)
        if x.keys() != y.keys():
            print(f"different tensors in {f.relative_to(args.a)}")
            ok = False
            continue
        for k in x:
            d = (x[k].double() - y[k].double()).abs().max().item() if x[k].numel() else 0.0
            worst, n = max(worst, d), n + 1
    print(f"{n} tensors, largest difference {worst:.3g}")
    ok &= worst <= args.atol
    for f in sorted(args.a.rglob("*.csv")):
        g = args.b / f.relative_to(args.a)
        same = g.is_file() and f.read_text() == g.read_text()
        note = ""
        if not same and g.is_file() and "_matrix" in f.name:
            # An empty field is a cell the run's evaluation.schedule did not score (rundir.UNSCORED).
            x, y = read_matrix_csv(f), read_matrix_csv(g)
            if x.values.shape == y.values.shape and (x.unscored != y.unscored).any():
                note = f" ({int((x.unscored != y.unscored).sum())} cells scored in one run only)"
        print(f"{f.relative_to(args.a)}: {'identical' if same else 'DIFFERENT'}{note}")
        ok &= same
    summaries = [flat(json.loads((r / "continual" / "summary.json").read_text())) for r in (args.a, args.b)]
    keys = sorted(
        k for k in summaries[0].keys() | summaries[1].keys() if summaries[0].get(k) != summaries[1].get(k)
    )
    print("summary keys that differ:", keys or "none")
    ok &= set(keys) <= TIMINGS
    print("same" if ok else "NOT the same")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
