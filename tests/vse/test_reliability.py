"""Issue 11, training side: nothing lost, nothing redone, nothing executed, when things go wrong.

- a planted pickle payload in the resumable state is refused, never executed;
- real SIGKILLs at every point of a state save: the rerun resumes from the newest complete state;
- a really corrupt image in a real shard is named (shard and key) in training, evaluation and
  bundles; training can skip it (counted in metrics.jsonl);
- the launcher's mixed precision applies unless the config sets one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2s.schema import DenseText, SampleError
from d2s.shards import ShardWriter, write_manifest
from d2s.synthetic import SplitSpec, WorldConfig, describe, iter_world
from tests.vse.forked_cli import run_cli
from vse_train.config import parse_config
from vse_train.failpoints import KILL_ENV, SAVE_POINTS
from vse_train.state import StateError, find_state
from vse_train.train import train


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def _cli(args, cwd, **env):
    """``python -m vse_train.cli train ARGS``: a real process (forked from one that has imported
    the trainer: tests/vse/forked_cli.py), its exit status, stdout and stderr."""
    return run_cli(["train", *args], cwd, _env(**env))


def _common(world, assets, steps=7):
    return [
        "--model",
        "tiny-vit",
        "--recipe",
        "baseline",
        "--shards",
        str(world),
        "--assets",
        str(assets),
        "--steps",
        str(steps),
        "--batch-size",
        "16",
        "threads=1",
        "val_every=0",
        "tracker=none",
        "save_every=3",
        "log_every=1",
        "data.num_workers=0",
        "data.shuffle_buffer=32",
        "optim.lr=0.001",
    ]


def _doc(world, assets, out, **kw):
    doc = {
        "shards": str(world),
        "out": str(out),
        "assets": str(assets),
        "model": "tiny-vit",
        "recipe": "baseline",
        "steps": 3,
        "threads": 1,
        "val_every": 0,
        "tracker": "none",
        "log_every": 1,
        "save_every": 100,
        "data": {"batch_size": 16, "num_workers": 0, "shuffle_buffer": 32},
        "optim": {"lr": 1e-3},
    }
    for k, v in kw.items():
        doc[k] = {**doc[k], **v} if isinstance(v, dict) and isinstance(doc.get(k), dict) else v
    return doc


def _same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "last" / "model.safetensors")), load_file(str(b / "last" / "model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


# ---- item 5: no pickle on resume -----------------------------------------------------------


class Payload:
    """Unpickling this creates the marker directory: what a tampered state file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _plant(path: Path, marker: Path, keep_size: bool) -> None:
    """Replace ``path`` with a pickle payload (``torch.save`` of it: what ``torch.load`` runs).
    With ``keep_size``, a raw pickle padded to the file's size where it is shorter (pickle
    ignores what follows), so that the size recorded in the marker still matches."""
    import pickle

    if keep_size:
        raw = pickle.dumps(Payload(marker))
        path.write_bytes(raw + b" " * max(0, path.stat().st_size - len(raw)))
    else:
        torch.save(Payload(marker), path)


