"""The one failpoint of the trainer, for tests of interruption: an environment variable.

``VSE_TEST_KILL_AT=<point>[@<step>]`` SIGKILLs the training process when it reaches
``point`` (at optimizer step ``step``; without ``@<step>``, the first time it reaches the
point). Unset (always, outside tests), nothing happens. Points, in the order they come:

- ``step``: after an optimizer step and what follows it (the loss record, a validation,
  a resumable state when one is due), in :func:`vse_train.train.after_step`;
- the points of a state save, in :func:`vse_train.state.save_state` (:data:`SAVE_POINTS`):
  ``begin`` (the new ``step-N/`` made), ``model``, ``optimizer``, ``scheduler`` (the main
  process's files written one by one), ``rng`` (this process's RNG files), ``files`` (all
  files synced), ``marker`` (``complete.json`` written), ``pointer`` (``latest.json`` moved),
  ``cleanup`` (after each older state is removed), ``end``.

Every process of a run reads the variable; the main process alone reaches the main-process
points. The tests (``tests/vse/test_reliability.py``, ``tests/vse/test_train.py``) kill real
runs this way and check that the rerun resumes from the right state.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

KILL_ENV = "VSE_TEST_KILL_AT"
SAVE_POINTS = ("begin", "model", "optimizer", "scheduler", "rng", "files", "marker", "pointer", "cleanup", "end")
POINTS = ("step", *SAVE_POINTS)


def kill_point(point: str, step: int) -> None:
    """SIGKILL this process if ``VSE_TEST_KILL_AT`` names ``point`` (and ``step``)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name == point and (not at or int(at) == step):
        log.warning("%s=%s: killing this process at point %r of step %d (test)", KILL_ENV, spec, point, step)
        os.kill(os.getpid(), signal.SIGKILL)
