"""Pipeline stage types of the vse package (entry-point group ``d2s.stages``).

``vse-train``: train one recipe from shards; outputs the checkpoint (best on val, else last)
and the inference bundle. The run directory is the stage's work dir, so an interrupted stage
resumes from its saved state when the runner starts it again. With ``params.launch`` set, the
training runs as ``accelerate launch ... -m vse_train.cli train --config <work>/train_config.json``
in child processes (several GPUs, several machines, or gloo processes on CPU).

``vse-assets``: the tokenizer + tiny backbones of the CPU configs, built from the shards; with
``params.pretrain_backbones`` the backbones are then pre-trained (``vse_train.backbone_pretrain``:
image tagging and masked language modelling on a split of their own, e.g. the synthetic world's
``pretrain``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from d2s.atomic import atomic_write_text
from d2s.config import to_dict
from d2s.pipeline import Stage, StageContext

from .backbone_pretrain import BackbonePretrainParams
from .config import TrainConfig, TrainSpec, parse_config
from .train import train


@dataclass
class LaunchConfig:
    """How ``vse-train`` starts its processes through ``accelerate launch`` (flags of the same name).

    ``num_processes`` is the total over all machines. With several machines, each runs the
    pipeline with its own ``machine_rank`` and the run dir must be on a shared filesystem.
    ``cpu: true`` runs gloo processes on CPU (launched with ``--multi_gpu`` and the training
    config's ``cpu: true``: accelerate's own ``--cpu`` launcher starts one process only).
    """

    num_processes: int
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # default: the stage's mixed_precision
    multi_gpu: bool = True  # --multi_gpu when more than one process
    cpu: bool = False
    extra_args: list[str] = field(default_factory=list)  # more `accelerate launch` flags, before -m

    def __post_init__(self) -> None:
        if self.num_processes < 1 or self.num_machines < 1:
            raise ValueError("launch.num_processes and launch.num_machines must be >= 1")
        if self.num_processes < self.num_machines:
            raise ValueError(
                f"launch.num_processes ({self.num_processes}) is the total over all machines; "
                f"it must be >= num_machines ({self.num_machines})"
            )
        if not 0 <= self.machine_rank < self.num_machines:
            raise ValueError(f"launch.machine_rank must be in [0, num_machines), got {self.machine_rank}")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("launch.main_process_ip is required with num_machines > 1")
        if self.main_process_port is not None and not 0 < self.main_process_port < 65536:
            raise ValueError(f"launch.main_process_port must be a TCP port, got {self.main_process_port}")
        bad = [a for a in self.extra_args if a in ("-m", "--module")]
        if bad:
            raise ValueError(
                "launch.extra_args: flags of accelerate launch only (the stage adds -m vse_train.cli train)"
            )

    def command(self, config_file: Path, mixed_precision: str | None) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(self.num_processes),
            "--num_machines",
            str(self.num_machines),
            "--machine_rank",
            str(self.machine_rank),
            "--dynamo_backend",
            "no",
        ]
        if mixed_precision is not None:  # None: accelerate's own default (its config file, else "no")
            cmd += ["--mixed_precision", mixed_precision]
        if self.main_process_ip:
            cmd += ["--main_process_ip", self.main_process_ip]
        if self.main_process_port is not None:
            cmd += ["--main_process_port", str(self.main_process_port)]
        if self.num_processes > 1 and (self.multi_gpu or self.cpu):
            cmd.append("--multi_gpu")
        elif self.cpu:
            cmd.append("--cpu")
        return cmd + list(self.extra_args) + ["-m", "vse_train.cli", "train", "--config", str(config_file)]


@dataclass
class VseTrainParams(TrainSpec):
    """The stage's params: the training spec (:class:`vse_train.config.TrainSpec`, same keys as
    a ``vse train`` config without the paths, which come from the stage's inputs and outputs)
    plus ``launch``."""

    # the stage's default is "no" (the runner's process, and what it passes to accelerate launch)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = "no"
    launch: LaunchConfig | None = None  # None: train in the runner's process

    def train_config(self, shards: str, out: str, where: str = "train config", **paths: str | None) -> TrainConfig:
        """The run's :class:`TrainConfig`: this spec, the paths, and the launch's precision / cpu."""
        spec = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainSpec)}
        if self.launch is not None:
            if self.launch.mixed_precision is not None:
                spec["mixed_precision"] = self.launch.mixed_precision
            if self.launch.cpu:
                spec["cpu"] = True
        doc = {**to_dict(spec), "shards": shards, "out": out, **{k: v for k, v in paths.items() if v}}
        return parse_config(doc, where)


class VseTrainStage(Stage):
    """Train a recipe (baseline | stage1 | stage2 | a recipe file) on the shards."""

    Params = VseTrainParams
    inputs = {
        "shards": "dataset dir (manifest.json; train and val splits)",
        "init?": "checkpoint dir to initialise from (stage 2)",
        "teacher?": "checkpoint dir of a teacher text encoder (recipes with teacher: teacher)",
        "assets?": "assets dir of the tiny configs (vse-assets); default: built in the work dir",
        "dedup?": "the densecap-dedup stage's index of these shards: the model is trained again when it changes",
        "contamination?": "the densecap-contamination stage's index of these shards (likewise)",
    }
    outputs = {
        "checkpoint": "model checkpoint dir (best on val rSum)",
        "bundle": "inference bundle dir (vse.bundle)",
        "run": "training run dir (metrics.jsonl, summary.json, resumable state, tensorboard)",
    }
    # 2: every param in the cache key (``cpu`` was left out at its default), but ``resume``
    version = "2"
    # resuming or starting again trains the same weights, as does the image encoder in a thread of its own
    execution_params = ("resume", "image_thread")

    def run(self, ctx: StageContext) -> dict:
        p: VseTrainParams = ctx.params
        # The index is read from <shards>/integrity/ like any reader does; the inputs only tie this
        # stage to the stages that write it (order, cache key).
        for k in ("dedup", "contamination"):
            if ctx.inputs.get(k):
                ctx.log.info("integrity index: %s (written by the stage of input %s)", ctx.inputs[k], k)
        paths = {k: ctx.inputs.get(k) for k in ("init", "teacher", "assets")}
        cfg = p.train_config(ctx.inputs["shards"], str(ctx.outputs["run"]), f"stage {ctx.name!r} params", **paths)
        summary = train(cfg) if p.launch is None else launch_train(ctx, p.launch, cfg)
        for name, src in (("checkpoint", Path(summary["checkpoint"])), ("bundle", Path(summary["bundle"]))):
            dst = ctx.outputs[name]
            if dst.resolve() != src.resolve():
                tmp = dst.with_name(dst.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp)
                shutil.rmtree(dst, ignore_errors=True)
                tmp.rename(dst)
        return {
            k: summary[k]
            for k in (
                "recipe",
                "model",
                "steps",
                "seconds",
                "samples_per_s",
                "best_rsum",
                "best_step",
                "last_loss",
                "compositions",
            )
        }


def launch_train(ctx: StageContext, launch: LaunchConfig, cfg: TrainConfig, tail_lines: int = 60) -> dict:
    """Run ``vse_train.cli train`` under ``accelerate launch``; returns the run's summary.json.

    The resolved config goes to ``<work>/train_config.json``; the children's output is streamed
    to the stage's log and kept in ``<work>/launch.log``. A failure raises with its last lines.
    """
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    assets = _prebuild_assets(cfg)
    if assets is not None:
        cfg = dataclasses.replace(cfg, assets=str(assets))
    config_file = ctx.work_dir / "train_config.json"
    atomic_write_text(config_file, json.dumps(to_dict(cfg), indent=2) + "\n")
    cmd = launch.command(config_file, cfg.mixed_precision)
    ctx.log.info("launching: %s", " ".join(cmd))
    summary_path = Path(cfg.out) / "summary.json"
    summary_path.unlink(missing_ok=True)  # a summary from an earlier run must not pass for this one
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    errors: list[str] = []  # the first error lines: a rank's root cause often scrolls out of the tail
    rc = _run_streamed(ctx, cmd, tail, errors)
    if rc != 0:
        first = "".join(f"\n  {e}" for e in errors if e not in tail)
        raise RuntimeError(
            f"stage {ctx.name!r}: accelerate launch exited with status {rc}"
            + (f"; first error lines:{first}" if first else "")
            + f"\nlast lines (all in {ctx.work_dir / 'launch.log'}):\n"
            + "\n".join(tail)
        )
    return _read_summary(ctx, summary_path, launch.machine_rank)


def _run_streamed(ctx: StageContext, cmd: list[str], tail: collections.deque[str], errors: list[str]) -> int:
    """Run ``cmd`` in its own process group, its output streamed to the stage's log and appended to
    ``<work>/launch.log``; keeps the last lines in ``tail`` and the first error lines in ``errors``.
    Interrupted (Ctrl-C, an error here), it stops the whole launched process group."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(ctx.work_dir / "launch.log", "a") as logf:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env, start_new_session=True
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                line = line.rstrip("\n")
                tail.append(line)
                if ("Error" in line or "error:" in line) and len(errors) < 12 and line not in errors:
                    errors.append(line)
                ctx.log.info("%s", line)
            return proc.wait()
        except BaseException:
            _stop_group(proc)
            raise


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _read_summary(ctx: StageContext, summary_path: Path, machine_rank: int) -> dict:
    waited = 0
    while not summary_path.exists() and machine_rank > 0 and waited < 600:
        time.sleep(2)  # machine 0's main process writes it after the others have exited
        waited += 2
    if not summary_path.exists():
        raise RuntimeError(
            f"stage {ctx.name!r}: the launched training finished without {summary_path} (with several "
            "machines the run dir must be on a filesystem they share)"
        )
    return json.loads(summary_path.read_text())


