"""Where the Ray executor's cluster is: a local one that dies with its starter, or an address
checked before Ray is touched.

:class:`RayCluster`: ``ray start --head --block`` in its own session, on 127.0.0.1, with its own
temporary directory, run under ``densecap/testing/server_guard.py``: the whole cluster (GCS,
raylet, agents, workers) ends when :meth:`RayCluster.stop` is called or when the starting process
ends in any way, SIGKILL included. The Ray executor starts one like this when it is given no
address, because a cluster started by ``ray.init()`` leaves its dashboard and runtime-env agents
running when the driver is SIGKILLed (seen with Ray 2.60). The tests and the benchmark use it too.
Only the processes of this session are ever signalled, never other Ray clusters on the machine.

    with RayCluster(num_cpus=2) as rc:
        densecap run ... --ray-address rc.address

:func:`resolve_address`: ``executor.address`` parsed and checked without Ray (a malformed
address, ``auto`` with no cluster, a host:port where nothing answers each fail in seconds with
a :class:`~d2s.config.ConfigError` naming the field and the value given).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from d2s.config import ConfigError
from d2s.processes import alive

GUARD = Path(__file__).parents[1] / "testing" / "server_guard.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def remove_stale_dirs(parent: Path = Path("/tmp")) -> list[Path]:
    """Remove the temporary directories (Ray's logs and sockets, ~200 KB) of clusters whose starter
    was killed before it could clean up: ``dcray-*`` directories whose ``owner.pid`` is not alive."""
    gone = []
    for d in parent.glob("dcray-*"):
        try:
            pid = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if not alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def ray_env(token: str = "") -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # Ray starts its workers at niceness 15; densecap's replicas would then lose the CPU to
    # everything else on a busy node (the vLLM server included) and caption ~20 % slower
    env.setdefault("RAY_worker_niceness", "0")
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


class RayCluster:
    def __init__(
        self, num_cpus: int | None = None, num_gpus: int | None = None, object_store_memory: int | None = None
    ):
        # None: what Ray detects (every core / GPU; object store ~30 % of memory)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.object_store_memory = object_store_memory
        self.port = free_port()
        # short: Ray puts unix sockets under it (107-character limit)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dcray-", dir="/tmp"))
        # a token of its own (Ray's token authentication): only processes given client_env() can join,
        # and nothing is read from or written to ~/.ray
        self.token = secrets.token_hex(32)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.temp_dir / "ray-start.log"
        self.start_seconds = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client_env(self) -> dict[str, str]:
        """What a process that joins this cluster needs in its environment (the auth token)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self, timeout: float = 180.0) -> RayCluster:
        remove_stale_dirs(self.temp_dir.parent)
        (self.temp_dir / "owner.pid").write_text(str(os.getpid()))
        ray_cli = Path(sys.executable).with_name("ray")
        cmd = [
            str(ray_cli),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--include-dashboard",
            "false",
            "--temp-dir",
            str(self.temp_dir),
            "--disable-usage-stats",
        ]
        for flag, v in (
            ("--num-cpus", self.num_cpus),
            ("--num-gpus", self.num_gpus),
            ("--object-store-memory", self.object_store_memory),
        ):
            if v is not None:
                cmd += [flag, str(int(v))]
        t0 = time.time()
        self._log = open(self.log_path, "w")
        # stdin: a pipe this process never writes to; the guard ends the cluster at its EOF
        self.proc = subprocess.Popen(
            [sys.executable, str(GUARD), "--", *cmd],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=ray_env(self.token),
            start_new_session=True,
        )
        try:
            while "Ray runtime started" not in self.log_path.read_text(errors="replace"):
                if self.proc.poll() is not None or time.time() - t0 > timeout:
                    tail = self.log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"ray start failed or timed out; log tail:\n{tail}")
                time.sleep(0.2)
        except BaseException:  # failed, or interrupted while starting: nothing of it may stay
            self.stop(graceful=False)
            raise
        self.start_seconds = time.time() - t0
        return self

    def pids(self) -> list[int]:
        return session_pids(self.proc.pid) if self.proc is not None else []

    def stop(self, graceful: bool = True) -> list[int]:
        """Stop the cluster (``graceful=False``: SIGKILL at once, for when nothing is running on it);
        returns the pids still alive afterwards (should be none)."""
        if self.proc is None:
            return []
        sid = self.proc.pid
        if self.proc.poll() is None and graceful:
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

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- executor.address ------------------------------------------------------------------
ADDRESS_FORMS = "'' (start a local cluster), 'auto', 'HOST:PORT' or 'ray://HOST[:PORT]'"
CLIENT_PORT = 10001  # Ray Client's default port
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")


