"""Continual-learning results for people: fixed-width tables and heatmaps of the matrices.

The files themselves (CSV, summary JSON, where they live) belong to
:mod:`crma_lightning.runs.rundir`; this module only renders. Figures are written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crma_lightning.core.atomic import atomic_write_bytes
from crma_lightning.runs.rundir import BASE_ROW

UNSCORED_CELL = "-"
"""How a table shows a cell that was not scored (``evaluation.schedule``); ``nan``: does not apply."""


def table(rows: dict[str, list[float | None]], tasks: Sequence[str], title: str, fmt: str = "{:.4f}") -> str:
    """A fixed-width text table of a matrix, rows = 'after', columns = tasks; an unscored cell
    (None) shows as :data:`UNSCORED_CELL`."""
    width = max(8, *(len(t) for t in tasks))
    first = max(6, *(len(r) for r in rows))
    lines = [title, " " * first + " | " + " ".join(t.rjust(width) for t in tasks)]
    lines.append("-" * len(lines[-1]))
    for name, values in rows.items():
        cells = (UNSCORED_CELL if v is None else fmt.format(v) for v in values)
        lines.append(name.ljust(first) + " | " + " ".join(c.rjust(width) for c in cells))
    return "\n".join(lines)


def heatmap(
    ax,
    matrix: np.ndarray,
    row_names: Sequence[str],
    tasks: Sequence[str],
    title: str,
    cmap: str,
    fmt: str = "{:.3g}",
    limits: tuple[float, float] | None = None,
    unscored: np.ndarray | None = None,
):
    """Draw one matrix on ``ax`` with its values written in the cells (readable on any colour);
    ``limits`` (vmin, vmax) puts several panels on one colour scale; cells marked in ``unscored``
    (bool, the matrix's shape) are left blank."""
    vmin, vmax = limits if limits is not None else (None, None)
    im = ax.imshow(matrix, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(tasks)), labels=list(tasks), rotation=30, ha="right")
    ax.set_yticks(
        range(len(row_names)), labels=[f"after {r}" if r != BASE_ROW else BASE_ROW for r in row_names]
    )
    ax.set_xlabel("evaluated on task")
    ax.set_title(title)
    for (r, c), v in np.ndenumerate(matrix):
        if unscored is not None and unscored[r, c]:
            continue  # NaN: imshow leaves the cell blank
        red, green, blue, _ = im.cmap(im.norm(v))
        light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
        ax.text(
            c, r, fmt.format(v), ha="center", va="center", fontsize=8, color="black" if light else "white"
        )
    return im


def heatmap_figure(
    matrix: np.ndarray,
    row_names: Sequence[str],
    tasks: Sequence[str],
    title: str,
    cmap: str,
    unscored: np.ndarray | None = None,
):
    """A matplotlib figure of one matrix (see :func:`heatmap`)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 0.9 * len(tasks)), 1.2 + 0.55 * len(row_names)))
    im = heatmap(ax, matrix, row_names, tasks, title, cmap, unscored=unscored)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
