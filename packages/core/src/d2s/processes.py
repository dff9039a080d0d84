"""Processes that end with their parent, and signals that end a run through its clean-up.

- :func:`die_with_parent`: a worker process ends when the process that started it ends.
- :func:`signals_interrupt`: SIGTERM interrupts like SIGINT (an :class:`Interrupted`), so the
  ``finally`` blocks that stop workers and clusters run for both.
- :func:`signals_deferred`: clean-up that must finish is not cut short by a second signal.
- :func:`alive`: whether a pid is a live process (not a zombie), on Linux.

Used by the pipeline runner's stage processes (``d2s run --jobs``) and densecap's executors.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which (the exit status is 128 + signum)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


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

    threading.Thread(target=watch, name="d2s-parent-watchdog", daemon=True).start()


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


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process: it exists and is not a zombie waiting to be reaped
    (read from ``/proc``; False where there is no ``/proc``)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
