"""Executors: who runs the units of a job, chosen by ``executor.type`` (:data:`EXECUTORS`).

``local`` (the default) runs them in this process (``inline``) or, with ``num_workers`` > 1 and
more than one unit, in worker processes that die with it (``pool``); ``ray`` runs them in Ray
actors on a local or remote cluster. More plug in through the ``densecap.executors``
entry-point group. Executors depend on :mod:`densecap.worker` and :mod:`densecap.locks`, never
the reverse, and know nothing of captions: they run any *unit job*.

The protocol (every name below is in :mod:`densecap.executors.base`):

- A job is described by a picklable :class:`WorkerSpec`: ``factory`` (``"module:attr"``),
  ``config`` (plain data), ``out`` (the output directory), ``fingerprint`` (the ``config_hash`` a
  complete shard must carry to count as done), ``check`` (optional ``"module:attr"``) and
  ``retry_key`` (the stats key whose true value means "redo this complete shard from itself").
- Each worker process or actor builds its own worker with :func:`build_worker`
  (``factory(config: dict, out: Path) -> UnitWorker``); a :class:`UnitWorker` has ``start()``,
  ``process(unit, progress=None) -> stats dict`` (writes the unit's one output shard), a
  ``fatal`` message (non-empty: stop after the units in flight), ``stats_extra`` (merged into
  every shard's stats) and ``close()``.
- An executor that starts or joins a cluster first calls ``check(config, out)`` in the driver
  (:func:`run_check`), so that what needs no cluster (a server's address) fails in seconds.
- Every executor module exposes::

      run_units(spec: WorkerSpec, todo: list[Unit], executor: ExecutorConfig, num_workers: int,
                results: list[dict], tick: Callable[[int], None], info: dict[str, Any]) -> str

  It writes every unit of ``todo``, appends each unit's stats (with ``"fatal"``) to ``results``
  as it completes, calls ``tick(images)`` for progress, puts executor facts in ``info`` (Ray:
  ``replicas``, ``ray_startup_s``) and returns the first fatal message ('' if none).
- Which units remain is :func:`densecap.worker.plan_units` (units, out dir, fingerprint), by the
  one rule :func:`densecap.worker.shard_state`.

densecap's captioning job is ``WorkerSpec("densecap.worker:make_worker", {"config": ...,
"image_exts": ...}, out, fingerprint, check="densecap.worker:check_servers")``.
"""

from .base import EXECUTORS, ExecutorConfig, UnitWorker, WorkerSpec, build_worker, run_check

__all__ = ["EXECUTORS", "ExecutorConfig", "UnitWorker", "WorkerSpec", "build_worker", "run_check"]
