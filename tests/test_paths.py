"""The flat layout's module paths still import, as their new modules (one release of grace), and
``crma_lightning.callbacks`` is the top-level callbacks/ folder."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from subproc import REPO

from crma_lightning._paths import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_its_new_module(old):
    assert importlib.import_module(f"crma_lightning.{old}") is importlib.import_module(
        f"crma_lightning.{MOVED[old]}"
    )


def test_an_old_class_path_resolves_to_the_same_class():
    from jsonargparse.typing import import_object

    from crma_lightning.training.module import ContinualLM

    assert import_object("crma_lightning.module.ContinualLM") is ContinualLM


def test_callbacks_are_the_top_level_folder_under_the_package_name():
    import crma_lightning.callbacks

    assert Path(crma_lightning.callbacks.__file__).resolve() == REPO / "callbacks" / "__init__.py"
