"""A real vLLM server dies with what started it (issue 11): a test process SIGKILLed from outside,
and `python -m densecap.testing.vllm_server` stopped with SIGTERM, leave no server behind; the
latter exits within 2 s of vLLM's own shutdown (issue 17)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from d2s.processes import alive
from tests.densecap.conftest import REPO
from tests.densecap.test_reliability import children, cmdline, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def server_pids(port: int) -> list[int]:
    """The vLLM API server listening on ``port`` and every process below it."""
    roots = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"vllm.entrypoints.openai.api_server" in cmd and str(port).encode() in cmd:
                roots.append(int(d.name))
    found, todo = [], list(roots)
    while todo:
        p = todo.pop()
        if p not in found:
            found.append(p)
            todo += children(p)
    return found


def _readline(proc: subprocess.Popen, marker: str, limit: float = 300) -> str:
    import select
    import time

    t0 = time.time()
    while time.time() - t0 < limit:
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode})")
        r, _, _ = select.select([proc.stdout], [], [], 1.0)
        if r:
            line = proc.stdout.readline()
            if marker in line:
                return line
    raise AssertionError(f"no {marker!r} line within {limit:.0f}s")


def _check_server_dies(starter: subprocess.Popen, port: int, stop) -> None:
    pids = server_pids(port)
    try:
        assert len(pids) >= 1 and all(alive(p) for p in pids), pids
        stop(starter)
        wait_until(lambda: not any(alive(p) for p in pids), f"vLLM server processes {pids} end", limit=90)
    finally:
        for p in pids:  # never leave a 3 GB server behind, even when the test fails
            if alive(p):
                os.kill(p, signal.SIGKILL)
        if starter.poll() is None:
            starter.kill()
        starter.wait()


def _sigkill_starter(tiny_vlm: Path, port: int, scratch: Path) -> subprocess.Popen:
    """A process that starts a server with VLLMServer, says 'ready', then sleeps (as a test run does)."""
    code = (
        "import sys, time\n"
        "from densecap.testing.vllm_server import VLLMServer\n"
        f"srv = VLLMServer({str(tiny_vlm)!r}, port={port}, scratch={str(scratch)!r}, inline_worker=True).start()\n"
        "print('ready', flush=True)\n"
        "time.sleep(1800)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def _cli_starter(tiny_vlm: Path, port: int, cwd: Path) -> subprocess.Popen:
    """`python -m densecap.testing.vllm_server` serving until SIGTERM."""
    return subprocess.Popen(
        # vLLM's own three-process layout (the suite's other servers run the model inline)
        [sys.executable, "-m", "densecap.testing.vllm_server", str(tiny_vlm), "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


STARTERS = {
    "test_server_dies_when_its_starter_is_sigkilled": _sigkill_starter,
    "test_module_cli_stopped_with_sigterm_stops_its_server": _cli_starter,
}
# the session launches them in the background once its own vLLM servers are up (tests/conftest.py),
# so that their servers are up by the time these tests come
START_EARLY = STARTERS


@pytest.fixture(scope="module")
def starters(request, tiny_vlm, vllm_python, tmp_path_factory):
    """Each selected test's starter with its port: the one the session launched early
    (``started_early``), else launched here, all at once (a vLLM start is mostly imports, one
    process at a time; two fill 2 cores). Whatever a test leaves behind (its starter, its server) is
    killed at the end of the module."""
    from densecap.testing.vllm_server import free_port
    from tests.conftest import started_early

    selected = {it.name for it in request.session.items}
    out: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        for name, launch in STARTERS.items():
            if name in selected:
                out[name] = started_early(name) or (
                    launch(tiny_vlm, port := free_port(), tmp_path_factory.mktemp("lifetime")),
                    port,
                )
        yield out
    finally:
        for proc, port in out.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for p in server_pids(port):
                if alive(p):
                    os.kill(p, signal.SIGKILL)


def test_server_dies_when_its_starter_is_sigkilled(starters):
    starter, port = starters["test_server_dies_when_its_starter_is_sigkilled"]
    _readline(starter, "ready")
    # a test run killed from outside (a timeout, SIGKILL) never reaches its fixture's stop()
    _check_server_dies(starter, port, lambda p: p.send_signal(signal.SIGKILL))


def test_module_cli_stopped_with_sigterm_stops_its_server(starters):
    starter, port = starters["test_module_cli_stopped_with_sigterm_stops_its_server"]
    _readline(starter, "serving")
    # vLLM's own processes: not the guard that runs it (its command line names the server too)
    server = [p for p in server_pids(port) if "server_guard" not in cmdline(p)]
    assert server

    def term(p):
        p.send_signal(signal.SIGTERM)
        wait_until(lambda: not any(alive(x) for x in server), f"vLLM's processes {server} end", limit=90)
        # once vLLM has shut down the helper has nothing left to wait for: it exits at once, cleanly
        # (its server guard used to sleep out a 20 s wait it could not finish, issue 17)
        assert p.wait(timeout=2) == 0

    _check_server_dies(starter, port, term)
