"""The executor protocol (see the package docstring): :class:`WorkerSpec`, :class:`UnitWorker`,
the :data:`EXECUTORS` registry and :class:`ExecutorConfig`. Imports nothing of densecap's job."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from d2s.config import ConfigError
from d2s.registry import Registry

#: executor.type -> ``run_units`` (entry-point group ``densecap.executors``)
EXECUTORS: Registry[Callable[..., str]] = Registry("executor", "densecap.executors", name_attr=None)


@dataclass
class ExecutorConfig:
    """Who runs the units (:data:`EXECUTORS`). ``local``: this process alone (``inline``) or with
    ``num_workers`` processes it starts (``pool``). ``ray``: a Ray cluster (``densecap[ray]``);
    each replica is a Ray actor holding the caption sources, a unit whose worker or node dies is
    retried by Ray, and this process (the driver) plans, shows progress and writes the manifest
    and report."""

    type: str = "local"
    # ray: '' = start a local Ray cluster that ends with this process; 'auto' = the cluster this
    # machine belongs to ($RAY_ADDRESS, else the one `ray start` last recorded); 'HOST:PORT' (a head
    # node's GCS) or 'ray://HOST[:PORT]' (Ray Client). Checked before Ray is started or joined.
    address: str = ""
    connect_timeout: float = 5.0  # ray: seconds the address has to accept a TCP connection
    # ray: check the caption sources that talk to a server (vllm-server's /v1/models) from this
    # process before the cluster is joined; false when only the cluster's nodes can reach them
    check_on_driver: bool = True
    replicas: int = 0  # ray: worker actors (0 = num_workers)
    num_cpus: float = 1.0  # ray: CPUs each replica reserves
    num_gpus: float = 0.0  # ray: GPUs each replica reserves (vllm-offline: 1 = one engine per GPU)
    max_retries: int = 3  # ray: times a unit is retried after its worker process or node died
    # ray: num_cpus / num_gpus / object_store_memory size the local cluster (no address); anything
    # else goes to ray.init() (e.g. runtime_env, namespace)
    init: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in EXECUTORS and ":" not in self.type:
            raise ConfigError(f"executor.type: unknown executor {self.type!r}; registered: {EXECUTORS.names()}")
        if self.replicas < 0:
            raise ValueError("replicas must be >= 0")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")
        if self.connect_timeout <= 0:
            raise ValueError("connect_timeout must be > 0")


@dataclass(frozen=True)
class WorkerSpec:
    """A unit job, as plain picklable data: what each worker process or actor builds its worker from."""

    factory: str  # "module:attr": factory(config, out) -> UnitWorker
    config: dict[str, Any]  # plain data for the factory
    out: str  # the output shard directory
    fingerprint: str  # the config_hash of a shard that counts as done
    check: str = ""  # "module:attr": check(config, out), run in the driver before a cluster is joined
    retry_key: str = "caption_errors"  # stats key: true = redo this complete shard from its own samples
    # stats keys whose values must be these (a missing key reads ""), else the complete shard is
    # redone from its own samples: densecap's grounding_hash (a new threshold keeps the captions)
    expect: dict[str, Any] = field(default_factory=dict)


class UnitWorker(Protocol):
    """What a :class:`WorkerSpec`'s factory returns."""

    stats_extra: dict[str, Any]

    @property
    def fatal(self) -> str: ...

    def start(self) -> None: ...

    def process(self, unit: Any, progress: Callable[[int], None] | None = None) -> dict[str, Any]: ...

    def close(self) -> None: ...


def _load(target: str, what: str) -> Callable[..., Any]:
    mod, _, attr = target.partition(":")
    if not mod or not attr:
        raise ConfigError(f"{what}: expected 'package.module:attr', got {target!r}")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{what}: cannot load {target!r}: {exc}") from None


def build_worker(spec: WorkerSpec) -> UnitWorker:
    """The spec's worker, built in the calling process (not started)."""
    return _load(spec.factory, "WorkerSpec.factory")(spec.config, Path(spec.out))


def run_check(spec: WorkerSpec) -> None:
    """The spec's driver-side check, if it has one."""
    if spec.check:
        _load(spec.check, "WorkerSpec.check")(spec.config, Path(spec.out))
