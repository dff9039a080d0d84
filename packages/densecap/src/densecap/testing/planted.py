"""A synthetic corpus with planted duplicates and planted test images (tests and
``benchmarks/corpus_integrity.py``).

:func:`plant` renders a synthetic world (train and test splits) and writes a *corpus*: every train
image with its exact dense description (``synthetic-oracle``), plus planted copies under new keys,
in shards of their own (as another rank's output would be):

- ``exact``: the image bytes unchanged;
- ``reencode``: decoded and saved as JPEG at quality 75;
- ``resize``: scaled to 60 % of its side;
- ``crop``: a 10 % crop: 90 % of the width and height kept, at a random offset;
- ``text``: an unrelated train image, rotated by 90 degrees (so it is no image duplicate), with
  an original's dense text in which ``words_changed`` words are replaced;
- ``test``: a test-split image (bytes unchanged, or re-encoded) put into the training corpus.

The truth comes back as ``[(kind, planted key, original key)]``. :func:`plant_photos` does the
same for the image kinds with real photos (scikit-image's sample images), where distinct images
differ far more than the synthetic world's.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from d2s.schema import DenseText, Sample
from d2s.shards import ShardWriter, iter_samples, split_shards, write_manifest
from d2s.synthetic import SplitSpec, WorldConfig, describe, write_world

KINDS = ("exact", "reencode", "resize", "crop", "text")
FILLER = ("quite", "really", "clearly", "maybe", "nicely", "simply", "oddly", "mostly")


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def transform(data: bytes, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """The planted image of ``kind`` (bytes, extension)."""
    if kind == "exact":
        return data, "png"
    im = Image.open(io.BytesIO(data)).convert("RGB")
    if kind == "reencode":
        return _encode(im, "JPEG", quality=75), "jpg"
    if kind == "resize":
        return _encode(im.resize((int(im.width * 0.6), int(im.height * 0.6)), Image.BILINEAR), "PNG"), "png"
    if kind == "crop":
        w, h = im.size
        dx, dy = int(round(w * 0.1)), int(round(h * 0.1))
        ox, oy = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
        return _encode(im.crop((ox, oy, ox + w - dx, oy + h - dy)), "PNG"), "png"
    raise ValueError(f"unknown kind {kind!r}")


def change_words(text: str, n: int, rng: np.random.Generator) -> str:
    """``text`` with ``n`` of its words replaced by filler words."""
    w = text.split()
    for i in rng.choice(len(w), size=min(n, len(w)), replace=False):
        w[int(i)] = FILLER[int(rng.integers(len(FILLER)))]
    return " ".join(w)


def _with_oracle(s: Sample) -> Sample:
    text = describe(json.loads(s.meta["scene"]))
    return replace(s, dense=[DenseText(text=text, source="synthetic-oracle", model="d2s.synthetic.describe")])


def plant(
    out: str | Path,
    *,
    n_train: int = 200,
    n_test: int = 50,
    per_kind: int = 20,
    n_test_planted: int = 10,
    image_size: int = 128,
    words_changed: int = 3,
    shard_size: int = 100,
    seed: int = 0,
) -> tuple[Path, Path, list[tuple[str, str, str]]]:
    """(corpus dir, world dir, truth). The corpus's train shards are ``train-000000...``, the planted
    ones follow (``train-0001NN``), one split ``train``; the world keeps its ``test`` split."""
    out = Path(out)
    world = out / "world"
    write_world(
        world,
        WorldConfig(image_size=image_size),
        [SplitSpec("train", n_train, seed), SplitSpec("test", n_test, seed)],
        shard_size=shard_size,
        progress=False,
    )
    corpus = out / "corpus"
    train = [_with_oracle(s) for s in iter_samples(split_shards(world, "train"))]
    test = list(iter_samples(split_shards(world, "test")))
    for i in range(0, len(train), shard_size):
        with ShardWriter(corpus, "train", i // shard_size) as w:
            for s in train[i : i + shard_size]:
                w.write(s)
    rng = np.random.default_rng(seed + 1)
    truth: list[tuple[str, str, str]] = []
    planted: list[Sample] = []
    picks = rng.permutation(len(train))
    for k, kind in enumerate(KINDS):
        for j in range(per_kind):
            orig = train[int(picks[(k * per_kind + j) % len(train)])]
            key = f"planted_{kind}_{j:04d}"
            if kind == "text":
                # an unrelated image (a test image nobody else uses) with the original's text, a few words changed
                other = train[int(picks[-(j + 1)])]
                text = change_words(orig.dense[0].text, words_changed, rng)
                planted.append(
                    replace(
                        other,
                        key=key,
                        id=key,
                        image=_encode(Image.open(io.BytesIO(other.image)).convert("RGB").rotate(90), "PNG"),
                        dense=[replace(orig.dense[0], text=text)],
                    )
                )
            else:
                data, ext = transform(orig.image, kind, rng)
                planted.append(replace(orig, key=key, id=key, image=data, image_ext=ext))
            truth.append((kind, key, orig.key))
    for j in range(n_test_planted):
        t = test[j % len(test)]
        data, ext = transform(t.image, "reencode" if j % 2 else "exact", rng)
        key = f"planted_test_{j:04d}"
        planted.append(replace(_with_oracle(t), key=key, id=key, split="train", image=data, image_ext=ext))
        truth.append(("test", key, t.key))
    for i in range(0, len(planted), shard_size):
        with ShardWriter(corpus, "train", 100 + i // shard_size, image_ext="png") as w:
            for s in planted[i : i + shard_size]:
                w.write(s)
    write_manifest(corpus)
    return corpus, world, truth


# ("cat" is left out: scikit-image's cat() is the chelsea photo again, a real duplicate)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "immunohistochemistry")
PHOTOS += (
    "retina",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
    "colorwheel",
    "logo",
    "horse",
    "moon",
    "coins",
    "clock",
)


def photo_tiles() -> list[Image.Image]:
    """Real photos: scikit-image's bundled sample images, each cut into 4 overlapping windows of 60 %
    of its side (76 images; windows of one photo share content, hard negatives for crop matching)."""
    import skimage.data

    tiles = []
    for name in PHOTOS:
        a = getattr(skimage.data, name)()
        if a.dtype != np.uint8:
            a = (a * 255).astype(np.uint8) if a.max() <= 1 else a.astype(np.uint8)
        im = Image.fromarray(a).convert("RGB")
        w, h = im.size
        for ox, oy in ((0, 0), (0.4, 0), (0, 0.4), (0.4, 0.4)):
            tiles.append(im.crop((int(ox * w), int(oy * h), int(ox * w + 0.6 * w), int(oy * h + 0.6 * h))))
    return tiles


def plant_photos(out: str | Path, *, per_kind: int = 20, seed: int = 0) -> tuple[Path, list[tuple[str, str, str]]]:
    """(corpus dir, truth): :func:`photo_tiles` as a corpus (shard ``train-000000``), and exact /
    re-encoded / resized / 10 %-cropped copies of ``per_kind`` of them (shard ``train-000100``)."""
    corpus = Path(out)
    rng = np.random.default_rng(seed)
    tiles = [
        Sample(
            key=f"photo_{i:04d}", image=_encode(t, "PNG"), image_ext="png", id=str(i), dataset="skimage", split="train"
        )
        for i, t in enumerate(photo_tiles())
    ]
    with ShardWriter(corpus, "train", 0) as w:
        for s in tiles:
            w.write(s)
    truth, planted = [], []
    for kind in KINDS[:4]:
        for j, i in enumerate(rng.choice(len(tiles), size=min(per_kind, len(tiles)), replace=False)):
            orig = tiles[int(i)]
            data, ext = transform(orig.image, kind, rng)
            key = f"planted_{kind}_{j:04d}"
            planted.append(replace(orig, key=key, id=key, image=data, image_ext=ext))
            truth.append((kind, key, orig.key))
    with ShardWriter(corpus, "train", 100, image_ext="png") as w:
        for s in planted:
            w.write(s)
    write_manifest(corpus)
    return corpus, truth
