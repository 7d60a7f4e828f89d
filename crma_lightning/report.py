"""Continual-learning results as files and pictures: matrix CSVs, summary JSON, heatmaps, a table.

The output contract of a run directory (README, "Output contract"): ``continual/loss_matrix.csv``
and ``continual/accuracy_matrix.csv`` (header ``after,<task names>``, first row ``base``, then one
row per trained task), ``continual/summary.json``, ``continual/*.png``. All writes are atomic.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crma_lightning.checkpoint import atomic_write_json, atomic_write_text

BASE_ROW = "base"


def matrix_csv(rows: dict[str, list[float]], tasks: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["after", *tasks])
    for name, values in rows.items():
        writer.writerow([name, *(f"{v:.8g}" for v in values)])
    return buf.getvalue()


def read_matrix_csv(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """(row names, task names, matrix) from a matrix CSV."""
    with open(path, encoding="utf-8", newline="") as f:
        data = list(csv.reader(f))
    header, body = data[0], data[1:]
    return [r[0] for r in body], header[1:], np.array([[float(x) for x in r[1:]] for r in body], dtype=np.float64)


def table(rows: dict[str, list[float]], tasks: Sequence[str], title: str, fmt: str = "{:.4f}") -> str:
    """A fixed-width text table of a matrix, rows = 'after', columns = tasks."""
    width = max(8, *(len(t) for t in tasks))
    first = max(6, *(len(r) for r in rows))
    lines = [title, " " * first + " | " + " ".join(t.rjust(width) for t in tasks)]
    lines.append("-" * len(lines[-1]))
    for name, values in rows.items():
        lines.append(name.ljust(first) + " | " + " ".join(fmt.format(v).rjust(width) for v in values))
    return "\n".join(lines)


def heatmap_figure(matrix: np.ndarray, row_names: Sequence[str], tasks: Sequence[str], title: str, cmap: str):
    """A matplotlib figure of one matrix with the values written in the cells."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 0.9 * len(tasks)), 1.2 + 0.55 * len(row_names)))
    im = ax.imshow(matrix, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(tasks)), labels=list(tasks), rotation=30, ha="right")
    ax.set_yticks(range(len(row_names)), labels=[f"after {r}" if r != BASE_ROW else BASE_ROW for r in row_names])
    ax.set_xlabel("evaluated on task")
    ax.set_title(title)
    for (r, c), v in np.ndenumerate(matrix):
        red, green, blue, _ = im.cmap(im.norm(v))
        light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5  # readable text on any cell colour
        ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=8, color="black" if light else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def write_report(
    out_dir: Path,
    tasks: Sequence[str],
    loss_rows: dict[str, list[float]],
    acc_rows: dict[str, list[float]],
    summary: dict,
) -> None:
    """Write both matrices (CSV + PNG) and the summary JSON into ``out_dir`` atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "loss_matrix.csv", matrix_csv(loss_rows, tasks))
    atomic_write_text(out_dir / "accuracy_matrix.csv", matrix_csv(acc_rows, tasks))
    atomic_write_json(out_dir / "summary.json", json_safe(summary))


def json_safe(obj):
    """Replace NaN/inf by None recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
