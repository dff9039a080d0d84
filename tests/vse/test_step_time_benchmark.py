"""benchmarks/vse_step_time.py runs end to end (tiny sizes) and prints consistent figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vse_step_time.py"
LINE = r"{clock}:\s+trainer step\s+([\d.]+) ms, plain forward \+ backward\s+([\d.]+) ms, ratio ([\d.]+)"


@pytest.mark.slow
def test_step_time_benchmark_runs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--images", "256", "--batch-size", "16", "--steps", "2", "--block", "1", "--warmup", "1"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    # both quickstart stages, with the quickstart's recipes and the asked batch size
    assert "stage1 (stage1, batch 16, 1 thread(s), 1 loader worker(s))" in text
    assert "d2s (stage2, batch 16, 1 thread(s), 1 loader worker(s))" in text
    for clock in ("wall", "cpu"):
        rows = re.findall(LINE.format(clock=clock), text)
        assert len(rows) == 2, text
        for trainer, plain, ratio in rows:
            trainer, plain, ratio = float(trainer), float(plain), float(ratio)
            assert trainer > 0 and plain > 0
            assert ratio == pytest.approx(trainer / plain, abs=0.01)  # the printed ratio is that of the printed times
    # stage 2's trainer step runs the frozen teacher on the dense text besides the model: never
    # cheaper than the model's own forward + backward on the sparse captions
    (_, _, d2s_cpu_ratio) = re.findall(LINE.format(clock="cpu"), text)[1]
    assert float(d2s_cpu_ratio) > 1.0
