"""Schemathesis against a running keepstream server: generated requests for every operation
of its ``/openapi.json``, checked for server errors and for answers that break the schema."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
_GENERATED = re.compile(r"(\d+) generated")


@dataclass(frozen=True)
class FuzzRun:
    """What one schemathesis run did: its exit code, how many requests it generated, and
    its report."""

    exit_code: int
    generated: int
    output: str

    @property
    def passed(self) -> bool:
        """No check failed."""
        return self.exit_code == 0


def run_schemathesis(
    base_url: str,
    *,
    api_key: str | None,
    max_examples: int,
    workers: int = 2,
    seed: int | None = None,
    request_timeout: float = 5.0,
    timeout: float = 1800.0,
    cwd: Path | None = None,
) -> FuzzRun:
    """Run the schemathesis CLI (installed beside this Python) on ``base_url``."""
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{base_url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(max_examples),
        "--workers",
        str(workers),
        "--request-timeout",
        str(request_timeout),
        "--generation-database",
        "none",
        "--no-color",
    ]
    if api_key is not None:
        command += ["--header", f"Authorization: Bearer {api_key}"]
    if seed is not None:
        command += ["--seed", str(seed)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )
    output = done.stdout + done.stderr
    found = _GENERATED.findall(output)
    return FuzzRun(done.returncode, int(found[-1]) if found else 0, output)
