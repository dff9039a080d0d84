"""``d2s run --jobs N``: independent stages at once, each in its own process (d2s.stage_pool)."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from d2s.pipeline import Runner, load_pipeline
from d2s.processes import alive
from d2s.stage_pool import StageProcessDied
from tests.densecap.test_reliability import wait_until

ROOT = Path(__file__).resolve().parents[2]
MEET = "tests.core.toy_stages:Meet"


def meet_doc(**params) -> dict:
    """a and b each wait for the other; c reads both, so it runs after them."""
    return {
        "name": "meet",
        "stages": {
            "a": {"type": MEET, "params": {"partner": "b", **params}},
            "b": {"type": MEET, "params": {"partner": "a", **params}},
            "c": {
                "type": "tests.core.toy_stages:Upper",
                "inputs": {"src": "${a.out}", "extra": "${b.out}"},
            },
        },
    }


def marker(run_dir: Path, stage: str) -> dict | None:
    p = run_dir / stage / "stage.json"
    return json.loads(p.read_text()) if p.exists() else None


def test_independent_stages_run_at_once_in_processes_of_their_own(tmp_path):
    p = load_pipeline(doc=meet_doc(timeout=60), run_dir=tmp_path / "run")
    report = Runner(p).run(jobs=2)
    rd = p.run_dir
    pids = {s: int((rd / s / "out").read_text()) for s in ("a", "b")}
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    # c ran after both (it read what they wrote), in the runner's bookkeeping like any stage
    assert (rd / "c" / "out").read_text() == f"{pids['a']}{pids['b']}"
    assert [r["action"] for r in report] == ["run", "run", "run"]
    assert all(marker(rd, s)["state"] == "done" for s in "abc")
    # the stage's own processes would start as in the runner's process (not "spawn", the slot's way)
    assert marker(rd, "a")["summary"] == {"pid": pids["a"], "start_method": multiprocessing.get_start_method()}
    # a second run finds every stage cached
    assert [r["action"] for r in Runner(load_pipeline(doc=meet_doc(timeout=60), run_dir=rd)).run(jobs=2)] == [
        "skip"
    ] * 3


def test_one_at_a_time_the_same_stages_never_meet(tmp_path):
    p = load_pipeline(doc=meet_doc(timeout=1), run_dir=tmp_path / "run")
    with pytest.raises(TimeoutError, match="a: .* did not appear"):
        Runner(p).run(jobs=1)


def test_after_a_failure_running_stages_finish_and_nothing_new_starts(tmp_path):
    doc = {
        "name": "fail",
        "stages": {
            # a outlives b's failure by far; c (after a) and d (free) could start later
            "a": {"type": MEET, "params": {"partner": "b", "linger": 2.0}},
            "b": {"type": MEET, "params": {"fail": True}},
            "c": {"type": MEET, "inputs": {"src": "${a.out}"}},
            "d": {"type": MEET},
        },
    }
    rd = tmp_path / "run"
    with pytest.raises(RuntimeError, match="b asked to fail"):
        Runner(load_pipeline(doc=doc, run_dir=rd)).run(jobs=2)
    assert marker(rd, "a")["state"] == "done"
    assert marker(rd, "b")["state"] == "running"  # as after a failure in a sequential run
    assert marker(rd, "c") is None and marker(rd, "d") is None
    assert sorted(p.name for p in (rd / "arrived").iterdir()) == ["a", "b"]
    # fixed, the rerun keeps a and runs the rest
    doc["stages"]["b"]["params"]["fail"] = False
    report = Runner(load_pipeline(doc=doc, run_dir=rd)).run(jobs=2)
    assert {r["stage"]: r["action"] for r in report} == {"a": "skip", "b": "run", "c": "run", "d": "run"}


def test_a_stage_whose_process_is_killed_fails_naming_the_stage(tmp_path):
    doc = {
        "name": "die",
        "stages": {
            "a": {"type": MEET, "params": {"partner": "b", "linger": 1.0}},
            "b": {"type": MEET, "params": {"die": True}},
        },
    }
    rd = tmp_path / "run"
    with pytest.raises(StageProcessDied, match="stage 'b': its process ended without finishing"):
        Runner(load_pipeline(doc=doc, run_dir=rd)).run(jobs=2)
    assert marker(rd, "a")["state"] == "done" and marker(rd, "b")["state"] == "running"


def test_a_bad_jobs_value_is_refused(tmp_path):
    p = load_pipeline(doc=meet_doc(), run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="--jobs must be >= 1"):
        Runner(p).run(jobs=0)


@pytest.mark.slow
def test_sigterm_ends_the_stage_processes_and_a_rerun_resumes(tmp_path):
    doc = meet_doc(release="release", timeout=120)
    path = tmp_path / "meet.yaml"
    path.write_text(yaml.safe_dump(doc))
    rd = tmp_path / "run"
    cmd = [sys.executable, "-m", "d2s.cli", "run", str(path), "--run-dir", str(rd), "--jobs", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: all((rd / "arrived" / s).exists() for s in "ab"), "both stages to start", 120)
        pids = [int((rd / "arrived" / s).read_text()) for s in "ab"]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "interrupted by SIGTERM" in out and "ended stage(s) a, b" in out
    wait_until(lambda: not any(alive(p) for p in pids), "the stage processes to end", 10)
    assert marker(rd, "a")["state"] == marker(rd, "b")["state"] == "running"
    # the stage processes logged into the run's log file, each line tagged with its stage
    logs = "".join(f.read_text() for f in (rd / "logs").glob("*.log"))
    assert f"[a] d2s.stage.a: arrived in process {pids[0]}" in logs
    assert f"[b] d2s.stage.b: arrived in process {pids[1]}" in logs
    # released, the same command resumes the interrupted stages and finishes
    (rd / "release").write_text("")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(marker(rd, s)["state"] == "done" for s in "abc")
