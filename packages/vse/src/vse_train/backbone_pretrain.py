"""Backbone pre-training: pretrained stand-ins for the tiny backbones of the CPU configs.

The paper starts every arm from pretrained backbones (ViT classified on ImageNet-21k, BERT
trained by masked language modelling). The CPU configs build tiny random backbones locally
(``vse.assets``); :func:`pretrain_backbones` pre-trains them, once, for every arm alike, on
a split that no arm trains or is evaluated on, with objectives other than image-text
retrieval:

- image backbone: multi-label *tagging*, the stand-in for ImageNet classification. Labels
  are the words of each image's sparse captions (alphanumeric words, special tokens left
  out) that occur in the captions of at least ``min_label_count`` training images and of at
  most ``max_label_fraction`` of them (function words such as "a" are in every caption
  and would be free points). The rule reads any captioned dataset, not only the synthetic
  world. ``AutoModelForImageClassification`` (``problem_type="multi_label_classification"``)
  on the assets' backbone config, binary cross-entropy per label.
- text backbone: masked language modelling (``AutoModelForMaskedLM``, BERT for the CPU
  configs; ``DataCollatorForLanguageModeling`` with the assets' tokenizer) on the split's
  sparse captions and kept dense texts, truncated to the model's ``text.dense_max_length``.

Both phases: AdamW, linear warm-up then cosine to 0 (``vse_train.schedule``, the trainer's).
Only the backbones (``model.base_model``: ``ViTModel`` / ``ResNetModel`` / ``BertModel``,
no pooler, no task head) are saved, over the random ones in ``<assets>/<model>/image`` and
``<assets>/<model>/text``, with the same config, so ``vse.models.load_backbone`` loads them
unchanged. Each file is written in a temporary dir and moved in with ``os.replace``.
``<assets>/<model>/backbone_pretrain.json`` records the params, steps, seconds, first/last
training losses and the held-out metrics before (the random init) and after: tagging mAP and
micro-F1 (threshold 0.5) and MLM accuracy / loss on a fixed masking of the held-out texts.
The held-out part is ``holdout_fraction`` of the split's images (their captions and texts
included), drawn with the seed.

Seeded: the same params, data and thread count give bit-identical weights; the caller's
global torch RNG is left as it was. Training uses ``torch.get_num_threads()`` threads.
Measured cost and held-out figures: ``packages/vse/README.md`` ("Backbone pre-training").
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from d2s.atomic import atomic_write_json
from d2s.config import to_dict
from d2s.shards import iter_samples, read_manifest, split_shards
from vse.assets import SPECIAL, words_of
from vse.models import asset_paths, backbone_from_config, get_model_config, load_backbone

from .config import OptimConfig
from .schedule import lr_scheduler

log = logging.getLogger(__name__)

RECORD = "backbone_pretrain.json"  # in <assets>/<model>/

_ALNUM = re.compile(r"[a-z0-9]+")
_DECODE_ONCE_BYTES = 512 << 20  # decode the whole split up front when its uint8 pixels fit in this


@dataclass
class BackbonePretrainParams:
    split: str = "pretrain"  # shards split to train on (disjoint from train/val/test)
    image_steps: int = 400  # tagging steps (0: keep the random image backbone)
    text_steps: int = 350  # MLM steps (0: keep the random text backbone)
    batch_size: int = 64  # images per tagging step and texts per MLM step
    lr: float = 1e-3  # AdamW, linear warmup then cosine to 0
    text_lr: float | None = None  # the MLM's, when it differs (None: lr)
    weight_decay: float = 0.01  # not on biases and norms
    warmup_steps: int = 30
    seed: int = 0
    mlm_probability: float = 0.15
    min_label_count: int = 5  # a tag must be in the captions of at least this many training images
    max_label_fraction: float = 0.5  # ... and of at most this share of them
    holdout_fraction: float = 0.05  # images held out for the before/after metrics
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if not self.split:
            raise ValueError("split must be a split name, e.g. 'pretrain'")
        for name in ("image_steps", "text_steps", "warmup_steps", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "min_label_count", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "text_lr"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be > 0, got {v}")
        if not 0 <= self.weight_decay < 1:
            raise ValueError(f"weight_decay must be in [0, 1), got {self.weight_decay}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if not 0 < self.max_label_fraction <= 1:
            raise ValueError(f"max_label_fraction must be in (0, 1], got {self.max_label_fraction}")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")


# ---- data ------------------------------------------------------------------------------------


def check_split(shards_dir: str | Path, split: str) -> list[str]:
    """The split's shard paths; a missing split raises FileNotFoundError naming it, the shards
    dir and how to get one."""
    try:
        return split_shards(shards_dir, split)
    except KeyError:
        present = sorted(read_manifest(shards_dir)["splits"])
        raise FileNotFoundError(
            f"backbone pre-training: {shards_dir} has no split {split!r} (splits present: {present}). It trains on a "
            f"split that no arm trains or is evaluated on: write one (synthetic world: `pretrain: N` in the "
            f"synthetic-world params, e.g. pretrain: 4000) or choose an existing one with pretrain_backbones.split / "
            f"--pretrain-split"
        ) from None


def _read_split(shards_dir: str | Path, split: str) -> list:
    samples = list(iter_samples(check_split(shards_dir, split)))
    if len(samples) < 2:
        raise ValueError(
            f"backbone pre-training: split {split!r} of {shards_dir} has {len(samples)} sample(s); it needs at least 2"
        )
    return samples


def _holdout(n: int, p: BackbonePretrainParams) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng([p.seed, 7]).permutation(n)
    n_hold = min(n - 1, max(1, round(p.holdout_fraction * n)))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL), re.IGNORECASE)


def image_tags(sample) -> set[str]:
    """The candidate tags of an image: alphanumeric words of its sparse captions, with the
    tokenizer's special tokens ("[MASK]", ...) taken out first (the word "mask" stays a word)."""
    return {w for cap in sample.sparse for w in words_of(_SPECIAL_RE.sub(" ", cap)) if _ALNUM.fullmatch(w)}


