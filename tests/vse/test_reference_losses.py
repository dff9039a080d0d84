"""The trainer computes what it computed before its speed-ups: per-step losses of short fixed-seed
runs (stage 1 as registered and as the quickstart trains it, stage 2 from that stage 1) against
the fixture tests/vse/data/reference_losses.json, recorded with the code before them (the file
names the commit and the command: tests/vse/record_reference_losses.py).

Every loss term, the lr and the final validation metrics of every step must agree within
1e-6 relative (float32 carries ~7 digits; the speed-ups may reorder float sums, e.g. one
batched GRU call where there were several, which changes the last bits of a value, never
more), and the final weights must be byte-identical where they were not reordered at all.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.vse.record_reference_losses import STEPS, run_all

FIXTURE = Path(__file__).parent / "data" / "reference_losses.json"
REL = 1e-6


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=REL)


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def rerun(tmp_path_factory) -> dict:
    return run_all(tmp_path_factory.mktemp("reference-losses"))


def test_the_fixture_names_its_origin(reference):
    assert len(reference["commit"]) == 40 and reference["packages_dirty"] is False
    assert reference["command"].startswith(".venv/bin/python -m tests.vse.record_reference_losses")
    assert reference["steps"] == STEPS
    assert set(reference["runs"]) == {"stage1", "stage1_quickstart", "stage2"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stage1", "stage1_quickstart", "stage2"])
def test_losses_equal_the_code_before_the_speed_ups(reference, rerun, name):
    ref, new = reference["runs"][name], rerun[name]
    assert [s["step"] for s in new["steps"]] == list(range(1, STEPS + 1))
    for want, got in zip(ref["steps"], new["steps"]):
        assert set(got) == set(want), (name, want["step"])
        bad = {k: (want[k], got[k]) for k in want if not close(want[k], got[k])}
        assert not bad, f"{name} step {want['step']}: (before, now) {bad}"
    bad = {k: (v, new["val"].get(k)) for k, v in ref["val"].items() if not close(v, new["val"].get(k, math.nan))}
    assert not bad, f"{name} final validation: (before, now) {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stage1", "stage1_quickstart", "stage2"])
def test_final_weights_are_byte_identical(reference, rerun, name):
    assert rerun[name]["last_weights_sha256"] == reference["runs"][name]["last_weights_sha256"]
