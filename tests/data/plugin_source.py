"""A task source defined outside the package, for test_sources.py: ``reversed:<path>`` reads a
UTF-8 text file and reverses each of its non-blank lines (one record each)."""

from __future__ import annotations

from pathlib import Path

import datasets

from crma_lightning.data.sources import TaskSource
from crma_lightning.data.spec import TaskSpec


class ReversedLines(TaskSource):
    """``<prefix><path>``: the lines of a text file, each reversed, as ``text`` records."""

    kind = "reversed"

    def __init__(self, prefix: str = "reversed:") -> None:
        self.prefix = prefix

    def claims(self, source: str) -> bool:
        return source.startswith(self.prefix)

    def problems(self, task: TaskSpec, where: str) -> list[str]:
        path = Path(task.source.removeprefix(self.prefix))
        return [] if path.is_file() else [f"{where}.source: file {str(path)!r} does not exist"]

    def load(self, index: int, task: TaskSpec, location: str) -> datasets.Dataset:
        lines = Path(location.removeprefix(self.prefix)).read_text(encoding="utf-8").splitlines()
        return datasets.Dataset.from_dict({"text": [line[::-1] for line in lines if line.strip()]})
