"""The Ray executor (``densecap run --executor ray``; needs ``densecap[ray]``).

The process that runs ``densecap run`` is the *driver*: it holds the rank lock
(``densecap-rank<R>.lock``), plans the units exactly as the local executor does, resolves the
image format, shows one progress bar and, once every unit is complete, writes the manifest and
the report. The units themselves run in Ray actors (:class:`UnitWriter`), ``replicas`` of them,
each holding its own caption sources, started once (a vLLM engine for ``vllm-offline``, with
``num_gpus`` per replica; HTTP clients for ``vllm-server``, whose ``base_urls`` may list one
server per GPU or node).

Failures are Ray's to handle: an actor whose process or node dies is restarted by Ray
(``max_restarts``) and the unit it was writing is retried (``max_task_retries``), on the same or
another node. A unit is written under its own lock file (:func:`densecap.run.process_exclusively`),
so a retry, or a rerun after the driver itself was killed, waits for any earlier attempt that is
still writing it, then finds the shard complete (and skips it) or clears the leftovers and writes
it: every image once, no ``.tmp`` taken for a complete shard.

When the driver dies, Ray ends its actors (they belong to the driver's job); a local cluster
started by the driver (no ``address``: :class:`densecap.ray_cluster.RayCluster`) ends with it,
every process of it. Rerunning the same command resumes.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from d2s.config import ConfigError, to_dict

from .caption_sources import CaptionSourceError
from .config import DensecapConfig
from .images import Unit

log = logging.getLogger(__name__)


class UnitWriter:
    """One replica: a :class:`densecap.run.Worker` with its caption sources started, living in a
    Ray actor process; ``process`` writes one unit and returns its stats."""

    def __init__(self, cfg_dict: dict, out: str, image_exts: dict, fingerprint: str):
        from d2s.config import from_dict
        from d2s.log import setup_logging

        from .run import Worker

        setup_logging()
        self.fingerprint = fingerprint
        self.error = ""
        self.worker = Worker(from_dict(DensecapConfig, cfg_dict, "config"), Path(out), image_exts)
        self.worker.stats_extra = {"worker": f"{socket.gethostname()}:{os.getpid()}"}
        try:
            self.worker.start()
        except CaptionSourceError as exc:  # reported by ready(): the driver stops with exit status 2
            self.error = str(exc)

    def ready(self) -> dict[str, Any]:
        return {"error": self.error, "pid": os.getpid(), "host": socket.gethostname()}

    def process(self, unit: Unit) -> dict[str, Any]:
        from .run import process_exclusively

        stats = process_exclusively(self.worker, unit, self.fingerprint)
        stats["fatal"] = self.worker.fatal
        return stats


LOCAL_HEAD_ARGS = ("num_cpus", "num_gpus", "object_store_memory")


def _connect(address: str, init: dict[str, Any]):
    """Join the cluster at ``address``, or start a local one (:class:`densecap.ray_cluster.RayCluster`,
    which dies with this process); returns the local cluster to stop at the end, or None."""
    import importlib.util
    import sys

    if importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "executor.type: 'ray' needs Ray in this environment: pip install 'd2s-densecap[ray]' "
            "(or bash scripts/bootstrap.sh)"
        )
    local = None
    if not address and "ray" not in sys.modules:
        from .ray_cluster import RayCluster

        local = RayCluster(**{k: init[k] for k in LOCAL_HEAD_ARGS if k in init}).start()
        address = local.address
        # its token, before Ray is imported (Ray reads its authentication settings then)
        os.environ.update(local.client_env())
        log.info("densecap: started a local Ray cluster at %s in %.1fs", address, local.start_seconds)
    import ray

    if ray.is_initialized():
        return local
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if address:
        kwargs["address"] = address
    else:  # Ray already imported by the caller: let ray.init start its own local cluster
        kwargs["include_dashboard"] = False
    kwargs.update({k: v for k, v in init.items() if k not in LOCAL_HEAD_ARGS or not local})
    try:
        ray.init(**kwargs)
    except BaseException:
        if local is not None:
            local.stop(graceful=False)
        raise
    log.info("densecap: Ray cluster %s with %s", address or "started by ray.init", ray.cluster_resources())
    return local


def run_units(
    cfg: DensecapConfig,
    out: Path,
    todo: list[Unit],
    image_exts: dict,
    results: list[dict],
    tick: Callable[[int], None],
    info: dict[str, Any] | None = None,
) -> str:
    """Write ``todo`` on Ray; append each unit's stats to ``results`` as it completes and call
    ``tick(images)``; ``info`` receives ``replicas`` and ``ray_startup_s`` (joining or starting the
    cluster until every replica has its caption sources started). Returns the first caption
    source's fatal message ('' if none); raises CaptionSourceError when the replicas cannot start their caption sources and RunAborted
    (after the other units finished) when a unit could not be written after its retries."""
    ex = cfg.executor
    info = {} if info is None else info
    t_start = time.perf_counter()
    import sys

    caller_connected = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    local = _connect(ex.address, dict(ex.init))  # before importing Ray (see there)
    import ray

    actors: list[Any] = []
    try:
        _start_replicas(cfg, out, todo, image_exts, actors)
        info.update(replicas=len(actors), ray_startup_s=round(time.perf_counter() - t_start, 2))
        log.info(
            "densecap: %d Ray replica(s) ready after %.1fs, %d unit(s) to write",
            len(actors),
            info["ray_startup_s"],
            len(todo),
        )
        return _schedule(actors, todo, results, tick, ex.max_retries)
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        if ray.is_initialized() and not caller_connected:
            ray.shutdown()
        if local is not None:  # every unit is finished or given up: nothing to wait for
            local.stop(graceful=False)


def _start_replicas(cfg: DensecapConfig, out: Path, todo: list[Unit], image_exts: dict, actors: list[Any]) -> None:
    """Start the replicas (appended to ``actors`` at once, so the caller ends them whatever happens)
    and wait until each has its caption sources started."""
    import ray

    from .run import config_fingerprint

    ex = cfg.executor
    n = max(1, min(ex.replicas or cfg.num_workers, len(todo)))
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
    cfg_dict, fp = to_dict(cfg), config_fingerprint(cfg)
    actors.extend(Actor.remote(cfg_dict, str(out), image_exts, fp) for _ in range(n))
    for r in ray.get([a.ready.remote() for a in actors]):
        if r["error"]:
            raise CaptionSourceError(r["error"])


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
        from .run import RunAborted

        raise RunAborted(
            f"{len(lost)} unit(s) could not be written after {max_retries} retries each "
            f"({'; '.join(lost)}){f' and {len(queue)} never started' if queue else ''}; "
            "finished shards are kept: rerun the same command to continue"
        )
    return fatal
