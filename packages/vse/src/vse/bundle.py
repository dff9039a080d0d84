"""Inference bundles: what ``bench`` (and anyone else) loads to embed images and texts.

A bundle has the checkpoint layout (see :mod:`vse.checkpoint`) with ``format: vse-bundle``.
``load_bundle(path)`` gives a :class:`Bundle` whose ``embed_images`` / ``embed_texts`` return
L2-normalised CPU float32 tensors; texts take the sparse-caption path, through the student
head when the model has one (``use_student=False``: without it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from PIL import Image

from d2s.atomic import atomic_write_json

from .checkpoint import load_checkpoint, load_processor, load_tokenizer, read_config
from .transforms import ImageTransform, TextTokenizer


def export_bundle(checkpoint: str | Path, out: str | Path) -> Path:
    """Copy a checkpoint's inference parts into a bundle directory (atomically)."""
    checkpoint, out = Path(checkpoint), Path(out)
    doc = read_config(checkpoint)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("model.safetensors",):
        shutil.copy2(checkpoint / name, tmp / name)
    for name in ("image_backbone", "text_backbone", "tokenizer", "processor"):
        if (checkpoint / name).exists():
            shutil.copytree(checkpoint / name, tmp / name)
    doc = {**doc, "format": "vse-bundle", "source_checkpoint": str(checkpoint.resolve())}
    atomic_write_json(tmp / "vse_config.json", doc)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


class Bundle:
    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path = Path(path)
        self.model, self.config = load_checkpoint(self.path)
        self.model.eval().to(device)
        self.device = device
        cfg = self.model.cfg
        self.tokenizer = TextTokenizer(load_tokenizer(self.path))
        self.transform = ImageTransform.from_processor(
            cfg.image.image_size, load_processor(self.path), cfg.image.mean, cfg.image.std
        )

    @torch.no_grad()
    def embed_images(
        self, images: list[bytes | Image.Image], batch_size: int = 64, keys: list[str] | None = None
    ) -> torch.Tensor:
        """An image that cannot be decoded raises ``d2s.schema.SampleError`` naming ``keys[i]``
        when given, else its index in ``images``."""
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"embed_images: {len(keys)} keys for {len(images)} images")
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            names = [(None, keys[j] if keys is not None else f"#{j}") for j in range(i, i + len(chunk))]
            u8 = self.transform.decode(
                [im if not isinstance(im, (bytearray, memoryview)) else bytes(im) for im in chunk], names=names
            )
            px = self.transform.normalize(u8.to(self.device))
            out.append(self.model.embed_images(px).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.cfg.embed_dim)

    @property
    def text_max_length(self) -> int:
        """Tokens a text keeps (longer texts are cut): long enough for dense texts too (long-text
        retrieval); recorded in bench's protocol manifests."""
        return max(self.model.cfg.text.max_length, self.model.cfg.text.dense_max_length)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256, *, use_student: bool = True) -> torch.Tensor:
        """Caption embeddings; ``use_student=False`` leaves out the student head (the caption
        encoder alone, as for dense texts; a model without a head never uses one)."""
        out = []
        max_len = self.text_max_length  # a batch pads to its longest text only
        for i in range(0, len(texts), batch_size):
            ids, mask = self.tokenizer(texts[i : i + batch_size], max_len)
            emb = self.model.embed_texts(ids.to(self.device), mask.to(self.device), use_student=use_student)
            out.append(emb.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.cfg.embed_dim)


def load_bundle(path: str | Path, device: str = "cpu") -> Bundle:
    return Bundle(path, device)
