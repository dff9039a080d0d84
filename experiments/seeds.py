"""Running a pipeline once per seed for the experiments, and reading its finished stages."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_seed(
    seed: int,
    runs: Path,
    pipeline: Path,
    overrides: Sequence[str] = (),
    shared_from: Path | None = None,
    shared: Sequence[str] = (),
) -> int:
    """``d2s run PIPELINE vars.seed=SEED`` in ``<runs>/seed-<SEED>`` (log ``<runs>/seed-<SEED>.log``);
    the ``shared`` stages are linked from the run dir ``shared_from``, where they already ran with
    the same params, so the runner finds them cached. Returns the exit status."""
    run_dir = runs / f"seed-{seed}"
    if shared_from is not None and run_dir != shared_from:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stage in shared:
            link = run_dir / stage
            if not link.exists():
                link.symlink_to(Path("..") / shared_from.name / stage)
    cmd = [sys.executable, "-m", "d2s.cli", "run", str(pipeline), f"vars.seed={seed}", *overrides]
    with open(runs / f"seed-{seed}.log", "w") as f:
        return subprocess.call([*cmd, "--run-dir", str(run_dir)], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def stage_outputs(run_dir: Path, stage: str) -> dict:
    """The outputs of a finished stage of a run dir (its ``stage.json`` marker); exits naming the
    marker when the stage has not finished."""
    marker = json.loads((run_dir / stage / "stage.json").read_text())
    if marker.get("state") != "done":
        raise SystemExit(f"{run_dir / stage / 'stage.json'}: stage {stage!r} has not finished ({marker.get('state')})")
    return marker["outputs"]
