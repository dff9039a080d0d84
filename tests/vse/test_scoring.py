"""vse.scoring: the model-backed sentence scorers of d2s.grounding, on real tiny models, offline.

The bundle scorer runs on a real (randomly initialised, untrained) tiny-vit bundle with a
student head, built from the session's assets; the Hugging Face scorer on tiny CLIP / SigLIP
models that densecap.testing.tiny_clip writes with save_pretrained. Expected values are
computed here from the models directly, not through the scorer.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from d2s.config import ConfigError  # noqa: E402
from d2s.grounding import SCORERS, ReferenceBank, ScorerError, score_batch, split_sentences  # noqa: E402
from d2s.schema import DenseText, SampleError  # noqa: E402
from d2s.shards import read_samples  # noqa: E402
from d2s.synthetic import WorldConfig, describe, make_sample  # noqa: E402
from densecap.testing.tiny_clip import build_tiny_bert, build_tiny_clip, build_tiny_siglip  # noqa: E402

SENTENCES = [
    "A red circle is at the top left.",
    "There are two blue squares and a small green triangle next to each other.",
    "The scene is a kitchen.",
    "shapes",
    "A large yellow star is below the purple ring, to the right of the orange square.",
]


def _bundle(assets: Path, out: Path, student_head: bool, seed: int = 0) -> Path:
    """A real bundle of the tiny-vit config (random weights): checkpoint, then export."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from vse.bundle import export_bundle
    from vse.checkpoint import save_checkpoint
    from vse.models import create_model, processor_source, tokenizer_source

    torch.manual_seed(seed)
    model = create_model("tiny-vit", assets_dir=assets, student_head=student_head)
    tok = AutoTokenizer.from_pretrained(tokenizer_source(model.cfg, assets))
    proc = AutoImageProcessor.from_pretrained(processor_source(model.cfg, assets))
    ck = save_checkpoint(out / "checkpoint", model, tokenizer=tok, processor=proc)
    return export_bundle(ck, out / "bundle")


@pytest.fixture(scope="module")
def bundle(assets, tmp_path_factory) -> Path:
    return _bundle(assets, tmp_path_factory.mktemp("scoring_bundle"), student_head=True)


@pytest.fixture(scope="module")
def stage1_bundle(assets, tmp_path_factory) -> Path:
    return _bundle(assets, tmp_path_factory.mktemp("scoring_stage1"), student_head=False)


@pytest.fixture(scope="module")
def images(world) -> tuple[list[bytes], list[str]]:
    samples = read_samples(world, "val")[:5]
    return [s.image for s in samples], [s.key for s in samples]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {
        "clip": build_tiny_clip(root / "clip"),
        "siglip": build_tiny_siglip(root / "siglip"),
        "bert": build_tiny_bert(root / "bert"),
    }


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _unit(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=1), torch.ones(len(x)), atol=1e-5)


# ---- vse-bundle -----------------------------------------------------------------------------


def test_bundle_dense_path_is_the_caption_encoder_without_the_head(bundle):
    from vse.checkpoint import load_checkpoint, load_tokenizer
    from vse.scoring import BundleScorer
    from vse.transforms import TextTokenizer

    dense = BundleScorer({"path": str(bundle), "batch_size": 2, "progress": False})
    sparse = BundleScorer({"path": str(bundle), "text_path": "sparse", "batch_size": 2, "progress": False})
    assert dense.params.text_path == "dense"  # the default
    got_dense, got_sparse = dense.embed_texts(SENTENCES), sparse.embed_texts(SENTENCES)
    assert got_dense.shape == got_sparse.shape == (len(SENTENCES), 128) and got_dense.dtype == torch.float32
    assert _unit(got_dense) and _unit(got_sparse)

    model, _ = load_checkpoint(bundle)
    model.eval()
    assert model.student is not None
    ids, mask = TextTokenizer(load_tokenizer(bundle))(SENTENCES, model.cfg.text.dense_max_length)
    with torch.no_grad():
        without_head = model.embed_texts(ids, mask, use_student=False)
        with_head = model.embed_texts(ids, mask, use_student=True)
    assert torch.allclose(got_dense, without_head, atol=1e-5)
    assert torch.allclose(got_sparse, with_head, atol=1e-5)
    assert (got_dense - got_sparse).abs().max() > 1e-2  # the head changes the embedding


