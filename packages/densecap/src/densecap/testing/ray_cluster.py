"""A real local Ray cluster for the tests and the benchmark: ``ray start --head --block`` in its own
session, on 127.0.0.1, with its own temporary directory, always stopped by :meth:`RayCluster.stop`
(SIGTERM, then SIGKILL of every process left in the session: raylet, GCS, workers). It runs under
``server_guard.py``, so the whole cluster also ends when the process that started it ends without
calling stop() (SIGKILL included). Only the processes of this session are touched, never other Ray
clusters on the machine.

    with RayCluster(num_cpus=2) as rc:
        densecap run ... --ray-address rc.address
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .vllm_server import GUARD, free_port


def session_pids(sid: int) -> list[int]:
    """Live processes whose session id is ``sid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            out.append(int(d.name))
    return out


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


class RayCluster:
    def __init__(self, num_cpus: int = 2, object_store_memory: int = 200_000_000):
        self.num_cpus = num_cpus
        self.object_store_memory = object_store_memory
        self.port = free_port()
        # short: Ray puts unix sockets under it (107-character limit)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dcray-", dir="/tmp"))
        self.proc: subprocess.Popen | None = None
        self.log_path = self.temp_dir / "ray-start.log"
        self.start_seconds = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> "RayCluster":
        ray_cli = Path(sys.executable).with_name("ray")
        cmd = [str(ray_cli), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
               "--num-cpus", str(self.num_cpus), "--num-gpus", "0", "--include-dashboard", "false",
               "--object-store-memory", str(self.object_store_memory), "--temp-dir", str(self.temp_dir),
               "--disable-usage-stats"]
        t0 = time.time()
        self._log = open(self.log_path, "w")
        # stdin: a pipe this process never writes to; the guard ends the cluster at its EOF
        self.proc = subprocess.Popen([sys.executable, str(GUARD), "--", *cmd], stdin=subprocess.PIPE, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=ray_env(), start_new_session=True)
        while "Ray runtime started" not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.time() - t0 > timeout:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"ray start failed or timed out; log tail:\n{tail}")
            time.sleep(0.2)
        self.start_seconds = time.time() - t0
        return self

    def pids(self) -> list[int]:
        return session_pids(self.proc.pid) if self.proc is not None else []

    def stop(self) -> list[int]:
        """Stop the cluster; returns the pids still alive afterwards (should be none)."""
        if self.proc is None:
            return []
        sid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the guard passes it on: `ray start --block` stops its processes
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(100):
            left = session_pids(sid)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self._log.close()
        self.proc = None
        left = session_pids(sid)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left

    def __enter__(self) -> "RayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
