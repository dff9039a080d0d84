"""The training data path: image transform vs the HF processor, and batches built in a loader worker."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from d2s.shards import split_shards
from vse.models import create_model, get_model_config, processor_source, tokenizer_source
from vse.transforms import ImageTransform, TextTokenizer
from vse_train.data import Collate, ShardStream
from vse_train.objective import text_fields
from vse_train.recipes import get_recipe


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def parts(world, assets):
    from transformers import AutoImageProcessor, AutoTokenizer

    recipe = get_recipe("stage2")
    model = create_model("tiny-vit", assets_dir=assets, student_head=recipe.student_head)
    processor = AutoImageProcessor.from_pretrained(processor_source(model.cfg, assets))
    tokenizer = TextTokenizer(AutoTokenizer.from_pretrained(tokenizer_source(model.cfg, assets)))
    transform = ImageTransform.from_processor(
        model.cfg.image.image_size, processor, model.cfg.image.mean, model.cfg.image.std
    )
    collate = Collate(transform, tokenizer, text_fields(recipe, model), model.cfg.text.token_aug)
    return processor, transform, collate, recipe


def test_image_transform_matches_the_hf_processor(parts):
    processor, transform, _, _ = parts
    rng = np.random.default_rng(0)
    # the model's own size, a smaller and a larger non-square image
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(64, 64, 3), (40, 57, 3), (131, 90, 3)]]
    ref = processor(images=[Image.fromarray(a) for a in images], return_tensors="pt")["pixel_values"]
    out = transform.batch([_png(a) for a in images])
    assert out.dtype == torch.float32 and out.shape == ref.shape == (3, 3, 64, 64)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_decode_is_uint8_and_normalize_checks_its_input(parts):
    _, transform, _, _ = parts
    a = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    u8 = transform.decode([_png(a), Image.fromarray(a).convert("L")])
    assert u8.dtype == torch.uint8 and u8.shape == (2, 3, 64, 64)
    assert torch.equal(u8[0], torch.from_numpy(a).permute(2, 0, 1))
    assert torch.equal(u8[1][0], u8[1][1])  # grey -> 3 equal channels
    with pytest.raises(TypeError, match="uint8"):
        transform.normalize(u8.float())


def test_loader_worker_batches_equal_in_process_batches(world, parts):
    """The batches a data-loader worker hands over (uint8 pixels, every text field) are the
    ones the stream builds in-process, in the same order."""
    _, _, collate, recipe = parts

    def stream():
        return ShardStream(
            split_shards(world, "train"),
            batch_size=32,
            collate=collate,
            seed=3,
            shuffle_buffer=64,
            need_dense=recipe.needs_dense,
        )

    it = iter(stream())
    local = [next(it) for _ in range(5)]
    loader = torch.utils.data.DataLoader(stream(), batch_size=None, num_workers=1, prefetch_factor=2)
    it = iter(loader)
    remote = [next(it) for _ in range(5)]
    del it
    assert set(local[0]) == {"pixels", "image_ids", "sparse_ids", "sparse_mask", "teacher_ids", "teacher_mask"}
    assert local[0]["pixels"].dtype == torch.uint8
    for a, b in zip(local, remote):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert not torch.equal(local[0]["image_ids"], local[1]["image_ids"])


def _torch_shm() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("torch_")}


def _wait_for_no_new_segments(before: set[str], seconds: float) -> set[str]:
    deadline = time.time() + seconds
    while (left := _torch_shm() - before) and time.time() < deadline:
        time.sleep(0.2)
    return left


# A training process that takes a few batches from its loader worker, then either holds them
# until it is killed ("hold") or drops the loader with batches still in flight and exits ("exit").
_TAKE_BATCHES = """
import sys, time, torch
from d2s.shards import split_shards
from vse.transforms import ImageTransform, TextTokenizer
from vse_train.data import Collate, ShardStream, TextField
from vse.models import TokenAugConfig
from transformers import AutoTokenizer
tok = TextTokenizer(AutoTokenizer.from_pretrained(sys.argv[2]))
collate = Collate(ImageTransform(64, [0.5] * 3, [0.5] * 3), tok, {"sparse": TextField("sparse", 32, True)}, TokenAugConfig())
stream = ShardStream(split_shards(sys.argv[1], "train"), batch_size=16, collate=collate, shuffle_buffer=16)
it = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4))
held = [next(it) for _ in range(6)]
assert sum(int(b["pixels"].sum()) for b in held) > 0
print("holding", flush=True)
if sys.argv[3] == "hold":
    time.sleep(600)
del it, held
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
@pytest.mark.parametrize("end", ["hold", "exit"])
def test_loader_shared_memory_is_released(world, assets, end):
    """Batches cross from the worker as named shared-memory segments: none may stay behind
    when the training process exits with batches in flight, or is SIGKILLed holding some."""
    tok_dir = str(tokenizer_source(get_model_config("tiny-vit"), assets))
    before = _torch_shm()
    proc = subprocess.Popen(
        [sys.executable, "-c", _TAKE_BATCHES, str(world), tok_dir, end],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "holding"
        if end == "hold":
            assert _torch_shm() - before, "the batches the trainer holds should be named segments"
            os.kill(proc.pid, signal.SIGKILL)  # the trainer dies; its loader worker notices and exits
        assert proc.wait(timeout=60) == (-signal.SIGKILL if end == "hold" else 0)
        left = _wait_for_no_new_segments(before, 30)
        assert not left, f"left behind: {sorted(left)[:5]}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
