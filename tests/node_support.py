"""Running the pinned JavaScript clients in ``tests/node`` (Node.js and npm) from pytest."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

NODE_DIR = Path(__file__).parent / "node"
LOCK = NODE_DIR / "package-lock.json"
INSTALLED = NODE_DIR / "node_modules" / ".package-lock.json"


def require_node() -> Path:
    """The test package's folder with its pinned packages installed (``npm ci`` once).

    Without Node.js the test is skipped on a developer's machine and fails in CI.
    """
    if shutil.which("node") is None or shutil.which("npm") is None:
        if os.environ.get("CI"):
            pytest.fail("Node.js and npm are needed for the client tests")
        pytest.skip("Node.js and npm are not installed")
    # One install at a time: parallel test workers may all need it at once.
    with open(NODE_DIR / ".install-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not INSTALLED.exists() or INSTALLED.stat().st_mtime < LOCK.stat().st_mtime:
            subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=NODE_DIR,
                check=True,
                timeout=300,
            )
    return NODE_DIR


def run_node(script: str, *, env: dict[str, str], timeout: float = 60.0) -> Any:
    """Run ``tests/node/<script>`` and return the JSON it prints as its last line.

    A script that exits non-zero fails the test with its output.
    """
    folder = require_node()
    done = subprocess.run(
        ["node", script],
        cwd=folder,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        pytest.fail(f"node {script} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    lines = done.stdout.strip().splitlines()
    assert lines, f"node {script} printed nothing:\n{done.stderr}"
    return json.loads(lines[-1])
