"""Each package's public surface is what ``__all__`` says, and these are our packages."""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["keepstream", "store", "streaming", "web", "client"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_lists_exactly_the_public_names(name: str) -> None:
    module = importlib.import_module(name)
    public = {
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_")
        and not isinstance(value, types.ModuleType)
        and attr != "annotations"
    }
    assert len(set(module.__all__)) == len(module.__all__)  # order: ruff RUF022
    assert set(module.__all__) == public


@pytest.mark.parametrize("name", PACKAGES)
def test_packages_are_this_projects_not_pypis(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().is_relative_to(ROOT)
