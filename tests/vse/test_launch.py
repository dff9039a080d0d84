"""vse-train with ``params.launch``: the stage starts real ``accelerate launch`` processes
(2 gloo processes on CPU) and collects their checkpoint and bundle."""

from __future__ import annotations

import json
import sys

import pytest

from d2s.config import ConfigError
from d2s.pipeline import Runner, load_pipeline
from vse.bundle import load_bundle
from vse_train.stages import LaunchConfig


def pipeline_doc(**launch) -> dict:
    doc = {
        "name": "launch",
        "stages": {
            "world": {
                "type": "synthetic-world",
                "params": {"train": 128, "val": 32, "test": 0, "seed": 0, "shard_size": 64},
            },
            "train": {
                "type": "vse-train",
                "inputs": {"shards": "${world.shards}"},
                "params": {
                    "recipe": "baseline",
                    "model": "tiny-vit",
                    "steps": 3,
                    "threads": 1,
                    "tracker": "none",
                    "val_every": 0,
                    "log_every": 1,
                    "data": {"batch_size": 16, "num_workers": 0, "shuffle_buffer": 32},
                    "launch": launch,
                },
            },
        },
    }
    if not launch:
        del doc["stages"]["train"]["params"]["launch"]
    return doc


@pytest.mark.slow
def test_two_process_cpu_launch_through_the_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.chdir(tmp_path)
    p = load_pipeline(doc=pipeline_doc(num_processes=2, cpu=True), run_dir=tmp_path / "run")
    report = Runner(p).run()
    train = p.stage("train")
    assert report[-1]["stage"] == "train" and report[-1]["summary"]["steps"] == 3
    run = train.outputs["run"]
    run_config = json.loads((run / "run_config.json").read_text())
    assert run_config["num_processes"] == 2
    assert run_config["train"]["cpu"] is True
    # the config the children read is the one the stage wrote
    written = json.loads((train.work_dir / "train_config.json").read_text())
    assert written["out"] == str(run) and written["steps"] == 3 and "launch" not in written
    # both processes saved their RNG state
    latest = run / "state" / json.loads((run / "state" / "latest.json").read_text())["dir"]
    assert (latest / "rng-0.safetensors").exists() and (latest / "rng-1.safetensors").exists()
    bundle = load_bundle(train.outputs["bundle"])
    emb = bundle.embed_texts(["a red ball", "two blue cubes"])
    assert emb.shape[0] == 2
    assert (train.outputs["checkpoint"] / "model.safetensors").exists()
    # cached on a second run
    assert (
        Runner(load_pipeline(doc=pipeline_doc(num_processes=2, cpu=True), run_dir=tmp_path / "run")).run()[-1]["action"]
        == "skip"
    )


def test_without_launch_the_stage_trains_in_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = load_pipeline(doc=pipeline_doc(), run_dir=tmp_path / "run")
    assert p.stage("train").params.launch is None
    report = Runner(p).run()
    train = p.stage("train")
    assert report[-1]["summary"]["steps"] == 3
    assert json.loads((train.outputs["run"] / "run_config.json").read_text())["num_processes"] == 1
    assert not (train.work_dir / "train_config.json").exists()
    load_bundle(train.outputs["bundle"])


def test_launch_command_flags(tmp_path):
    cpu = LaunchConfig(num_processes=2, cpu=True)
    cmd = cpu.command(tmp_path / "c.json", "no")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cmd and "--cpu" not in cmd  # accelerate's --cpu launcher starts one process
    assert cmd[-5:] == ["-m", "vse_train.cli", "train", "--config", str(tmp_path / "c.json")]
    multi = LaunchConfig(
        num_processes=16,
        num_machines=2,
        machine_rank=1,
        main_process_ip="10.0.0.1",
        main_process_port=29500,
        extra_args=["--rdzv_backend", "static"],
    )
    cmd = multi.command(tmp_path / "c.json", "fp16")
    for flag, value in (
        ("--num_processes", "16"),
        ("--num_machines", "2"),
        ("--machine_rank", "1"),
        ("--main_process_ip", "10.0.0.1"),
        ("--main_process_port", "29500"),
        ("--mixed_precision", "fp16"),
        ("--rdzv_backend", "static"),
    ):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--multi_gpu" in cmd


@pytest.mark.parametrize(
    "launch, field",
    [
        ({"num_processes": 0}, "num_processes"),
        ({"num_machines": 1}, "launch.num_processes"),
        ({"num_processes": 2, "num_machines": 2}, "main_process_ip"),
        ({"num_processes": 2, "num_machines": 2, "machine_rank": 2, "main_process_ip": "h"}, "machine_rank"),
        ({"num_processes": 2, "mixed_precision": "fp8"}, "launch.mixed_precision"),
        ({"num_processes": 2, "gpus": 2}, "gpus"),
        ({"num_processes": 2, "extra_args": ["-m", "x"]}, "extra_args"),
    ],
)
def test_bad_launch_params_name_the_field(tmp_path, launch, field):
    with pytest.raises(ConfigError) as err:
        load_pipeline(doc=pipeline_doc(**launch), run_dir=tmp_path / "run")
    assert "stage 'train'" in str(err.value) and field in str(err.value), str(err.value)


def test_failed_launch_raises_with_its_output(tmp_path, monkeypatch):
    import logging

    from d2s.pipeline import StageContext
    from vse_train.config import parse_config
    from vse_train.stages import launch_train

    monkeypatch.chdir(tmp_path)
    cfg = parse_config({"shards": str(tmp_path), "out": str(tmp_path / "run"), "steps": 1, "assets": str(tmp_path)})
    ctx = StageContext("train", tmp_path, tmp_path / "work", None, {}, {}, logging.getLogger("test"))
    launch = LaunchConfig(num_processes=2, cpu=True, extra_args=["--no_such_flag"])
    with pytest.raises(RuntimeError) as err:
        launch_train(ctx, launch, cfg)
    msg = str(err.value)
    assert "stage 'train': accelerate launch exited with status" in msg and "--no_such_flag" in msg, msg
    assert "--no_such_flag" in (tmp_path / "work" / "launch.log").read_text()


def test_cache_key_has_every_param_but_resume(tmp_path):
    """``resume`` decides how the stage runs (continue or start again), not what it trains: out
    of the key. Every other param is in it, ``cpu`` included, at its default or not."""

    def train_hash(**params) -> str:
        doc = pipeline_doc()
        doc["stages"]["train"]["params"].update(params)
        plan = Runner(load_pipeline(doc=doc, run_dir=tmp_path / "run")).run(dry_run=True)
        return next(e["hash"] for e in plan if e["stage"] == "train")

    from vse_train.stages import VseTrainStage

    assert VseTrainStage.cache_params({"cpu": False, "resume": True, "seed": 0}) == {"cpu": False, "seed": 0}
    base = train_hash()
    assert train_hash(resume=False) == base
    assert train_hash(cpu=True) != base
    assert train_hash(seed=1) != base
