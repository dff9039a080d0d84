"""benchmarks/vse_throughput.py runs end to end (tiny sizes) and prints consistent figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vse_throughput.py"
CASES = [("stage2", "file_system"), ("baseline", "file_descriptor")]


def _start(recipe: str, sharing: str, work: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
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
            str(work),
        ],
        stdout=open(work / "stdout.txt", "w"),  # files, not pipes: neither run waits for its reader
        stderr=open(work / "stderr.txt", "w"),
        env=env,
    )


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[tuple[str, str], tuple[int, str, str]]:
    """(returncode, stdout, stderr) of the benchmark for each selected case; the cases run at the same
    time (each is one thread: OMP_NUM_THREADS=1), so two of them keep 2 cores busy."""
    selected = {it.name for it in request.session.items}
    work = {
        case: tmp_path_factory.mktemp("throughput")
        for case in CASES
        if f"test_throughput_benchmark_runs[{case[0]}-{case[1]}]" in selected
    }
    procs = {case: _start(*case, w) for case, w in work.items()}
    out = {}
    try:
        for case, proc in procs.items():
            proc.wait(timeout=600)
            out[case] = (proc.returncode, *((work[case] / f).read_text() for f in ("stdout.txt", "stderr.txt")))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe, sharing", CASES)
def test_throughput_benchmark_runs(runs, recipe, sharing):
    returncode, text, stderr = runs[(recipe, sharing)]
    assert returncode == 0, stderr[-3000:]
    assert f"recipe {recipe}" in text and f"({sharing})" in text and "2 x 2 timed steps" in text
    mem = float(re.search(r"in-memory tensors :\s+([\d.]+) samples/s", text).group(1))
    shard = float(re.search(r"from shards\s+:\s+([\d.]+) samples/s", text).group(1))
    ratio = float(re.search(r"ratio shards/memory: ([\d.]+)", text).group(1))
    assert mem > 0 and shard > 0
    assert ratio == pytest.approx(shard / mem, abs=2e-3)  # the printed ratio is that of the printed rates