def _prebuild_assets(cfg: TrainConfig) -> Path | None:
    """Build the tiny configs' assets here, in one process, in ``<out>/assets`` (where ``train``
    would build them) and return that dir; None when the run needs none or has its own.

    Building them inside the launched processes would read the shards while torch.distributed
    is up, which webdataset refuses without a node splitter."""
    from .build import needs_assets
    from .recipes import get_recipe

    if (
        cfg.assets is not None
        or get_recipe(cfg.recipe).init == "checkpoint"
        or not needs_assets(cfg.model, cfg.model_overrides)
    ):
        return None
    from vse.assets import build_assets

    assets = Path(cfg.out) / "assets"
    marker = assets / "assets.json"  # written last by build_assets
    if not (marker.exists() and cfg.model in json.loads(marker.read_text()).get("models", {})):
        build_assets(cfg.shards, assets, [cfg.model])
    return assets


@dataclass
class VseAssetsParams:
    models: list[str] = field(default_factory=list)  # empty: every locally built config
    seed: int = 0
    # set: pre-train every model's backbones (vse_train.backbone_pretrain)
    pretrain_backbones: BackbonePretrainParams | None = None


class VseAssetsStage(Stage):
    """Build the tokenizer (from the shards' texts) and the tiny random backbones, then, with
    ``pretrain_backbones`` set, pre-train the backbones on its ``split`` of the same shards."""

    Params = VseAssetsParams
    inputs = {
        "shards": "dataset dir (texts of the train split feed the tokenizer; pretrain_backbones.split the pre-training)"
    }
    outputs = {"assets": "assets dir for vse-train's assets input"}
    version = "2"  # 2: the param warmstart is now pretrain_backbones

    def run(self, ctx: StageContext) -> dict:
        from vse.assets import build_assets

        p: VseAssetsParams = ctx.params
        dst = ctx.outputs["assets"]
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if p.pretrain_backbones is not None:
            from .backbone_pretrain import check_split

            check_split(ctx.inputs["shards"], p.pretrain_backbones.split)  # fail before building anything
        summary = build_assets(ctx.inputs["shards"], tmp, p.models or None, seed=p.seed)
        result: dict[str, Any] = {"vocab_size": summary["vocab_size"], "models": sorted(summary["models"])}
        if p.pretrain_backbones is not None:
            from .backbone_pretrain import pretrain_backbones
            from .backbone_pretrain import summary as pretrain_summary

            result["pretrain_backbones"] = {}
            for name in sorted(summary["models"]):
                done = pretrain_backbones(tmp, ctx.inputs["shards"], name, p.pretrain_backbones)
                result["pretrain_backbones"][name] = pretrain_summary(done)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
        return result
