"""A shipped multi-domain corpus of real text for continual-learning runs without a network.

Six clearly distinct domains, 600 records ``{"text": ...}`` of 400-1200 characters each, stored as
``<domain>.jsonl.gz`` beside this file and rebuilt by ``scripts/build_corpus.py``. Sources,
versions and licences: ``LICENSES.md`` beside this file. A data config names a domain as the task
source ``corpus:<domain>`` (``crma_lightning.data``).
"""

import gzip
import json
from pathlib import Path

DOMAINS: tuple[str, ...] = ("code", "legal", "medical", "literature", "scripture", "dictionary")
"""The shipped domains, in the order they are listed and built."""

SUFFIX = ".jsonl.gz"


def domain_path(name: str) -> str:
    """Path of the shipped file of domain ``name``; ``ValueError`` listing the domains for any other name."""
    if name not in DOMAINS:
        raise ValueError(f"unknown corpus domain {name!r}; the shipped domains are {', '.join(DOMAINS)}")
    return str(Path(__file__).parent / f"{name}{SUFFIX}")


def load_domain(name: str) -> list[str]:
    """The texts of domain ``name``, in file order."""
    with gzip.open(domain_path(name), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]
