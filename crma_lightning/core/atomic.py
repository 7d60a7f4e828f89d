"""Atomic files and folders: a crash never leaves a half-written artefact.

Every file of a run, an export, a benchmark result or the GGUF cache is written to a temporary
sibling and renamed into place (``os.replace`` is atomic on POSIX), so a reader sees either the old
complete file or the new complete one. Temporary names start with a dot and end in ``.tmp``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def umask_mode(directory: bool) -> int:
    """The mode a plain open()/mkdir() would give. mkstemp/mkdtemp make owner-only (0600/0700)
    files, and run directories and exports are meant to be read by others."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a synced temporary sibling and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, umask_mode(directory=False))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON with two-space indentation; NaN/inf are refused (JSON has none: see ``json_safe``)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    If ``path`` exists it is first renamed aside and deleted after the swap, so at every instant
    either the old or the new complete directory is at ``path`` (or, between the two renames, a
    complete one under the aside name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp.chmod(umask_mode(directory=True))
        yield tmp
        swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(new: Path, path: Path) -> None:
    """Move the complete directory ``new`` to ``path``, replacing what is there (a file or a
    folder). Between the two renames the old complete version is at :func:`aside_of` ``(path)``."""
    aside = None
    if path.exists():
        aside = aside_of(path)
        _remove(aside)
        os.replace(path, aside)
    os.replace(new, path)
    if aside is not None:
        _remove(aside)


def aside_of(path: Path) -> Path:
    """Where :func:`swap_in` keeps the previous version of ``path`` during the swap."""
    return path.with_name(f".{path.name}.old")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def json_safe(obj: Any) -> Any:
    """Replace NaN/inf by None recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
