"""Who may write what, and processes that end with their parent or on a signal.

- :class:`RunLock`: ``<out>/densecap-rank<R>.lock``, one process at a time writes a rank of an
  output directory (the driver, whatever the executor).
- :func:`unit_lock`: ``<out>/.densecap-units/<shard>.lock``, one attempt at a time writes a unit,
  for executors whose workers are not children of the process holding the rank lock (Ray).
- :func:`die_with_parent`: a worker process ends when the process that started it ends.
- :func:`signals_interrupt`: SIGTERM interrupts like SIGINT (a :class:`Interrupted`), so the
  ``finally`` blocks that stop workers and clusters run for both.

Every lock is an ``flock``, which the kernel drops when its holder dies (SIGKILL included): a
stale lock file never blocks a rerun.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

UNIT_LOCKS = ".densecap-units"


class RunLocked(RuntimeError):
    """Another densecap process is writing the same rank of the same output directory."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which (the exit status is 128 + signum)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


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


def die_with_parent(parent_pid: int) -> None:
    """Make this process end when ``parent_pid`` (the process that started it) ends, however it
    ends: a parent-death signal on Linux, and a watchdog thread on the parent pid everywhere."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="densecap-parent-watchdog", daemon=True).start()


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (SIGTERM
    would otherwise end the process at once, skipping every ``finally``). Outside the main
    thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in before:
        signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Within the block (clean-up that must finish: stopping workers, a cluster), SIGINT and
    SIGTERM are ignored; a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in before:
        signal.signal(s, signal.SIG_IGN)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)