def test_bundle_images_match_the_model_and_a_bad_image_names_its_key(bundle, images):
    from vse.checkpoint import load_checkpoint
    from vse.scoring import BundleScorer

    data, keys = images
    scorer = BundleScorer({"path": str(bundle), "batch_size": 2, "progress": False})
    got = scorer.embed_images(data, keys)
    assert got.shape == (5, 128) and _unit(got)
    model, _ = load_checkpoint(bundle)
    model.eval()
    with torch.no_grad():
        want = model.embed_images(torch.stack([scorer.bundle.transform(x) for x in data]))
    assert torch.allclose(got, want, atol=1e-5)
    broken = data[2][: len(data[2]) // 3]
    with pytest.raises(SampleError, match=r"key 'broken-one'.*cannot decode"):
        scorer.embed_images([data[0], data[1], broken], [keys[0], keys[1], "broken-one"])


def test_bundle_scorer_errors_name_the_path_and_field(bundle, stage1_bundle, tmp_path):
    from vse.scoring import BundleScorer

    missing = tmp_path / "no-such-bundle"
    with pytest.raises(ScorerError, match=rf"path: {re.escape(str(missing))}: no such bundle directory"):
        BundleScorer({"path": str(missing)})
    not_bundle = tmp_path / "just-a-folder"
    not_bundle.mkdir()
    (not_bundle / "notes.txt").write_text("hello")
    with pytest.raises(ScorerError, match=rf"path: {re.escape(str(not_bundle))}: not a loadable vse bundle"):
        BundleScorer({"path": str(not_bundle)})
    with pytest.raises(ScorerError, match=r"text_path: 'sparse' needs a student head"):
        BundleScorer({"path": str(stage1_bundle), "text_path": "sparse"})
    with pytest.raises(ConfigError, match=r"text_path"):
        BundleScorer({"path": str(bundle), "text_path": "student"})
    with pytest.raises(ConfigError, match=r"batch_size"):
        BundleScorer({"path": str(bundle), "batch_size": 0})
    # a stage-1 model has no head: the dense path is the one that works everywhere
    assert _unit(BundleScorer({"path": str(stage1_bundle), "progress": False}).embed_texts(SENTENCES[:2]))


def test_bundle_identity_follows_the_weights_not_the_path(bundle, tmp_path):
    from safetensors.torch import load_file, save_file

    from vse.scoring import BundleScorer

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    ident = BundleScorer({"path": str(copy), "progress": False}).identity
    assert ident.startswith("vse-bundle:") and '"model": "tiny-vit"' in ident and '"text_path": "dense"' in ident
    assert BundleScorer({"path": str(bundle)}).identity == ident  # same contents elsewhere
    assert BundleScorer({"path": str(copy), "text_path": "sparse"}).identity != ident
    assert BundleScorer({"path": str(copy), "batch_size": 3}).identity == ident  # how, not what
    state = load_file(str(copy / "model.safetensors"))
    name = next(k for k in state if k.startswith("text.fc."))
    state[name] = state[name] + 1e-3
    save_file(state, str(copy / "model.safetensors"))
    assert BundleScorer({"path": str(copy)}).identity != ident


# ---- hf-dual-encoder ------------------------------------------------------------------------


def _direct(model_dir: Path, data: list[bytes], texts: list[str], pad_to: int | None):
    """Normalised features computed straight from transformers, one batch each."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_dir).eval()
    proc = AutoProcessor.from_pretrained(model_dir)
    limit = model.config.text_config.max_position_embeddings
    pixels = proc.image_processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in data], return_tensors="pt")
    padding = "max_length" if pad_to else True
    enc = proc.tokenizer(texts, padding=padding, truncation=True, max_length=pad_to or limit, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels["pixel_values"])
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


@pytest.mark.parametrize("family, dim, limit", [("clip", 16, 77), ("siglip", 32, 64)])
def test_hf_scorer_equals_the_models_own_features(tiny, family, dim, limit):
    from vse.scoring import HFDualEncoderScorer

    data = [_png((200, 30, 30)), _png((30, 200, 30), (50, 50)), _png((20, 20, 220), (16, 64))]
    keys = ["r", "g", "b"]
    scorer = HFDualEncoderScorer({"model": str(tiny[family]), "batch_size": 2, "progress": False})
    assert scorer.max_length == limit
    assert scorer.padding == ("max_length" if family == "siglip" else "longest")
    img, txt = scorer.embed_images(data, keys), scorer.embed_texts(SENTENCES)
    assert img.shape == (3, dim) and txt.shape == (len(SENTENCES), dim)
    assert img.dtype == txt.dtype == torch.float32 and _unit(img) and _unit(txt)
    want_img, want_txt = _direct(tiny[family], data, SENTENCES, limit if family == "siglip" else None)
    assert torch.allclose(img, want_img, atol=1e-5)
    assert torch.allclose(txt, want_txt, atol=1e-5)
    assert (img[0] - img[1]).abs().max() > 1e-3  # different images, different embeddings


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_scorer_batching_does_not_change_the_result(tiny, family):
    from vse.scoring import HFDualEncoderScorer

    data = [_png((i * 40 % 256, 255 - i * 30, i * 17 % 256), (20 + i, 30)) for i in range(6)]
    keys = [f"k{i}" for i in range(6)]
    one = HFDualEncoderScorer({"model": str(tiny[family]), "batch_size": 1, "progress": False})
    all_ = HFDualEncoderScorer({"model": str(tiny[family]), "batch_size": 64, "progress": False})
    assert torch.allclose(one.embed_images(data, keys), all_.embed_images(data, keys), atol=1e-5)
    assert torch.allclose(one.embed_texts(SENTENCES), all_.embed_texts(SENTENCES), atol=1e-5)


def test_hf_scorer_counts_truncated_sentences_and_logs_once(tiny, caplog):
    from vse.scoring import HFDualEncoderScorer

    scorer = HFDualEncoderScorer({"model": str(tiny["clip"]), "max_length": 12, "progress": False})
    long = "a red circle and a blue square and a green triangle and a yellow star"
    with caplog.at_level(logging.WARNING, logger="vse.scoring"):
        scorer.embed_texts([long, "shapes", long])
        scorer.embed_texts([long])
    assert scorer.truncated == 3 and scorer.sentences == 4
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 3 sentences are longer than 12 tokens" in warnings[0].getMessage()


def test_hf_scorer_device_and_dtype(tiny):
    """cuda where there is one (same embeddings as the CPU's), a clear error where there is none;
    bfloat16 close to float32, with its own identity."""
    from vse.scoring import HFDualEncoderScorer

    model = str(tiny["clip"])
    data, keys = [_png((200, 30, 30)), _png((30, 30, 200))], ["r", "b"]
    cpu = HFDualEncoderScorer({"model": model, "progress": False})
    want_img, want_txt = cpu.embed_images(data, keys), cpu.embed_texts(SENTENCES)
    if torch.cuda.is_available():
        gpu = HFDualEncoderScorer({"model": model, "device": "cuda", "progress": False})
        img, txt = gpu.embed_images(data, keys), gpu.embed_texts(SENTENCES)
        assert img.device.type == txt.device.type == "cpu" and img.dtype == torch.float32
        assert torch.allclose(img, want_img, atol=1e-3) and torch.allclose(txt, want_txt, atol=1e-3)
        assert gpu.identity == cpu.identity
    else:
        with pytest.raises(ScorerError, match=r"device: 'cuda'.*CUDA is not available"):
            HFDualEncoderScorer({"model": model, "device": "cuda"})
    with pytest.raises(ScorerError, match=r"device: 'gpu3' is not a torch device"):
        HFDualEncoderScorer({"model": model, "device": "gpu3"})
    bf16 = HFDualEncoderScorer({"model": model, "dtype": "bfloat16", "progress": False})
    txt = bf16.embed_texts(SENTENCES)
    assert txt.dtype == torch.float32 and _unit(txt)
    assert torch.allclose(txt, want_txt, atol=0.05) and not torch.equal(txt, want_txt)
    assert bf16.identity != cpu.identity


def test_progress_bar_only_when_asked_and_more_than_one_batch(tiny, capfd):
    from vse.scoring import HFDualEncoderScorer

    data, keys = [_png((9, 9, 9)), _png((99, 99, 99))], ["a", "b"]
    HFDualEncoderScorer({"model": str(tiny["clip"]), "batch_size": 1}).embed_images(data, keys)
    assert "hf-dual-encoder: images" in capfd.readouterr().err
    HFDualEncoderScorer({"model": str(tiny["clip"]), "batch_size": 2}).embed_images(data, keys)
    HFDualEncoderScorer({"model": str(tiny["clip"]), "batch_size": 1, "progress": False}).embed_texts(SENTENCES)
    assert "hf-dual-encoder:" not in capfd.readouterr().err


def test_hf_scorer_errors_name_the_model(tiny, tmp_path):
    from vse.scoring import HFDualEncoderScorer

    bert = re.escape(repr(str(tiny["bert"])))
    with pytest.raises(ScorerError, match=rf"model: {bert} \(BertModel\) is not a dual encoder.*get_image_features"):
        HFDualEncoderScorer({"model": str(tiny["bert"])})
    missing = tmp_path / "no-such-model"
    with pytest.raises(ScorerError, match=rf"model: {re.escape(str(missing))}: no such model directory"):
        HFDualEncoderScorer({"model": str(missing)})
    with pytest.raises(ScorerError, match=r"max_length: 100 is more than .* \(77 tokens\)"):
        HFDualEncoderScorer({"model": str(tiny["clip"]), "max_length": 100})
    with pytest.raises(ScorerError, match=r"dtype: 'float16' needs a GPU"):
        HFDualEncoderScorer({"model": str(tiny["clip"]), "dtype": "float16"})
    from transformers import AutoConfig, SiglipModel

    odd = tmp_path / "odd-siglip"  # text head to 16 dims, image features 32: no shared space
    shutil.copytree(tiny["siglip"], odd)
    cfg = AutoConfig.from_pretrained(odd)
    cfg.text_config.projection_size = 16
    SiglipModel(cfg).save_pretrained(odd)
    with pytest.raises(ScorerError, match=r"image features \(32\) and text features \(16\) differ in size"):
        HFDualEncoderScorer({"model": str(odd)})
    scorer = HFDualEncoderScorer({"model": str(tiny["clip"]), "progress": False})
    with pytest.raises(SampleError, match=r"key 'not-a-png'.*cannot decode"):
        scorer.embed_images([_png((1, 2, 3)), b"\x89PNG truncated"], ["ok", "not-a-png"])


def test_hf_identity_follows_the_weights_and_the_builder_is_deterministic(tmp_path):
    from vse.scoring import HFDualEncoderScorer

    start = time.perf_counter()
    d = build_tiny_clip(tmp_path / "clip", seed=0)
    assert time.perf_counter() - start < 5.0
    first = HFDualEncoderScorer({"model": str(d)}).identity
    assert first.startswith("hf-dual-encoder:") and '"revision": "sha256:' in first and str(d) in first
    assert HFDualEncoderScorer({"model": str(d), "max_length": 77}).identity == first  # 0 means 77 here
    assert HFDualEncoderScorer({"model": str(d), "max_length": 20}).identity != first
    build_tiny_clip(d, seed=1)
    assert HFDualEncoderScorer({"model": str(d)}).identity != first
    build_tiny_clip(d, seed=0)
    assert HFDualEncoderScorer({"model": str(d)}).identity == first


@pytest.mark.slow
def test_hf_scorer_loads_a_hub_name_from_the_cache_and_names_its_commit(tmp_path):
    """A model by hub name, offline, from a hub cache laid out by hand; its identity is the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--d2s-test--tiny-clip"
    build_tiny_clip(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from d2s.grounding import SCORERS\n"
        "s = SCORERS.create('hf-dual-encoder', {'model': 'd2s-test/tiny-clip', 'progress': False}, 'test')\n"
        "print(s.identity)\n"
        "print(tuple(s.embed_texts(['a red circle', 'a blue square']).shape))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HOME": str(tmp_path / "home"),
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    identity, shape = out.stdout.strip().splitlines()[-2:]
    assert f'"revision": "{commit}"' in identity and '"model": "d2s-test/tiny-clip"' in identity
    assert shape == "(2, 16)"


# ---- through the registry, end to end -------------------------------------------------------


def test_scorers_resolve_by_name_through_the_entry_points():
    targets = SCORERS.entry_point_targets()
    assert targets["vse-bundle"] == "vse.scoring:BundleScorer"
    assert targets["hf-dual-encoder"] == "vse.scoring:HFDualEncoderScorer"
    with pytest.raises(ConfigError, match=r"grounding\.scorer\.params\.text_path"):
        SCORERS.parse_params("vse-bundle", {"path": "x", "text_path": "both"}, "grounding.scorer.params")


@pytest.mark.parametrize("name", ["vse-bundle", "hf-dual-encoder"])
def test_registry_scorer_scores_every_sentence(name, bundle, tiny):
    params = {"path": str(bundle)} if name == "vse-bundle" else {"model": str(tiny["clip"])}
    scorer = SCORERS.create(name, {**params, "batch_size": 4, "progress": False}, "grounding.scorer")
    assert type(scorer).name == name
    cfg = WorldConfig(world_seed=0)
    samples = [make_sample(cfg, "val", i) for i in range(6)]
    bank = ReferenceBank.build(scorer, samples, size=5)
    assert bank.embeddings.shape[0] == 5 and _unit(bank.embeddings)
    items = [(s, DenseText(describe(json.loads(s.meta["scene"])), source="synthetic-oracle")) for s in samples[:3]]
    items.append((samples[0], DenseText("A red circle. A purple cow is flying over it.", source="test")))
    dim = bank.embeddings.shape[1]
    assert scorer.embed_texts([]).shape == (0, dim) and scorer.embed_images([], []).shape == (0, dim)
    scored = score_batch(scorer, bank, items)
    assert len(scored) == len(items)
    for (_, dense), sentences in zip(items, scored):
        assert [s.text for s in sentences] == split_sentences(dense.text)
        assert all(torch.isfinite(torch.tensor([s.score, s.similarity])).all() for s in sentences)
        assert all(-1.0 - 1e-4 <= s.similarity <= 1.0 + 1e-4 for s in sentences)
