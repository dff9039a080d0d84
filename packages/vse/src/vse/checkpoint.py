"""Model checkpoints and inference bundles: one directory layout for both.

::

    vse_config.json        plain JSON: format, model config (dict), student_head, recipe, train config, step, metrics
    model.safetensors      the VSEModel state dict (encoders, student head if any; never the teacher)
    image_backbone/        HF config of the image backbone (architecture only; weights are in model.safetensors)
    text_backbone/         HF config of the text backbone
    tokenizer/             HF tokenizer files
    processor/             HF image processor (mean, std, size), when the model has one

Writers build the directory under a temporary name and rename it into place, so a crash
never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from d2s.atomic import atomic_write_json

from .models import ModelConfig, VSEModel, backbone_from_config, get_model_config

FORMAT = "vse-checkpoint"
VERSION = 1


def save_checkpoint(
    path: str | Path,
    model: VSEModel,
    *,
    tokenizer: Any,
    processor: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    model.image.backbone.config.save_pretrained(str(tmp / "image_backbone"))
    model.text.backbone.config.save_pretrained(str(tmp / "text_backbone"))
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    if processor is not None:
        processor.save_pretrained(str(tmp / "processor"))
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.cfg.to_dict(),
        "student_head": model.student is not None,
        **(extra or {}),
    }
    atomic_write_json(tmp / "vse_config.json", doc)
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "vse_config.json"
    if not p.exists():
        raise FileNotFoundError(f"{path}: not a vse checkpoint or bundle (no vse_config.json)")
    doc = json.loads(p.read_text())
    if doc.get("format") not in (FORMAT, "vse-bundle"):
        raise ValueError(f"{p}: unknown format {doc.get('format')!r}")
    return doc


def load_checkpoint(
    path: str | Path, *, student_head: bool | None = None, map_location: str = "cpu"
) -> tuple[VSEModel, dict[str, Any]]:
    """Rebuild the model from a checkpoint (no hub access: architectures come from the saved configs).

    ``student_head`` overrides whether the model has a head: a stage-1 checkpoint (no head)
    loaded for stage 2 gets a freshly initialised head; the other weights must all match.
    """
    path = Path(path)
    doc = read_config(path)
    cfg: ModelConfig = get_model_config(doc["model"])
    has_head = doc.get("student_head", False) if student_head is None else student_head
    model = VSEModel(
        cfg, backbone_from_config(path / "image_backbone"), backbone_from_config(path / "text_backbone"), has_head
    )
    state = load_file(str(path / "model.safetensors"), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not k.startswith("student.")]
    bad_unexpected = [k for k in unexpected if not k.startswith("student.")]
    if bad_missing or bad_unexpected:
        raise ValueError(
            f"{path}: weights do not fit the model: missing {bad_missing[:5]}, unexpected {bad_unexpected[:5]}"
        )
    return model, doc


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(path) / "tokenizer"))


def load_processor(path: str | Path):
    p = Path(path) / "processor"
    if not p.exists():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(p))


def copy_text_encoder_state(model: VSEModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.text.state_dict().items()}