def parse_address(value: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a Ray address: ``HOST:PORT`` (scheme '') or
    ``ray://HOST[:PORT]`` (Ray Client, port 10001 by default); IPv6 hosts in brackets.
    ValueError saying what is wrong otherwise."""
    scheme = "ray://" if value.startswith("ray://") else ""
    rest = value[len(scheme) :]
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")) or not re.fullmatch(r"[0-9A-Fa-f:.]+", host):
            raise ValueError("not a Ray address")
        port_s = tail[1:]
    else:
        host, sep, port_s = rest.rpartition(":")
        if not sep:
            host, port_s = rest, ""
        if not _HOST.fullmatch(host):
            raise ValueError("not a Ray address")
    if not port_s and not scheme:
        raise ValueError("no port")
    if port_s and not port_s.isdigit():
        raise ValueError(f"port {port_s!r} is not a number")
    port = int(port_s) if port_s else CLIENT_PORT
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not in 1..65535")
    return scheme, host, port


def ray_temp_dir() -> Path:
    """Where Ray keeps the address of the cluster ``ray start`` last started (as Ray finds it)."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else "")
    return Path(base or "/tmp") / "ray"


def find_auto_address() -> tuple[str, str]:
    """(address, where it came from) for ``auto``: $RAY_ADDRESS, else the address file ``ray
    start`` writes (``<ray temp dir>/ray_current_cluster``); ConfigError when there is neither."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return env, "$RAY_ADDRESS"
    f = ray_temp_dir() / "ray_current_cluster"
    try:
        found = f.read_text().strip()
    except OSError:
        found = ""
    if found:
        return found, str(f)
    raise ConfigError(
        f"executor.address: 'auto' found no running Ray cluster ($RAY_ADDRESS is not set and {f} does not "
        "exist): start one with `ray start --head`, give its HOST:PORT, or leave executor.address empty "
        "to start a local cluster"
    )


def _tcp_error(host: str, port: int, timeout: float) -> str:
    """'' when ``host:port`` accepts a TCP connection within ``timeout`` seconds (name lookup
    included), else why not."""
    outcome: list[str] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append("")
        except OSError as exc:
            outcome.append(str(exc) or type(exc).__name__)

    t = threading.Thread(target=attempt, name="densecap-ray-address-check", daemon=True)
    t.start()
    t.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g}s"


def resolve_address(value: str, timeout: float) -> str:
    """``executor.address`` checked without Ray: '' stays '' (a local cluster), anything else
    becomes the address to give ``ray.init`` once something accepts a TCP connection there
    within ``timeout`` seconds. Raises ConfigError naming the field and the value given."""
    if not value:
        return ""
    given = f"executor.address: {value!r}"
    if value == "auto":
        found, origin = find_auto_address()
        given = f"executor.address: 'auto' ({found!r}, from {origin})"
        value = found
    try:
        scheme, host, port = parse_address(value)
    except ValueError as exc:
        raise ConfigError(f"{given}: {exc}; expected {ADDRESS_FORMS}") from None
    why = _tcp_error(host, port, timeout)
    if why:
        raise ConfigError(
            f"{given}: nothing accepted a connection at {host}:{port} within {timeout:g}s ({why}); "
            "is the Ray head node running there? (executor.connect_timeout sets the wait)"
        )
    return f"{scheme}[{host}]:{port}" if ":" in host else f"{scheme}{host}:{port}"
