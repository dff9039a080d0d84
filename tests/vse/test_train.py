"""Training runs on real shards of the synthetic world (tiny-vit, batch 32, one thread)."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2s.config import ConfigError
from d2s.shards import read_samples
from tests.vse.forked_cli import run_cli
from vse.bundle import load_bundle
from vse.checkpoint import load_checkpoint
from vse.models import get_model_config, load_backbone
from vse_train.config import parse_config
from vse_train.failpoints import KILL_ENV
from vse_train.recipes import get_recipe
from vse_train.teacher import state_fingerprint
from vse_train.train import train


def get_recipe_path(name):
    from importlib import resources

    return resources.files("vse_train") / "configs" / "recipes" / f"{name}.json"


def cfg_doc(world, assets, out, **kw):
    doc = {
        "shards": str(world),
        "out": str(out),
        "assets": str(assets),
        "model": "tiny-vit",
        "recipe": "baseline",
        "steps": 6,
        "threads": 1,
        "val_every": 0,
        "tracker": "none",
        "log_every": 1,
        "save_every": 100,
        "data": {"batch_size": 32, "num_workers": 0, "shuffle_buffer": 64},
        "optim": {"lr": 1e-3},
    }
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            doc[k] = {**doc[k], **v}
        else:
            doc[k] = v
    return doc


@pytest.mark.slow
def test_short_run_lowers_the_loss(world, assets, tmp_path):
    # a recipe file (not a registered one): InfoNCE learns fastest in 40 steps of batch 32
    recipe = tmp_path / "infonce.json"
    recipe.write_text(
        json.dumps(
            {
                "losses": [{"kind": "infonce", "inputs": ["image", "sparse"]}],
                "lr_mult": {"image_backbone": 1.0, "text_backbone": 1.0},
            }
        )
    )
    s = train(
        parse_config(
            cfg_doc(world, assets, tmp_path / "run", recipe=str(recipe), steps=40, log_every=10, optim={"lr": 2e-3})
        )
    )
    assert s["steps"] == 40
    # mean loss of steps 31-40 vs steps 1-10 (measured ratio ~0.81)
    assert s["last_loss"] < 0.9 * s["first_loss"], s


def test_stage1_then_stage2_wiring(world, assets, tmp_path):
    s1 = train(parse_config(cfg_doc(world, assets, tmp_path / "s1", recipe="stage1", steps=3)))
    ck1 = Path(s1["checkpoint"])
    stage1_model, doc = load_checkpoint(ck1)
    assert doc["student_head"] is False and stage1_model.student is None
    s2 = train(parse_config(cfg_doc(world, assets, tmp_path / "s2", recipe="stage2", steps=3, init=str(ck1))))
    # the teacher is the stage-1 text encoder, frozen: bit-identical before and after stage 2
    before, after = s2["teacher_sha"]
    assert before == after == state_fingerprint(stage1_model.text)
    # stage 2 trained the text encoder itself (it is not the teacher any more)
    stage2_model, doc2 = load_checkpoint(s2["checkpoint"])
    assert state_fingerprint(stage2_model.text) != before
    # the student head is in the bundle and used at inference
    b = load_bundle(s2["bundle"])
    assert b.config["student_head"] is True and b.model.student is not None
    caps = ["a red circle", "a kitchen scene with a blue square"]
    with_head = b.embed_texts(caps)
    ids, mask = b.tokenizer(caps, b.model.cfg.text.max_length)
    with torch.no_grad():
        without = b.model.embed_texts(ids, mask, use_student=False)
    assert torch.allclose(with_head.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(with_head, without, atol=1e-4)


def test_bundle_round_trip(world, assets, tmp_path):
    s = train(parse_config(cfg_doc(world, assets, tmp_path / "run", steps=2)))
    b = load_bundle(s["bundle"])
    samples = read_samples(world, "val")[:5]
    img = b.embed_images([x.image for x in samples], batch_size=2)
    txt = b.embed_texts([c for x in samples for c in x.sparse], batch_size=7)
    assert img.shape == (5, 128) and txt.shape == (25, 128) and img.dtype == torch.float32
    assert torch.allclose(img.norm(dim=1), torch.ones(5), atol=1e-5)
    model, _ = load_checkpoint(s["checkpoint"])
    model.eval()
    px = torch.stack([b.transform(x.image) for x in samples])
    with torch.no_grad():
        assert torch.allclose(model.embed_images(px), img, atol=1e-5)
    assert json.loads((Path(s["bundle"]) / "vse_config.json").read_text())["format"] == "vse-bundle"


@pytest.mark.parametrize(
    "doc_change, field",
    [
        ({"optim": {"lr": "fast"}}, "optim.lr"),
        ({"data": {"batch_size": 0}}, "data"),
        ({"recipe": "stage9"}, "recipe"),
        ({"model": "no-such-model"}, "model"),
        ({"steps": None}, "steps"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_train_config_names_the_field(world, assets, tmp_path, doc_change, field):
    with pytest.raises(ConfigError, match=field):
        cfg = parse_config(cfg_doc(world, assets, tmp_path / "run", **doc_change))
        train(cfg)


def test_bad_model_and_recipe_fields(tmp_path):
    with pytest.raises(ConfigError, match=r"image: patch_drop"):
        get_model_config("tiny-vit", **{"image.patch_drop": 1.5})
    with pytest.raises(ConfigError, match=r"text.*unknown field.*'colour'"):
        get_model_config("tiny-vit", **{"text.colour": 1})
    with pytest.raises(ConfigError, match=r"losses\[0\].*kind"):
        get_recipe({"losses": [{"kind": "hinge", "inputs": ["image", "sparse"]}]})
    with pytest.raises(ConfigError, match="teacher"):
        get_recipe({"losses": [{"kind": "distill", "inputs": ["sparse", "teacher_dense"]}]})
    with pytest.raises(ConfigError, match="stage 2 needs init"):
        try:
            train(parse_config({"shards": "x", "out": str(tmp_path / "y"), "recipe": "stage2", "steps": 1}))
        except ConfigError as exc:
            assert "init" in str(exc)
            raise ConfigError("stage 2 needs init") from None


def _cli(args, cwd, **extra_env):
    """``python -m vse_train.cli train ARGS``: a real process (forked from one that has imported
    the trainer: tests/vse/forked_cli.py), its exit status, stdout and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra_env}
    return run_cli(["train", *args], cwd, env)


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(world, assets, tmp_path):
    common = [
        "--model",
        "tiny-vit",
        "--recipe",
        "baseline",
        "--shards",
        str(world),
        "--assets",
        str(assets),
        "--steps",
        "7",
        "--batch-size",
        "32",
        "threads=1",
        "val_every=0",
        "tracker=none",
        "save_every=3",
        "data.num_workers=2",
        "data.shuffle_buffer=64",
        "optim.lr=0.001",
        "optim.warmup_steps=2",
    ]
    # the uninterrupted run and the killed one are independent: they run at the same time
    with ThreadPoolExecutor(2) as pool:
        ref_job = pool.submit(_cli, common + ["--out", str(tmp_path / "ref")], tmp_path)
        # the failpoint after optimizer step 5: its state of step 3 is the newest
        killed = _cli(common + ["--out", str(tmp_path / "run")], tmp_path, **{KILL_ENV: "step@5"})
        ref = ref_job.result()
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert killed.returncode == -9, killed.stderr[-3000:]
    pointer = json.loads((tmp_path / "run" / "state" / "latest.json").read_text())
    assert pointer["step"] == 3
    assert json.loads((tmp_path / "run" / "state" / pointer["dir"] / "counters.json").read_text())["step"] == 3
    resumed = _cli(common + ["--out", str(tmp_path / "run")], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a = load_file(str(tmp_path / "ref" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    # and the run really moved: the weights differ from the stage's initial state
    init = load_backbone(str(assets / "tiny-vit" / "image")).state_dict()
    shared = [k for k in init if "image.backbone." + k in a and init[k].dim() == 2]
    assert shared and any(not torch.allclose(init[k], a["image.backbone." + k]) for k in shared)


@pytest.mark.slow
def test_two_process_accelerate_run(world, assets, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    accelerate = Path(sys.executable).with_name("accelerate")
    # accelerate's --cpu launcher expects mpirun for >1 process; the torchrun launcher + cpu=true gives gloo
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
        "--model",
        "tiny-vit",
        "--recipe",
        "baseline",
        "--shards",
        str(world),
        "--assets",
        str(assets),
        "--out",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "16",
        "cpu=true",
        "threads=1",
        "val_every=0",
        "tracker=none",
        "data.num_workers=0",
        "data.shuffle_buffer=32",
    ]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    run = json.loads((out / "run_config.json").read_text())
    assert run["num_processes"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["last_loss"] is not None
    # the optimizer state has one entry per process' RNG; both processes saved their random state
    latest = out / "state" / json.loads((out / "state" / "latest.json").read_text())["dir"]
    assert (latest / "rng-0.safetensors").exists() and (latest / "rng-1.safetensors").exists()
    load_bundle(out / "bundle")


def test_validation_selects_best_on_val(world, assets, tmp_path):
    s = train(parse_config(cfg_doc(world, assets, tmp_path / "run", steps=4, val_every=2, data={"val_max_images": 40})))
    assert s["best_step"] in (2, 4) and s["best_rsum"] is not None
    best = json.loads((Path(s["checkpoint"]) / "vse_config.json").read_text())
    assert Path(s["checkpoint"]).name == "best" and best["step"] == s["best_step"]
    assert best["metrics"]["rsum"] == pytest.approx(s["best_rsum"])
    assert 0 <= best["metrics"]["rsum"] <= 600


def test_teacher_cache_matches_the_teacher_and_reuses_texts(world, assets, tmp_path):
    from vse.models import create_model
    from vse_train.teacher import TeacherCache

    torch.manual_seed(0)
    text = create_model("tiny-vit", assets_dir=assets).text.eval()
    vocab = text.backbone.config.vocab_size
    lengths = [7, 12, 5, 12]
    ids = torch.zeros(4, 12, dtype=torch.long)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, vocab, (n,))
        mask[i, :n] = True
    cache = TeacherCache(text)
    with torch.no_grad():
        direct = text(ids, mask, normalize=False)
    first = cache(ids, mask)
    assert torch.allclose(first, direct, atol=1e-5) and (cache.hits, cache.misses) == (0, 4)
    # a batch mixing seen texts (other padding width, other order) with a new one
    ids2, mask2 = ids[[2, 0, 1]].clone(), mask[[2, 0, 1]].clone()
    ids2[1, :3] = torch.tensor([5, 6, 7])  # row 1 is now a new text
    with torch.no_grad():
        direct2 = text(ids2, mask2, normalize=False)
    second = cache(ids2, mask2)
    assert torch.allclose(second, direct2, atol=1e-5) and (cache.hits, cache.misses) == (2, 5)
    assert not second.requires_grad


@pytest.mark.slow
def test_stage2_reuses_teacher_embeddings_across_epochs(world, assets, tmp_path):
    s1 = train(parse_config(cfg_doc(world, assets, tmp_path / "s1", recipe="stage1", steps=2)))
    # the cache serves a deterministic teacher only: eval mode, clean dense text (not the default)
    doc = json.loads(Path(get_recipe_path("stage2")).read_text())
    doc.update(teacher_mode="eval", teacher_augment=False)
    recipe = tmp_path / "stage2-eval-teacher.json"
    recipe.write_text(json.dumps(doc))
    # 20 steps x 32 = 640 dense texts drawn from 512 training images (one text each)
    s2 = train(
        parse_config(cfg_doc(world, assets, tmp_path / "s2", recipe=str(recipe), steps=20, init=s1["checkpoint"]))
    )
    c = s2["teacher_cache"]
    assert c["hits"] + c["misses"] == 640
    assert c["misses"] <= 512  # at most one teacher pass per training text


def test_compositions_choose_and_export_their_own_checkpoints(world, assets, tmp_path):
    """A stage-2 run validated under both compositions of the student head keeps, for each, the
    checkpoint with the best val rSum under it, and a bundle that embeds texts that way."""
    from d2s.retrieval import retrieval_metrics
    from vse.models import l2norm

    s1 = train(parse_config(cfg_doc(world, assets, tmp_path / "s1", recipe="stage1", steps=2)))
    doc = cfg_doc(
        world,
        assets,
        tmp_path / "s2",
        recipe="stage2",
        steps=6,
        init=s1["checkpoint"],
        val_every=2,
        compositions=["l2", "raw"],
        data={"val_max_images": 40},
    )
    s2 = train(parse_config(doc))
    out = tmp_path / "s2"
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = read_samples(world, "val")[:40]
    caps = [c for x in val for c in x.sparse]
    owner = torch.tensor([i for i, x in enumerate(val) for _ in x.sparse])
    for comp in ("l2", "raw"):
        got = s2["compositions"][comp]
        rsums = {h["step"]: h[f"val_{comp}/rsum"] for h in history if f"val_{comp}/rsum" in h}
        assert sorted(rsums) == [2, 4, 6]
        assert got["best_rsum"] == max(rsums.values()) and rsums[got["best_step"]] == got["best_rsum"]
        b = load_bundle(out / f"bundle-{comp}")
        assert b.model.cfg.student.combine_eval == comp
        # the bundle composes the head's output as its name says (rebuilt here from the parts)
        ids, mask = b.tokenizer(caps[:6], b.model.cfg.text.max_length)
        with torch.no_grad():
            c = b.model.text(ids, mask, None, normalize=False)
            h = b.model.student(b.model.text.word_features(ids, mask.bool()), mask.bool())
        want = l2norm(c + (h if comp == "raw" else l2norm(h)))
        assert torch.allclose(b.embed_texts(caps[:6]), want, atol=1e-5)
        # and its val rSum, measured through the bundle, is the one it was chosen by
        img = b.embed_images([x.image for x in val])
        rsum = retrieval_metrics(img, b.embed_texts(caps), owner).to_dict()["rsum"]
        assert rsum == pytest.approx(got["best_rsum"], abs=1e-6)
    # the reference's own choice (best/, bundle/) is the l2 one
    assert s2["best_step"] == s2["compositions"]["l2"]["best_step"]
    assert load_bundle(out / "bundle").model.cfg.student.combine_eval == "l2"


def test_compositions_need_a_student_head(world, assets, tmp_path):
    with pytest.raises(ConfigError, match="compositions: recipe 'baseline' has no student head"):
        train(parse_config(cfg_doc(world, assets, tmp_path / "run", compositions=["raw"])))


def test_evaluation_composition_is_restored_after_an_error(assets):
    from vse.models import create_model, evaluation_composition

    model = create_model("tiny-vit", assets_dir=assets, student_head=True)
    with pytest.raises(RuntimeError), evaluation_composition(model, "raw"):
        assert model.student.cfg.combine_eval == "raw"
        raise RuntimeError("inside")
    assert model.student.cfg.combine_eval == "l2"
    with pytest.raises(ValueError, match="composition must be 'raw' or 'l2'"), evaluation_composition(model, "sum"):
        pass
