"""benchmarks/vse_throughput.py runs end to end (tiny sizes) and prints consistent figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vse_throughput.py"


@pytest.mark.slow
@pytest.mark.parametrize("recipe, sharing", [("stage2", "file_system"), ("baseline", "file_descriptor")])
def test_throughput_benchmark_runs(tmp_path, recipe, sharing):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--recipe",
            recipe,
            "--sharing",
            sharing,
            "--images",
            "256",
            "--batch-size",
            "32",
            "--steps",
            "4",
            "--block",
            "2",
            "--warmup",
            "1",
            "--work",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert f"recipe {recipe}" in text and f"({sharing})" in text and "2 x 2 timed steps" in text
    mem = float(re.search(r"in-memory tensors :\s+([\d.]+) samples/s", text).group(1))
    shard = float(re.search(r"from shards\s+:\s+([\d.]+) samples/s", text).group(1))
    ratio = float(re.search(r"ratio shards/memory: ([\d.]+)", text).group(1))
    assert mem > 0 and shard > 0
    assert ratio == pytest.approx(shard / mem, abs=2e-3)  # the printed ratio is that of the printed rates
