"""``python -m vse_train.cli ...`` as real processes that skip the interpreter's start-up.

Each run is its own process, forked from a server process that imported the trainer once
(multiprocessing's forkserver, with the trainer's modules preloaded): its own environment,
working directory, stdout and stderr (files, read back like ``subprocess.run(capture_output=True)``
does), and its exit status as ``subprocess`` gives it (``-9`` after a SIGKILL, e.g. by the
failpoint of ``vse_train.failpoints``). The server starts at the first run, with that run's
environment (what is read at import, e.g. ``OMP_NUM_THREADS`` or ``HF_HUB_OFFLINE``, is read
then); every run gets its own environment before the trainer's code runs. What it saves is the
~3-4 s of imports of each fresh interpreter (torch, transformers, accelerate), which is most of
a tiny training run: the tests that kill runs at every point of a save start some twenty.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# imported once by the server (a module that fails to import is skipped: the runs then import it),
# with the backbones of tiny-vit, which transformers imports lazily, at the first from_pretrained
PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.vit.modeling_vit",
    "transformers.models.bert.modeling_bert",
    "accelerate",
    "safetensors.torch",
    "webdataset",
    "vse.models",
    "vse_train.cli",
    "vse_train.train",
]
_CTX = multiprocessing.get_context("forkserver")
_START = threading.Lock()  # runs are started from several threads at once


def _child(argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    # multiprocessing made forkserver this process's start method: back to a fresh interpreter's
    # default, so that e.g. its DataLoader workers are its own forked children, as they would be
    multiprocessing.set_start_method(None, force=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    from vse_train.cli import main

    sys.exit(main(argv))  # the status main returns, as `python -m vse_train.cli` exits with it


def _start_server(env: dict[str, str]) -> None:
    from multiprocessing import forkserver

    with _START:
        _CTX.set_forkserver_preload(PRELOAD)  # no effect once the server runs
        saved = dict(os.environ)
        os.environ.clear()  # the server inherits this process's environment when it starts
        os.environ.update(env)
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)


def run_cli(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``vse_train.cli`` with ``argv`` in a forked process; its stdout and stderr as text."""
    _start_server(env)
    with tempfile.TemporaryDirectory(prefix="forked-cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        out.touch(), err.touch()  # there even if the process dies before it opens them
        proc = _CTX.Process(target=_child, args=(list(argv), dict(env), str(cwd), str(out), str(err)))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["vse_train.cli", *argv], timeout, err.read_text())
        return subprocess.CompletedProcess(["vse_train.cli", *argv], proc.exitcode, out.read_text(), err.read_text())
