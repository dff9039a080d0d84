"""Model-side transforms: images -> normalised pixel tensors, texts -> token ids.

:class:`ImageTransform` resizes like the HF image processor (and, for training, crops and
flips at random); :class:`TextTokenizer` wraps an HF tokenizer (with the optional caption
augmentation training uses). Inference (``vse.bundle``) and training (``vse_train.data``)
share them, so a model sees the same pixels and ids in both.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from d2s.schema import SampleError

from .models import TokenAugConfig

# What PIL raises for bytes that are not a decodable image: UnidentifiedImageError (an OSError),
# OSError ("image file is truncated", broken data streams), ValueError / SyntaxError (bad headers),
# zlib and struct errors from damaged chunks, DecompressionBombError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, Image.DecompressionBombError)


class ImageTransform:
    """Images -> normalised float tensors [B, 3, S, S], resized like the HF processor, in two halves:

    ``decode`` (bytes or PIL -> uint8, runs in the data-loader workers) and ``normalize`` (uint8 ->
    float, runs wherever the tensor is, i.e. on the training device). Batches cross the process
    boundary (and the host-to-device copy) as uint8, a quarter of the bytes of float32.
    ``batch`` does both for evaluation and inference.
    """

    def __init__(
        self,
        size: int,
        mean: list[float],
        std: list[float],
        *,
        random_crop: list[float] | None = None,
        hflip: float = 0.0,
    ):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.random_crop = tuple(random_crop) if random_crop else None
        self.hflip = hflip

    @classmethod
    def from_processor(cls, size: int, processor: Any | None, default_mean, default_std, **augment) -> ImageTransform:
        mean = getattr(processor, "image_mean", None) or default_mean
        std = getattr(processor, "image_std", None) or default_std
        return cls(size, list(mean), list(std), **augment)

    def _pixels(self, image: bytes | Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        im = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image))
        if im.mode != "RGB":
            im = im.convert("RGB")
        else:
            im.load()  # decode now: a truncated or corrupt image fails here, before any random draw
        box = None
        if rng is not None and self.random_crop is not None:
            # the reference's training crop: both sides scaled by one r ~ U(lo, hi), random position
            w, h = im.size
            r = rng.uniform(*self.random_crop)
            cw, ch = max(1, int(w * r)), max(1, int(h * r))
            x0, y0 = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
            box = (x0, y0, x0 + cw, y0 + ch)
        if box is not None and box != (0, 0, *im.size):
            im = im.resize((self.size, self.size), Image.BILINEAR, box=box)
        elif im.size != (self.size, self.size):
            im = im.resize((self.size, self.size), Image.BILINEAR)
        px = np.asarray(im, dtype=np.uint8)
        if rng is not None and self.hflip > 0 and rng.random() < self.hflip:
            px = px[:, ::-1]
        return px

    def decode(
        self,
        images: list,
        rng: np.random.Generator | None = None,
        names: list[tuple[str | None, str | None]] | None = None,
    ) -> torch.Tensor:
        """Decode and resize each image: uint8 [B, 3, S, S]. With ``rng`` (training), each image
        also gets the configured random crop and horizontal flip. An image that cannot be decoded
        raises :class:`SampleError` naming it: ``names[i]`` is image i's (shard, key), else its index."""
        u8 = np.stack([self.pixels_or_error(im, i, rng, names) for i, im in enumerate(images)])  # B, S, S, 3
        return torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous()

    def pixels_or_error(
        self,
        image: bytes | Image.Image,
        i: int,
        rng: np.random.Generator | None = None,
        names: list[tuple[str | None, str | None]] | None = None,
    ) -> np.ndarray:
        try:
            return self._pixels(image, rng)
        except DECODE_ERRORS as exc:
            shard, key = names[i] if names is not None else (None, None)
            where = "" if key is not None else f"image {i} of the batch: "
            raise SampleError(
                f"{where}cannot decode the image ({type(exc).__name__}: {exc})", shard=shard, key=key
            ) from exc

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] (any device) -> float32, scaled and normalised like the processor."""
        if pixels.dtype != torch.uint8:
            raise TypeError(f"ImageTransform.normalize expects uint8 pixels, got {pixels.dtype}")
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return (pixels.to(torch.float32) - mean) / std

    def batch(self, images: list) -> torch.Tensor:
        return self.normalize(self.decode(images))

    def __call__(self, image: bytes | Image.Image) -> torch.Tensor:
        return self.batch([image])[0]


class TextTokenizer:
    """Wraps an HF tokenizer: texts -> padded ids + mask, with the optional caption augmentation
    (each inner token altered with probability p: [MASK], a random token, or deleted)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = tokenizer.pad_token_id or 0
        self.vocab_size = len(tokenizer)
        specials = set(tokenizer.all_special_ids)
        self.first_regular = max(specials) + 1 if max(specials) < 1000 else 1000

    def __call__(
        self,
        texts: list[str],
        max_length: int,
        aug: TokenAugConfig | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tok(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
        enc = batch["input_ids"]
        if aug is not None and aug.prob > 0:
            rng = rng or np.random.default_rng()
            if aug.unit == "word":
                units = [_word_units(batch.word_ids(i)) for i in range(len(enc))]
            else:
                units = [list(range(len(ids))) for ids in enc]
            enc = [self._augment(ids, u, aug, rng) for ids, u in zip(enc, units)]
        n = max(len(x) for x in enc)
        ids = torch.full((len(enc), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(enc), n), dtype=torch.bool)
        for i, x in enumerate(enc):
            ids[i, : len(x)] = torch.as_tensor(x)
            mask[i, : len(x)] = True
        return ids, mask

    def _augment(self, ids: list[int], units: list[int], aug: TokenAugConfig, rng: np.random.Generator) -> list[int]:
        """Alter each unit (a word, or a word piece) of the inner tokens with probability
        ``aug.prob``: every piece of an altered word becomes [MASK], or a random token, or is
        deleted (shares 0.5 / 0.1 / 0.4 by default). ``units[i]`` is token i's unit number."""
        out = [ids[0]]
        fate: dict[int, float] = {}
        for i in range(1, len(ids) - 1):
            unit = units[i]
            if unit not in fate:
                fate[unit] = float(rng.random())
            p = fate[unit]
            if p >= aug.prob:
                out.append(ids[i])
                continue
            r = p / aug.prob
            if r < aug.mask:
                out.append(self.mask_id)
            elif r < aug.mask + aug.random:
                out.append(int(rng.integers(self.first_regular, self.vocab_size)))
            # else: deleted
        out.append(ids[-1])
        return out


def _word_units(word_ids: list[int | None]) -> list[int]:
    """Unit number per token: the word it belongs to; special tokens get their own (negative) units."""
    return [w if w is not None else -1 - i for i, w in enumerate(word_ids)]