@pytest.mark.slow
def test_resume_refuses_a_planted_pickle_in_the_state(world, assets, tmp_path):
    run = tmp_path / "run"
    killed = _cli(_common(world, assets) + ["--out", str(run)], tmp_path, **{KILL_ENV: "step@5"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    marker = tmp_path / "PAYLOAD_RAN"
    planted = []
    for p in sorted((run / "state").rglob("*")):
        # the files holding the LR scheduler and the counters: what Accelerate's save_state once kept
        # in custom_checkpoint_*.pkl, which its load_state reads with torch.load(weights_only=False)
        if p.is_file() and any(w in p.name for w in ("scheduler", "counters")):
            _plant(p, marker, keep_size=False)
            planted.append(p)
    assert planted
    resumed = _cli(_common(world, assets) + ["--out", str(run)], tmp_path)
    assert not marker.exists(), "resuming executed a pickle from the run folder"
    assert resumed.returncode != 0
    assert "refusing to resume" in resumed.stderr
    assert any(str(p) in resumed.stderr for p in planted), resumed.stderr[-3000:]
    assert not (run / "last").exists()


def test_every_state_file_refuses_a_pickle(world, assets, tmp_path):
    # a complete state of step 3, then each of its files in turn replaced by a payload of the same size
    src = tmp_path / "src"
    train(parse_config(_doc(world, assets, src, steps=3)))
    state = find_state(src / "state")
    assert state is not None and state.name == "step-00000003"
    files = [src / "state" / "latest.json"] + sorted(p for p in state.iterdir() if p.is_file())
    assert {p.name for p in files} >= {
        "latest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        "counters.json",
        "rng-0.safetensors",
        "rng-0.json",
        "complete.json",
    }
    marker = tmp_path / "PAYLOAD_RAN"
    # control: an untouched copy resumes and trains the one step left
    ok = tmp_path / "ok"
    shutil.copytree(src / "state", ok / "state")
    assert train(parse_config(_doc(world, assets, ok, steps=4)))["steps_this_run"] == 1
    for f in files:
        out = tmp_path / f"planted-{f.name}"
        shutil.copytree(src / "state", out / "state")
        target = out / f.relative_to(src)
        _plant(target, marker, keep_size=True)
        with pytest.raises(StateError) as e:
            train(parse_config(_doc(world, assets, out, steps=4)))
        assert str(target) in str(e.value), (f.name, str(e.value))
        assert not marker.exists(), f"a pickle planted in {f.name} ran"
        assert not (out / "last").exists()


# ---- item 6: SIGKILL at every point of a save --------------------------------------------


def _uninterrupted(world, assets, tmp: Path) -> Path:
    out = tmp / "run"
    r = _cli(_common(world, assets) + ["--out", str(out)], tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference_run(killed_runs) -> Path:
    """The uninterrupted run the killed ones must end equal to (made with them: ``killed_runs``)."""
    return killed_runs["reference"]


# points of the save of step 6 (a complete state of step 3 exists) and where the rerun must resume
EXPECTED_RESUME = {
    "begin": 3,
    "model": 3,
    "optimizer": 3,
    "scheduler": 3,
    "rng": 3,
    "files": 3,
    "marker": 3,  # step 6 complete, but the pointer still names step 3: its state is used
    "pointer": 6,
    "cleanup": 6,
    "end": 6,
}
FIRST_SAVE = "rng@3"  # a kill in the first save of all: no complete state is left


def _kill_then_rerun(world, assets, tmp: Path, kill_at: str) -> dict:
    """A real run SIGKILLed at ``kill_at``, what it left (looked at before the rerun), then the rerun."""
    run = tmp / "run"
    killed = _cli(_common(world, assets) + ["--out", str(run)], tmp, **{KILL_ENV: kill_at})
    state = find_state(run / "state")
    left = {"last": (run / "last").exists(), "state": state.name if state is not None else None}
    resumed = _cli(_common(world, assets) + ["--out", str(run)], tmp)
    return {"run": run, "killed": killed, "left": left, "resumed": resumed}


@pytest.fixture(scope="module")
def killed_runs(request, world, assets, tmp_path_factory) -> dict[str, dict]:
    """The kill-and-rerun of every selected kill point (``_kill_then_rerun``) and the uninterrupted
    run (``"reference"``), two at a time: each run is one process of one thread, so two of them keep
    both cores of a small machine busy. The tests below check each one exactly as if it had run
    inside the test."""
    from concurrent.futures import ThreadPoolExecutor

    selected = {it.name for it in request.session.items}
    wanted = [f"{point}@6" for point in SAVE_POINTS if f"{SAVE_TEST}[{point}]" in selected]
    if FIRST_SAVE_TEST in selected:
        wanted.append(FIRST_SAVE)
    with ThreadPoolExecutor(2) as pool:
        ref = pool.submit(_uninterrupted, world, assets, tmp_path_factory.mktemp("ref"))
        jobs = {at: pool.submit(_kill_then_rerun, world, assets, tmp_path_factory.mktemp("kill"), at) for at in wanted}
        return {"reference": ref.result(), **{at: job.result() for at, job in jobs.items()}}


SAVE_TEST = "test_sigkill_during_a_save_resumes_from_the_newest_complete_state"
FIRST_SAVE_TEST = "test_sigkill_during_the_first_save_starts_over_and_says_so"


@pytest.mark.slow
@pytest.mark.parametrize("point", SAVE_POINTS)
def test_sigkill_during_a_save_resumes_from_the_newest_complete_state(reference_run, killed_runs, point):
    assert set(EXPECTED_RESUME) == set(SAVE_POINTS)
    r = killed_runs[f"{point}@6"]
    run, killed, resumed = r["run"], r["killed"], r["resumed"]
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not r["left"]["last"]
    # the state the rerun will use is there, complete
    assert r["left"]["state"] == f"step-{EXPECTED_RESUME[point]:08d}"
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {EXPECTED_RESUME[point]} " in resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["steps_this_run"] == 7 - EXPECTED_RESUME[point]
    _same_weights(reference_run, run)
    # only the final state is left
    assert [p.name for p in (run / "state").iterdir() if p.is_dir()] == ["step-00000007"]


@pytest.mark.slow
def test_sigkill_during_the_first_save_starts_over_and_says_so(reference_run, killed_runs):
    r = killed_runs[FIRST_SAVE]
    killed, resumed = r["killed"], r["resumed"]
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert r["left"]["state"] is None  # no save ever completed: step 0 is right
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "did not complete" in resumed.stderr and "resumed from" not in resumed.stderr
    _same_weights(reference_run, r["run"])


@pytest.mark.slow
def test_a_finished_run_started_again_keeps_its_state_through_a_kill(world, assets, tmp_path):
    # the rerun of a finished run resumes at its last step and saves that step again: a kill in
    # that save must not cost the state being replaced
    run = tmp_path / "run"
    train(parse_config(_doc(world, assets, run, steps=3)))
    before = find_state(run / "state")
    killed = _cli(_common(world, assets, steps=3) + ["--out", str(run)], tmp_path, **{KILL_ENV: "model@3"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "resumed from" in killed.stderr
    assert find_state(run / "state") == before
    again = _cli(_common(world, assets, steps=3) + ["--out", str(run)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.name for p in (run / "state").iterdir() if p.is_dir()] == ["step-00000003.1"]
    assert find_state(run / "state").name == "step-00000003.1"


def test_a_damaged_state_fails_naming_the_file(world, assets, tmp_path):
    run = tmp_path / "run"
    train(parse_config(_doc(world, assets, run, steps=3)))
    state = find_state(run / "state")
    (state / "optimizer.safetensors").unlink()
    with pytest.raises(StateError, match="optimizer.safetensors"):
        train(parse_config(_doc(world, assets, run, steps=4)))
    shutil.rmtree(state)  # the pointer names a state that is gone: never a silent restart at 0
    with pytest.raises(StateError, match="latest.json"):
        train(parse_config(_doc(world, assets, run, steps=4)))


# ---- item 7: corrupt images in real shards ---------------------------------------------------


def _write_corrupt_world(out: Path, bad_train: dict[int, str], bad_val: dict[int, str]) -> dict[str, tuple[str, str]]:
    """train 96 images (3 shards of 32), val 32 (1 shard); image i of a split damaged as asked:
    "truncated" (the PNG cut in half) or "garbage" (bytes that are no image). Returns
    {kind-split: (shard file name, key)} of the damaged samples."""
    cfg = WorldConfig(world_seed=0)
    bad = {}
    for spec, damage in ((SplitSpec("train", 96, 0), bad_train), (SplitSpec("val", 32, 0), bad_val)):
        samples = list(iter_world(cfg, spec))
        for index, start in enumerate(range(0, len(samples), 32)):
            with ShardWriter(out, spec.name, index) as w:
                for i, s in enumerate(samples[start : start + 32], start):
                    s.dense = [DenseText(describe(json.loads(s.meta["scene"])), source="synthetic-oracle")]
                    if i in damage:
                        s.image = (
                            s.image[: len(s.image) // 2] if damage[i] == "truncated" else b"\x00garbage, no image" * 8
                        )
                        bad[f"{damage[i]}-{spec.name}"] = (w.path.name, s.key)
                    w.write(s)
    write_manifest(out)
    return bad


@pytest.fixture(scope="module")
def corrupt_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("corrupt")
    bad = _write_corrupt_world(out, {5: "truncated", 40: "garbage"}, {3: "truncated"})
    return out, bad


@pytest.mark.parametrize("workers", [0, 1])
def test_training_names_shard_and_key_of_a_corrupt_image(corrupt_world, assets, tmp_path, workers):
    world, bad = corrupt_world
    with pytest.raises(SampleError) as e:
        train(parse_config(_doc(world, assets, tmp_path / "run", steps=8, data={"num_workers": workers})))
    msg = str(e.value)
    assert "cannot decode" in msg
    assert any(shard in msg and repr(key) in msg for k, (shard, key) in bad.items() if k.endswith("train")), msg


@pytest.mark.slow
def test_skip_policy_drops_counts_and_logs_bad_samples(corrupt_world, assets, tmp_path, caplog):
    world, bad = corrupt_world
    run = tmp_path / "run"
    with caplog.at_level("WARNING"):
        s = train(parse_config(_doc(world, assets, run, steps=8, data={"on_bad_sample": "skip"})))
    # 8 batches of 16 = 128 draws from 96 images: each bad one is met at least once
    assert s["steps"] == 8 and s["skipped_samples"] >= 2
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    counts = [r["data/skipped_samples"] for r in rows if "data/skipped_samples" in r]
    assert len(counts) == 8 and counts == sorted(counts) and counts[-1] == s["skipped_samples"]
    logged = " ".join(r.getMessage() for r in caplog.records if "dropping a training sample" in r.getMessage())
    for k in ("truncated-train", "garbage-train"):
        shard, key = bad[k]
        assert shard in logged and repr(key) in logged, (k, logged)
    # the skip counts survive a resume (the state carries them) and the run goes on
    s2 = train(parse_config(_doc(world, assets, run, steps=10, data={"on_bad_sample": "skip"})))
    assert s2["steps_this_run"] == 2 and s2["skipped_samples"] >= s["skipped_samples"]


@pytest.mark.slow
def test_two_processes_skip_bad_samples_with_batches_of_different_sizes(corrupt_world, assets, tmp_path):
    # 2 gloo processes split the 3 shards (2 + 1); the bad images are in different shards, so the
    # processes' batches differ in size at different steps and the gather pads and trims them
    world, bad = corrupt_world
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "vse_train.cli",
        "train",
        *_common(world, assets, steps=6),
        "--out",
        str(out),
        "cpu=true",
        "data.on_bad_sample=skip",
    ]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    # 6 steps x 16 per process = 96 draws per process; each reads half the images or more, and the
    # counts are summed over both processes
    assert summary["steps"] == 6 and summary["skipped_samples"] >= 2
    for k in ("truncated-train", "garbage-train"):
        shard, key = bad[k]
        assert shard in r.stderr and repr(key) in r.stderr, k


def test_evaluation_names_shard_and_key_of_a_corrupt_image(corrupt_world, assets, tmp_path):
    world, bad = corrupt_world
    shard, key = bad["truncated-val"]
    with pytest.raises(SampleError) as e:  # the policy is for training samples; evaluation always says
        train(
            parse_config(
                _doc(
                    world,
                    assets,
                    tmp_path / "run",
                    steps=1,
                    val_every=None,
                    data={"on_bad_sample": "skip", "val_max_images": 32},
                )
            )
        )
    assert shard in str(e.value) and repr(key) in str(e.value) and "cannot decode" in str(e.value)


def test_bundle_names_the_key_of_a_corrupt_image(world, assets, tmp_path):
    from d2s.shards import read_samples
    from vse.bundle import load_bundle

    s = train(parse_config(_doc(world, assets, tmp_path / "run", steps=1)))
    b = load_bundle(s["bundle"])
    good = [x.image for x in read_samples(world, "val")[:3]]
    bad = good[1][: len(good[1]) // 2]
    with pytest.raises(SampleError, match=r"key 'img-b'.*cannot decode"):
        b.embed_images([good[0], bad, good[2]], batch_size=2, keys=["img-a", "img-b", "img-c"])
    with pytest.raises(SampleError, match=r"key '#2'.*cannot decode"):
        b.embed_images([good[0], good[2], b"no image at all"], batch_size=2)
    assert b.embed_images(good, keys=["a", "b", "c"]).shape[0] == 3


# ---- item 10: the launcher's mixed precision -------------------------------------------------


def _launch(world, assets, out, flags, overrides, cwd):
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate),
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        *flags,
        "-m",
        "vse_train.cli",
        "train",
        *_common(world, assets, steps=2),
        "--out",
        str(out),
        *overrides,
    ]
    # an empty HF_HOME: no accelerate default config of this machine gets in the way
    return subprocess.run(cmd, cwd=cwd, env=_env(HF_HOME=str(cwd / "hf")), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_launcher_mixed_precision_applies_unless_the_config_sets_one(world, assets, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    # `accelerate config` writes a file; a config file saying bf16 but the training config saying "no": "no"
    cfg = tmp_path / "accel.yaml"
    cfg.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\nnum_processes: 1\n"
        "num_machines: 1\nuse_cpu: false\n"
    )
    launches = {
        "bf16": (["--mixed_precision", "bf16"], []),
        # quoted: YAML reads a bare no as false
        "no": (["--config_file", str(cfg)], ["mixed_precision='no'"]),
        # and the config file alone applies
        "file": (["--config_file", str(cfg)], []),
    }
    # three independent launches (each a launcher and one training process): at the same time
    with ThreadPoolExecutor(len(launches)) as pool:
        jobs = {
            name: pool.submit(_launch, world, assets, tmp_path / name, flags, overrides, tmp_path)
            for name, (flags, overrides) in launches.items()
        }
        r = {name: job.result() for name, job in jobs.items()}
    assert r["bf16"].returncode == 0, r["bf16"].stderr[-3000:]
    assert json.loads((tmp_path / "bf16" / "run_config.json").read_text())["mixed_precision"] == "bf16"
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["mixed_precision"] == "bf16"
    assert r["no"].returncode == 0, r["no"].stderr[-3000:]
    assert json.loads((tmp_path / "no" / "summary.json").read_text())["mixed_precision"] == "no"
    assert r["file"].returncode == 0, r["file"].stderr[-3000:]
    assert json.loads((tmp_path / "file" / "summary.json").read_text())["mixed_precision"] == "bf16"
