"""``ray``: the units in Ray actors on a local or remote cluster (needs ``densecap[ray]``).

The process that runs the job is the *driver*: it holds the rank lock, plans the units, shows one
progress bar and, once every unit is complete, writes the manifest and the report. Before it
starts or joins a cluster it checks what needs none: ``executor.address``
(:func:`densecap.executors.ray_cluster.resolve_address`: malformed, ``auto`` with no cluster, or
nothing answering there each fail in seconds) and the job's ``check`` (densecap: the caption
servers). The units run in ``replicas`` actors (:class:`UnitWriter`), each building its worker
from the :class:`~densecap.executors.base.WorkerSpec` and starting it once (a vLLM engine with
``num_gpus`` per replica; HTTP clients for ``vllm-server``, whose ``base_urls`` may list one
server per GPU or node).

Failures are Ray's to handle: an actor whose process or node dies is restarted by Ray
(``max_restarts``) and the unit it was writing is retried (``max_task_retries``), on the same or
another node. A unit is written under its own lock (:func:`write_exclusively`), so a retry, or a
rerun after the driver itself was killed, waits for any earlier attempt still writing it, then
finds the shard complete (and skips it) or clears the leftovers and writes it: every image once.

When the driver dies, Ray ends its actors (they belong to the driver's job); a local cluster
started by the driver (no address: :class:`~densecap.executors.ray_cluster.RayCluster`) ends with
it, every process of it. Interrupted (SIGINT, SIGTERM), the driver kills its actors and stops its
local cluster before it exits. Rerunning the same command resumes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from d2s.config import ConfigError
from d2s.processes import signals_deferred
from d2s.shards import shard_name

from ..images import Unit
from ..locks import unit_lock
from ..worker import RunAborted, clear_unit, read_stats, shard_state
from .base import UnitWorker, WorkerSpec, build_worker, run_check
from .ray_cluster import RayCluster, resolve_address

log = logging.getLogger(__name__)

LOCAL_HEAD_ARGS = ("num_cpus", "num_gpus", "object_store_memory")


def write_exclusively(worker: UnitWorker, unit: Unit, spec: WorkerSpec) -> dict[str, Any]:
    """Write ``unit`` holding its lock (:func:`densecap.locks.unit_lock`): a retry, or a rerun after
    its driver was killed, waits for any earlier attempt still writing it, then looks again. A shard
    completed meanwhile is not written twice (its stats come back with ``skipped: true``);
    otherwise the earlier attempt's leftovers are cleared here, under the lock, and it is written."""
    name = shard_name(unit.split, unit.index)
    with unit_lock(Path(spec.out), name):
        st = read_stats(Path(spec.out), name)
        state = shard_state(st, spec.fingerprint, spec.retry_key, spec.expect)
        if state == "done":
            return {**st, "shard": name, "count": st.get("count", 0), "skipped": True}
        if state == "redo":
            clear_unit(Path(spec.out), name)
        return worker.process(unit)


class UnitWriter:
    """One replica: the spec's worker, started, living in a Ray actor process; ``process`` writes
    one unit and returns its stats."""

    def __init__(self, spec: WorkerSpec):
        from d2s.log import setup_logging

        setup_logging()
        self.spec = spec
        self.error: BaseException | None = None
        self.worker = build_worker(spec)
        self.worker.stats_extra = {"worker": f"{socket.gethostname()}:{os.getpid()}"}
        try:
            self.worker.start()
        except Exception as exc:  # noqa: BLE001 - reported by ready(); the driver raises it
            self.error = exc

    def ready(self) -> dict[str, Any]:
        return {"error": self.error, "pid": os.getpid(), "host": socket.gethostname()}

    def process(self, unit: Unit) -> dict[str, Any]:
        stats = write_exclusively(self.worker, unit, self.spec)
        stats["fatal"] = self.worker.fatal
        return stats


def _init_ray(address: str, kwargs: dict[str, Any]) -> None:
    """``ray.init`` keeping this process's SIGINT / SIGTERM handlers (Ray installs its own)."""
    import ray

    main = threading.current_thread() is threading.main_thread()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        ray.init(**({"address": address} if address else {}), **kwargs)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def _connect(address: str, init: dict[str, Any]) -> RayCluster | None:
    """Join the cluster at ``address`` (already checked), or start a local one (:class:`RayCluster`,
    which dies with this process); returns the local cluster to stop at the end, or None."""
    local = None
    if not address and "ray" not in sys.modules:
        local = RayCluster(**{k: init[k] for k in LOCAL_HEAD_ARGS if k in init}).start()
        address = local.address
        # its token, before Ray is imported (Ray reads its authentication settings then)
        os.environ.update(local.client_env())
        log.info("densecap: started a local Ray cluster at %s in %.1fs", address, local.start_seconds)
    import ray

    if ray.is_initialized():
        return local
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if not address:  # Ray already imported by the caller: let ray.init start its own local cluster
        kwargs["include_dashboard"] = False
    kwargs.update({k: v for k, v in init.items() if k not in LOCAL_HEAD_ARGS or not local})
    try:
        _init_ray(address, kwargs)
    except BaseException:
        if local is not None:
            with signals_deferred():
                local.stop(graceful=False)
        raise
    log.info("densecap: Ray cluster %s with %s", address or "started by ray.init", ray.cluster_resources())
    return local


