"""The README matches the code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from web import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        env = "KEEPSTREAM_" + field.name.upper()
        assert f"| `{flag}` | `{env}` |" in readme, flag


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = (
        'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest'
    )
    assert command in readme
    assert command in ci
