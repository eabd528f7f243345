"""Which server processes are alive: heartbeats, leases, and a quick check for local pids."""

from __future__ import annotations

import os
import socket
import time

from store import WorkerRecord

DEFAULT_HEARTBEAT_INTERVAL = 2.0
DEFAULT_LEASE_TIMEOUT = 15.0
# When this process loaded keepstream: every runtime in it heartbeats after this, and an
# earlier process that had the same pid (a restarted container's pid 1) stopped before it.
PROCESS_STARTED = time.time()


def this_host() -> str:
    """The name other processes on this machine will also see."""
    return socket.gethostname()


def is_dead(worker: WorkerRecord, *, me: WorkerRecord, now: float, lease_timeout: float) -> bool:
    """Whether ``worker``'s generations may be taken over.

    A worker is dead when its lease ran out (no heartbeat for ``lease_timeout``), or at once
    when it ran on this host and its pid is gone — or is our own pid, last heard before this
    process started (a restarted container reuses pid 1). Our pid heard since is another
    runtime in this very process, alive.
    """
    if worker.id == me.id:
        return False
    if now - worker.heartbeat_at > lease_timeout:
        return True
    if worker.hostname != me.hostname:
        return False
    if worker.pid == me.pid:
        return worker.heartbeat_at < PROCESS_STARTED
    try:
        os.kill(worker.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