def _before_cluster(spec: WorkerSpec, ex: Any) -> str:
    """What needs no cluster, before any is started or joined: Ray installed, the address (checked
    and resolved), and the job's own check. Returns the address to join ('' = a local cluster)."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "executor.type: 'ray' needs Ray in this environment: pip install 'd2s-densecap[ray]' "
            "(or bash scripts/bootstrap.sh)"
        )
    address = resolve_address(ex.address, ex.connect_timeout)
    if ex.check_on_driver:
        run_check(spec)
    return address


def run_units(
    spec: WorkerSpec,
    todo: list[Unit],
    executor: Any,
    num_workers: int,
    results: list[dict],
    tick: Callable[[int], None],
    info: dict[str, Any],
) -> str:
    """Write ``todo`` on Ray; ``info`` receives ``replicas`` and ``ray_startup_s`` (joining or starting
    the cluster until every replica has its worker started). Raises what a replica's ``start()``
    raised, and RunAborted (after the other units finished) when a unit could not be written after
    its retries."""
    if not todo:
        return ""
    caller_connected = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    address = "" if caller_connected else _before_cluster(spec, executor)
    t_start = time.perf_counter()
    local = _connect(address, dict(executor.init))
    import ray

    actors: list[Any] = []
    try:
        _start_replicas(spec, executor, num_workers, len(todo), actors)
        info.update(replicas=len(actors), ray_startup_s=round(time.perf_counter() - t_start, 2))
        log.info(
            "densecap: %d Ray replica(s) ready after %.1fs, %d unit(s) to write",
            len(actors),
            info["ray_startup_s"],
            len(todo),
        )
        return _schedule(actors, todo, results, tick, executor.max_retries)
    finally:
        with signals_deferred():  # every unit finished, given up or interrupted: end it all
            for a in actors:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001
                    pass
            if ray.is_initialized() and not caller_connected:
                ray.shutdown()
            if local is not None:
                local.stop(graceful=False)


def _start_replicas(spec: WorkerSpec, ex: Any, num_workers: int, n_units: int, actors: list[Any]) -> None:
    """Start the replicas (appended to ``actors`` at once, so the caller ends them whatever happens)
    and wait until each has its worker started."""
    import ray

    n = max(1, min(ex.replicas or num_workers, n_units))
    have = ray.cluster_resources()
    for res, per in (("CPU", ex.num_cpus), ("GPU", ex.num_gpus)):
        if per and per * n > have.get(res, 0):
            log.warning(
                "densecap: %d replicas x %s %s > the cluster's %s %s: some replicas wait for resources "
                "(an autoscaling cluster may add them)",
                n,
                per,
                res,
                have.get(res, 0),
                res,
            )
    Actor = ray.remote(UnitWriter).options(
        num_cpus=ex.num_cpus, num_gpus=ex.num_gpus, max_restarts=ex.max_retries, max_task_retries=ex.max_retries
    )
    actors.extend(Actor.remote(spec) for _ in range(n))
    for r in ray.get([a.ready.remote() for a in actors]):
        if r["error"] is not None:
            raise r["error"]


def _schedule(actors: list[Any], todo: list[Unit], results: list[dict], tick, max_retries: int) -> str:
    """Two units in flight per replica until none is left; returns the first fatal message."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    queue = deque(todo)
    running: dict[Any, tuple[Any, Unit]] = {}
    fatal = ""
    lost: list[str] = []
    t0 = time.perf_counter()

    def submit(actor: Any) -> None:
        u = queue.popleft()
        running[actor.process.remote(u)] = (actor, u)

    # two units per replica: the next one is already queued on the actor when one finishes
    for _ in range(2):
        for a in actors:
            if queue:
                submit(a)
    while running:
        (ref,), _ = ray.wait(list(running), num_returns=1)
        actor, unit = running.pop(ref)
        try:
            r = ray.get(ref)
        except RayActorError as exc:  # the replica died more than max_retries times: Ray gave up on it
            first = str(exc).splitlines()[0] if str(exc) else ""
            lost.append(f"{unit.split}-{unit.index}: {type(exc).__name__}: {first}")
            log.error("densecap: unit %s/%d lost after %d retries: %s", unit.split, unit.index, max_retries, exc)
            continue
        except RayTaskError as exc:  # an error inside the unit (not a death): not retried, reported
            raise RuntimeError(f"unit {unit.split}-{unit.index} failed on Ray: {exc}") from None
        results.append(r)
        tick(int(r.get("count", 0)))
        if r.get("fatal") and not fatal:
            fatal = r["fatal"]
            queue.clear()  # finish the units in flight, start no new ones
        if queue:
            submit(actor)
    log.info("densecap: Ray run of %d unit(s) took %.1fs", len(results), time.perf_counter() - t0)
    if lost or (queue and not fatal):
        raise RunAborted(
            f"{len(lost)} unit(s) could not be written after {max_retries} retries each "
            f"({'; '.join(lost)}){f' and {len(queue)} never started' if queue else ''}; "
            "finished shards are kept: rerun the same command to continue"
        )
    return fatal