def label_vocab(tag_sets: list[set[str]], min_count: int, max_fraction: float) -> list[str]:
    """Words tagged on at least ``min_count`` and at most ``max_fraction`` of the images, sorted."""
    df = Counter(w for tags in tag_sets for w in tags)
    top = max_fraction * len(tag_sets)
    return sorted(w for w, c in df.items() if c >= min_count and c <= top)


def _schedule(opt: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps (at most ``steps - 1``), then cosine to 0 at ``steps``."""
    cosine = OptimConfig(
        lr=opt.defaults["lr"], schedule="cosine", warmup_steps=min(warmup, max(steps - 1, 0)), min_lr_ratio=0.0
    )
    return lr_scheduler(opt, cosine, steps_per_epoch=1, total_steps=steps)


def _optimizer(model: torch.nn.Module, p: BackbonePretrainParams, lr: float) -> torch.optim.Optimizer:
    decay = [q for q in model.parameters() if q.requires_grad and q.ndim >= 2]
    rest = [q for q in model.parameters() if q.requires_grad and q.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": p.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator, lengths: list[int] | None = None):
    """``steps`` index batches over passes of a fresh permutation each (a short last batch is skipped).

    With ``lengths`` (texts), each pass is cut into pools of 32 batches, each pool sorted by
    length and cut into batches, and the batches of the pass are shuffled: a batch pads to
    texts of similar length (sparse captions with sparse captions, dense texts together)."""
    batch_size = min(batch_size, n)
    length_t = torch.as_tensor(lengths) if lengths is not None else None

    def one_pass() -> list[torch.Tensor]:
        perm = torch.randperm(n, generator=generator)
        if length_t is not None:
            pool = 32 * batch_size
            perm = torch.cat([c[length_t[c].argsort(stable=True)] for c in perm.split(pool)])
        out = [b for b in perm.split(batch_size) if len(b) == batch_size]
        return [out[i] for i in torch.randperm(len(out), generator=generator)] if length_t is not None else out

    queue: list[torch.Tensor] = []
    for _ in range(steps):
        if not queue:
            queue = one_pass()[::-1]
        yield queue.pop()


def _loss_summary(losses: list[float]) -> dict:
    k = min(10, len(losses))
    return {
        "first": losses[0] if losses else None,
        "last": losses[-1] if losses else None,
        "first10_mean": float(np.mean(losses[:k])) if k else None,
        "last10_mean": float(np.mean(losses[-k:])) if k else None,
    }


# ---- metrics ---------------------------------------------------------------------------------


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per column: mean over the positives of the precision at their rank (NaN without positives)."""
    order = scores.argsort(dim=0, descending=True, stable=True)
    t = targets.gather(0, order).float()
    hits = t.cumsum(0)
    ranks = torch.arange(1, t.shape[0] + 1, dtype=torch.float32)[:, None]
    pos = t.sum(0)
    return torch.where(pos > 0, (hits / ranks * t).sum(0) / pos.clamp_min(1), torch.full_like(pos, float("nan")))


def tagging_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    ap = average_precision(logits, targets)
    pred = logits > 0
    tp = (pred & targets.bool()).sum().item()
    fp = (pred & ~targets.bool()).sum().item()
    fn = (~pred & targets.bool()).sum().item()
    return {
        "map": float(ap[~ap.isnan()].mean()) if (~ap.isnan()).any() else float("nan"),
        "micro_f1": 2 * tp / max(1, 2 * tp + fp + fn),
        "labels_with_positives": int((~ap.isnan()).sum()),
        "positive_rate": float(targets.float().mean()),
    }


# ---- the two phases --------------------------------------------------------------------------


class _Pixels:
    """uint8 pixels of a list of images: decoded once when they fit in memory, else per batch."""

    def __init__(self, images: list[bytes], transform):
        self.images, self.t = images, transform
        self.cache = None
        if len(images) * 3 * transform.size**2 <= _DECODE_ONCE_BYTES:
            self.cache = torch.cat([transform.decode(images[i : i + 256]) for i in range(0, len(images), 256)])

    def __call__(self, idx) -> torch.Tensor:
        idx = [int(i) for i in idx]
        u8 = self.cache[idx] if self.cache is not None else self.t.decode([self.images[i] for i in idx])
        return self.t.normalize(u8)


def _fit(bar, step_loss, opt, sched) -> list[float]:
    """The training loop of both phases: ``step_loss(batch)`` (forward), backward, step; the losses."""
    losses: list[float] = []
    for b in bar:
        loss = step_loss(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.4f}")
    return losses


def _tag_targets(samples, train_idx, p: BackbonePretrainParams) -> tuple[list[str], torch.Tensor]:
    """The tag vocabulary (from the training images) and every image's multi-hot target."""
    tags = [image_tags(s) for s in samples]
    labels = label_vocab([tags[i] for i in train_idx], p.min_label_count, p.max_label_fraction)
    if not labels:
        raise ValueError(
            f"backbone pre-training: no tag survives min_label_count={p.min_label_count} and max_label_fraction={p.max_label_fraction} "
            f"on the {len(train_idx)} training images of split {p.split!r}"
        )
    col = {w: j for j, w in enumerate(labels)}
    targets = torch.zeros(len(samples), len(labels))
    for i, ts in enumerate(tags):
        for w in ts:
            if w in col:
                targets[i, col[w]] = 1.0
    return labels, targets


def _tagging_model(image_dir: Path, labels: list[str]) -> torch.nn.Module:
    """A multi-label classifier on the assets' image backbone config, holding the random backbone."""
    from transformers import AutoConfig, AutoModelForImageClassification

    clf_cfg = copy.deepcopy(AutoConfig.from_pretrained(str(image_dir)))
    clf_cfg.num_labels = len(labels)
    clf_cfg.id2label = dict(enumerate(labels))
    clf_cfg.label2id = {w: j for j, w in enumerate(labels)}
    clf_cfg.problem_type = "multi_label_classification"
    model = AutoModelForImageClassification.from_config(clf_cfg)
    model.base_model.load_state_dict(load_backbone(str(image_dir)).state_dict())  # the random backbone, strict
    return model


@torch.no_grad()
def _eval_tagging(model, pixels: _Pixels, hold_idx, targets: torch.Tensor, batch_size: int) -> dict:
    model.eval()
    logits = torch.cat(
        [model(pixel_values=pixels(hold_idx[i : i + batch_size])).logits for i in range(0, len(hold_idx), batch_size)]
    )
    model.train()
    return tagging_metrics(logits.float(), targets[torch.as_tensor(hold_idx)])


def _train_image(
    paths, cfg, samples, train_idx, hold_idx, p: BackbonePretrainParams, progress: bool, tag: str
) -> tuple[dict, torch.nn.Module | None]:
    from tqdm import tqdm

    from vse.transforms import ImageTransform

    t0 = time.time()
    labels, targets = _tag_targets(samples, train_idx, p)
    model = _tagging_model(paths["image"], labels)
    transform = ImageTransform(cfg.image.image_size, list(cfg.image.mean), list(cfg.image.std))
    pixels = _Pixels([s.image for s in samples], transform)
    before = _eval_tagging(model, pixels, hold_idx, targets, p.eval_batch_size)
    opt = _optimizer(model, p, p.lr)
    sched = _schedule(opt, p.image_steps, p.warmup_steps)
    gen = torch.Generator().manual_seed(p.seed * 1000 + 1)
    train_t = torch.as_tensor(train_idx)
    model.train()
    bar = tqdm(
        _batches(len(train_idx), p.batch_size, p.image_steps, gen),
        total=p.image_steps,
        desc=f"pretrain {tag} image (tagging)",
        disable=not progress,
    )

    def step_loss(b) -> torch.Tensor:
        idx = train_t[b]
        return F.binary_cross_entropy_with_logits(model(pixel_values=pixels(idx)).logits, targets[idx])

    losses = _fit(bar, step_loss, opt, sched)
    info = {
        "objective": "multi-label tagging (words of the sparse captions), binary cross-entropy",
        "model": type(model).__name__,
        "backbone": type(model.base_model).__name__,
        "steps": p.image_steps,
        "num_labels": len(labels),
        "labels": labels,
        "train_images": len(train_idx),
        "heldout_images": len(hold_idx),
        "loss": _loss_summary(losses),
        "heldout_before": before,
        "heldout_after": _eval_tagging(model, pixels, hold_idx, targets, p.eval_batch_size),
        "seconds": round(time.time() - t0, 2),
    }
    return info, model.base_model


def _mlm_examples(tok, samples, idx, max_len: int) -> list[dict]:
    """The sparse captions and kept dense texts of images ``idx``, tokenized for the MLM collator."""
    texts = [t for i in idx for t in (list(samples[i].sparse) + [d.text for d in samples[i].kept_dense()])]
    enc = tok(texts, truncation=True, max_length=max_len, return_special_tokens_mask=True)
    return [
        {"input_ids": ids, "attention_mask": m, "special_tokens_mask": s}
        for ids, m, s in zip(enc["input_ids"], enc["attention_mask"], enc["special_tokens_mask"])
    ]


def _mlm_model(paths, tok) -> torch.nn.Module:
    """A masked-LM model on the assets' text backbone config, holding the random backbone."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    hf_cfg = AutoConfig.from_pretrained(str(paths["text"]))
    if len(tok) > hf_cfg.vocab_size:
        raise ValueError(
            f"backbone pre-training: tokenizer of {paths['tokenizer']} has {len(tok)} tokens, text backbone only {hf_cfg.vocab_size}"
        )
    model = AutoModelForMaskedLM.from_config(copy.deepcopy(hf_cfg))
    model.base_model.load_state_dict(load_backbone(str(paths["text"])).state_dict())  # the random backbone, strict
    if hf_cfg.tie_word_embeddings:
        model.tie_weights()
    return model


@torch.no_grad()
def _eval_mlm(model, eval_batches: list[dict]) -> dict:
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for b in eval_batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        sel = b["labels"] != -100
        correct += (logits[sel].argmax(-1) == b["labels"][sel]).sum().item()
        loss_sum += F.cross_entropy(logits[sel].float(), b["labels"][sel], reduction="sum").item()
        total += int(sel.sum())
    model.train()
    return {"mlm_accuracy": correct / max(1, total), "mlm_loss": loss_sum / max(1, total), "masked_tokens": total}


def _train_text(
    paths, cfg, samples, train_idx, hold_idx, p: BackbonePretrainParams, progress: bool, tag: str
) -> tuple[dict, torch.nn.Module | None]:
    from tqdm import tqdm
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    max_len = cfg.text.dense_max_length
    train_ex, hold_ex = _mlm_examples(tok, samples, train_idx, max_len), _mlm_examples(tok, samples, hold_idx, max_len)
    hold_ex.sort(key=lambda e: len(e["input_ids"]))  # evaluation batches of similar lengths (less padding)
    collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=p.mlm_probability, return_tensors="pt")
    # one fixed masking of the held-out texts, used before and after (its own RNG stream)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed * 1000 + 3)
        eval_batches = [collator(hold_ex[i : i + p.eval_batch_size]) for i in range(0, len(hold_ex), p.eval_batch_size)]
    model = _mlm_model(paths, tok)
    before = _eval_mlm(model, eval_batches)
    opt = _optimizer(model, p, p.text_lr or p.lr)
    sched = _schedule(opt, p.text_steps, p.warmup_steps)
    gen = torch.Generator().manual_seed(p.seed * 1000 + 2)
    model.train()
    lengths = [len(e["input_ids"]) for e in train_ex]
    bar = tqdm(
        _batches(len(train_ex), p.batch_size, p.text_steps, gen, lengths),
        total=p.text_steps,
        desc=f"pretrain {tag} text (MLM)",
        disable=not progress,
    )

    def step_loss(b) -> torch.Tensor:
        batch = collator([train_ex[int(i)] for i in b])
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    losses = _fit(bar, step_loss, opt, sched)
    info = {
        "objective": "masked language modelling (sparse captions + kept dense texts)",
        "model": type(model).__name__,
        "backbone": type(model.base_model).__name__,
        "steps": p.text_steps,
        "max_length": max_len,
        "train_texts": len(train_ex),
        "train_dense_texts": sum(len(samples[i].kept_dense()) for i in train_idx),
        "heldout_texts": len(hold_ex),
        "loss": _loss_summary(losses),
        "heldout_before": before,
        "heldout_after": _eval_mlm(model, eval_batches),
        "seconds": round(time.time() - t0, 2),
    }
    return info, model.base_model


# ---- saving ----------------------------------------------------------------------------------


def _weights_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def save_backbone(base_model: torch.nn.Module, folder: Path) -> None:
    """Save ``base_model``'s weights as the backbone in ``folder`` (same config as the one there).

    The weights go into a fresh backbone built from ``folder``'s config (strict: the trained
    model must have exactly the backbone's parameters), saved in a temporary sibling dir, and
    each file is moved in with ``os.replace``."""
    fresh = backbone_from_config(folder)
    fresh.load_state_dict(base_model.state_dict())
    tmp = folder.with_name(folder.name + ".pretrain-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(str(tmp))
    new = {f.name for f in tmp.iterdir()}
    for f in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".safetensors"):  # weights last
        os.replace(f, folder / f.name)
    for f in folder.iterdir():
        if (
            f.is_file()
            and f.name not in new
            and (f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json"))
        ):
            f.unlink()  # weights of another format / sharding left from before
    tmp.rmdir()


def pretrain_backbones(
    assets_dir: str | Path,
    shards_dir: str | Path,
    model_name: str,
    params: BackbonePretrainParams | None = None,
    *,
    progress: bool = True,
) -> dict:
    """Train the image backbone (tagging) and the text backbone (MLM) of ``model_name``'s assets on
    ``params.split`` of ``shards_dir``, save them over the random ones, write ``backbone_pretrain.json``;
    returns its content."""
    p = params or BackbonePretrainParams()
    cfg = get_model_config(model_name)
    paths = asset_paths(assets_dir, cfg.name)
    record = paths["image"].parent / RECORD
    start = _check_assets(cfg, paths, record)
    t0 = time.time()
    samples = _read_split(shards_dir, p.split)
    train_idx, hold_idx = _holdout(len(samples), p)
    log.info(
        "backbone pre-training %s on split %r: %d images (%d held out), %d image steps, %d text steps, %d torch threads",
        cfg.name,
        p.split,
        len(samples),
        len(hold_idx),
        p.image_steps,
        p.text_steps,
        torch.get_num_threads(),
    )
    result: dict = {
        "model": cfg.name,
        "split": p.split,
        "shards": str(shards_dir),
        "params": to_dict(p),
        "images": len(samples),
        "threads": torch.get_num_threads(),
        "trained": [],
    }
    with torch.random.fork_rng(devices=[]):
        for what, steps, fn in (("image", p.image_steps, _train_image), ("text", p.text_steps, _train_text)):
            result[what] = None
            if steps > 0:
                torch.manual_seed(p.seed)
                info, backbone = fn(paths, cfg, samples, train_idx, hold_idx, p, progress, cfg.name)
                save_backbone(backbone, paths[what])
                result[what] = info
                result["trained"].append(what)
                _log_phase(cfg.name, what, steps, info)
    result["weights"] = {"before": start, "after": {k: _weights_digest(paths[k]) for k in ("image", "text")}}
    result["seconds"] = round(time.time() - t0, 2)
    atomic_write_json(record, result)
    return result


def _check_assets(cfg, paths: dict[str, Path], record: Path) -> dict[str, str]:
    """Fail unless ``cfg``'s backbones are locally built, present and not yet pre-trained; returns
    the digests of their weights as they are."""
    if cfg.image.backbone.build is None or cfg.text.backbone.build is None:
        raise ValueError(
            f"backbone pre-training: model {cfg.name!r} loads pretrained backbones; pre-training is for locally built (CPU) configs"
        )
    for k in ("image", "text", "tokenizer"):
        if not (paths[k] / ("tokenizer.json" if k == "tokenizer" else "config.json")).exists():
            raise FileNotFoundError(
                f"backbone pre-training: {paths[k]} is missing; build the assets first (vse build-assets)"
            )
    start = {k: _weights_digest(paths[k]) for k in ("image", "text")}
    if record.exists():
        doc = json.loads(record.read_text())
        prev = doc.get("weights", {}).get("after", {})
        again = [k for k in ("image", "text") if prev.get(k) == start[k] and k in doc.get("trained", [])]
        if again:
            raise ValueError(
                f"backbone pre-training: the {' and '.join(again)} backbone(s) in {paths['image'].parent} are already "
                "pre-trained (backbone_pretrain.json); rebuild the assets (vse build-assets) to start again"
            )
    return start


def _log_phase(name: str, what: str, steps: int, info: dict) -> None:
    log.info(
        "backbone pre-training %s %s: %d steps in %.1f s, held-out %s -> %s",
        name,
        what,
        steps,
        info["seconds"],
        _brief(info["heldout_before"]),
        _brief(info["heldout_after"]),
    )


def _brief(m: dict) -> str:
    keys = [k for k in ("map", "micro_f1", "mlm_accuracy") if k in m]
    return ", ".join(f"{k} {m[k]:.3f}" for k in keys)


def summary(result: dict) -> dict:
    """The held-out before/after figures of a :func:`pretrain_backbones` result (for stage results and the CLI)."""
    out = {"seconds": result["seconds"]}
    for what in ("image", "text"):
        info = result.get(what)
        if info:
            out[what] = {
                "steps": info["steps"],
                "seconds": info["seconds"],
                "before": {k: v for k, v in info["heldout_before"].items() if k in ("map", "micro_f1", "mlm_accuracy")},
                "after": {k: v for k, v in info["heldout_after"].items() if k in ("map", "micro_f1", "mlm_accuracy")},
            }
    return out
