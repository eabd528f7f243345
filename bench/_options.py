"""What every benchmark script shares on its command line and in its header."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def add_run_options(
    parser: argparse.ArgumentParser, *, time_limit: float, keep_dir_help: str, git: bool = True
) -> None:
    """The options every benchmark has: the client loop, extra keepstream arguments, the
    hard time limit, keeping the temporary directory and, for one that reports the core's
    revision (``git``), ``--no-git``."""
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="client event loop"
    )
    parser.add_argument(
        "--ks-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for keepstream serve (repeat; e.g. --ks-arg=--synchronous "
        "--ks-arg=FULL)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=time_limit,
        help="hard limit for the whole invocation, seconds",
    )
    parser.add_argument("--keep-dir", action="store_true", help=keep_dir_help)
    if git:
        parser.add_argument(
            "--no-git",
            action="store_true",
            help="do not ask git for the core's revision (git status touches the index, e.g. "
            "while the repository is in use)",
        )


def _git(*args: str) -> str:
    """A git command's output in the repository (raises if it fails)."""
    done = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.strip()


def core_revision() -> str:
    """The git revision of the core under test, ``+dirty`` if store/streaming/web have edits."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--", "store", "streaming", "web")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def revision(opts: argparse.Namespace) -> str:
    """The core's revision for a run's header, unless ``--no-git`` says not to ask."""
    return "not asked" if opts.no_git else core_revision()
