"""The README matches the code."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

from web import Settings

from .support import Server, readme_block

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


def shell_steps(block: str) -> list[tuple[str, list[str]]]:
    """A shell example as (command, the output its ``# `` comment lines show) pairs; a
    comment that ends in a colon describes the next command instead."""
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("#"):
            comment = line[2:] if line.startswith("# ") else ""
            if steps and not comment.endswith(":"):
                steps[-1][1].append(comment)
        elif line.strip():
            steps.append((line, []))
    return steps


def test_the_durable_streams_curl_examples_run_as_written(server: Server) -> None:
    steps = shell_steps(readme_block("## Durable Streams protocol", "sh"))
    assert len(steps) >= 8
    env = {**os.environ, "KS": server.url}
    for command, expected in steps:
        done = subprocess.run(
            ["bash", "-c", f"set -eo pipefail; {command}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, (command, done.stderr)
        shown = [line.rstrip("\r") for line in done.stdout.splitlines()]
        while expected and not expected[-1] and len(expected) > len(shown):
            expected = expected[:-1]
        assert shown == expected, command
