"""One live process per node name and job database. A node's start puts back in the queue the
jobs its earlier life left RUNNING, at once rather than when their leases expire: that is only
right when no other live process runs under that name (a second start by mistake would take over
the jobs of the first, which is still copying them)."""
from __future__ import annotations

import fcntl
import hashlib
import os
import re


class NodeBusy(RuntimeError):
    """Another live process holds this node's lock on the database."""


class NodeLock:
    """An exclusive lock on `<db>.<node>.lock`, held while the process lives: the kernel drops
    it when the process ends, however it ends, so a crash leaves nothing to clean up."""

    def __init__(self, db: str, node: str) -> None:
        # A node name may hold any character: the file name keeps the safe ones and a hash.
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", node)[:64]
        self.path = f"{db}.{safe}-{hashlib.sha256(node.encode()).hexdigest()[:8]}.lock"
        self.node = node
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise NodeBusy(
                f"another pydlit process (pid {holder}) runs as node {self.node!r} on this job database: "
                "stop it first, or give this one another PYDLIT_NODE"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
