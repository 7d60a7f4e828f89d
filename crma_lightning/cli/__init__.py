"""The command line, one table of subcommands: ``python train.py <subcommand> ...``.

``fit``/``validate``/``test`` are LightningCLI (:mod:`crma_lightning.cli.fit`); ``predict``,
``route``, ``export`` and ``test --run <dir>`` use a finished run (:mod:`crma_lightning.cli.serve`);
``plan`` prints a config's memory plan (:mod:`crma_lightning.cli.plan`).
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "fit": "crma_lightning.cli.fit",
    "validate": "crma_lightning.cli.fit",
    "test": "crma_lightning.cli.fit",
    "predict": "crma_lightning.cli.serve",
    "route": "crma_lightning.cli.serve",
    "export": "crma_lightning.cli.serve",
    "test --run": "crma_lightning.cli.serve",
    "plan": "crma_lightning.cli.plan",
}
"""Subcommand -> the module whose ``main(argv)`` runs it (imported only when chosen)."""


def subcommand(argv: list[str]) -> str:
    """The row of :data:`SUBCOMMANDS` that ``argv`` (without the program name) selects."""
    first = argv[0] if argv else ""
    if first == "test" and any(a == "--run" or a.startswith("--run=") for a in argv[1:]):
        return "test --run"
    return first if first in SUBCOMMANDS else "fit"


def main(argv: list[str] | None = None) -> None:
    """Run the subcommand ``argv`` names (default: ``sys.argv[1:]``)."""
    args = sys.argv[1:] if argv is None else argv
    key = subcommand(args)
    module = importlib.import_module(SUBCOMMANDS[key])
    if key == "plan":
        module.main(args[1:])
    elif module.__name__.endswith(".fit"):
        module.main(argv)  # None: LightningCLI reads sys.argv, as DDP's relaunched ranks do
    else:
        module.main(args)
