"""Who may write what.

- :class:`RunLock`: ``<out>/densecap-rank<R>.lock``, one process at a time writes a rank of an
  output directory (the driver, whatever the executor).
- :func:`unit_lock`: ``<out>/.densecap-units/<shard>.lock``, one attempt at a time writes a unit,
  for executors whose workers are not children of the process holding the rank lock (Ray).

Every lock is an ``flock``, which the kernel drops when its holder dies (SIGKILL included): a
stale lock file never blocks a rerun. Processes that end with their parent and signals that
end a run through its clean-up are :mod:`d2s.processes`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

UNIT_LOCKS = ".densecap-units"


class RunLocked(RuntimeError):
    """Another densecap process is writing the same rank of the same output directory."""


class RunLock:
    """``<out>/densecap-rank<R>.lock``: an exclusive ``flock`` held for the whole run, with the
    holder's pid, host and command line in the file. The kernel drops the lock when the
    holder dies (SIGKILL included), so a stale file never blocks a rerun; a second live run
    on the same directory and rank stops at once with :class:`RunLocked` naming the holder."""

    def __init__(self, out: Path, rank: int):
        self.path = Path(out) / f"densecap-rank{rank}.lock"
        self.rank = rank
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
            except (ValueError, UnicodeDecodeError):
                holder = {}
            os.close(fd)
            who = (
                f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
                f"{holder.get('command', '?')}"
            )
            raise RunLocked(
                f"{self.path.parent}: rank {self.rank} is being written by another densecap process ({who}); "
                f"wait for it to finish or stop it (kill {holder.get('pid', '<pid>')}), then rerun. Lock file: {self.path}"
            ) from None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def unit_lock(out: Path, shard: str) -> Iterator[None]:
    """Hold ``<out>/.densecap-units/<shard>.lock`` for the block; blocks while an earlier attempt
    at the same unit (a Ray retry, or the worker of a killed driver) still lives and holds it."""
    lock_dir = Path(out) / UNIT_LOCKS
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / (shard + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
