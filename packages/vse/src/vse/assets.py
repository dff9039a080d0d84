"""Local assets for the CPU configs: a word-level tokenizer built from the shards' texts and tiny
randomly initialised HF backbones, written with ``save_pretrained`` so that training loads them
back through the ordinary ``from_pretrained`` path.

Layout of an assets dir::

    tokenizer/            PreTrainedTokenizerFast (tokenizer.json: word-level vocab = special tokens + every word seen,
                          words split by the tokenizer's own normaliser and pre-tokenizer)
    <model>/image/        HF vision backbone (config.json + model.safetensors)
    <model>/text/         HF text backbone
    <model>/processor/    HF image processor (size, mean, std)
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch

from d2s.atomic import atomic_write_json
from d2s.shards import iter_samples, split_shards

from .models import ModelConfig, asset_paths, get_model_config, list_models

log = logging.getLogger(__name__)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class WordSplitter:
    """Texts -> words exactly as the BERT tokenizer of :func:`build_tokenizer` splits them before
    looking words up: ``tokenizers``' BertNormalizer (control characters dropped, CJK characters
    apart, accents stripped, lower case) then BertPreTokenizer (whitespace, punctuation apart)."""

    def __init__(self) -> None:
        from tokenizers import normalizers, pre_tokenizers

        self.normalizer = normalizers.BertNormalizer(lowercase=True)
        self.pre_tokenizer = pre_tokenizers.BertPreTokenizer()

    def __call__(self, text: str) -> list[str]:
        return [w for w, _ in self.pre_tokenizer.pre_tokenize_str(self.normalizer.normalize_str(text))]


_SPLITTER: WordSplitter | None = None


def words_of(text: str) -> list[str]:
    """The words of ``text`` as the BERT tokenizer splits it (see :class:`WordSplitter`)."""
    global _SPLITTER
    if _SPLITTER is None:
        _SPLITTER = WordSplitter()
    return _SPLITTER(text)


def collect_vocab(shards_dir: str | Path, splits: tuple[str, ...] = ("train",), min_count: int = 1) -> list[str]:
    """Every word of the splits' sparse captions and kept dense texts seen ``min_count`` times, sorted."""
    counts: Counter[str] = Counter()
    for split in splits:
        for s in iter_samples(split_shards(shards_dir, split)):
            for t in s.sparse:
                counts.update(words_of(t))
            for d in s.kept_dense():
                counts.update(words_of(d.text))
    return sorted(w for w, c in counts.items() if c >= min_count)


def build_tokenizer(words: list[str], out_dir: str | Path):
    """A BERT-style tokenizer whose vocabulary is the special tokens plus every word seen."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(SPECIAL + [w for w in words if w not in SPECIAL])}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok = BertTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tok.save_pretrained(str(out))
    return tok


def _hf_config(build: dict, **extra):
    from transformers import AutoConfig

    kwargs = {k: v for k, v in build.items() if k != "model_type"}
    kwargs.update(extra)
    return AutoConfig.for_model(build["model_type"], **kwargs)


def build_backbones(cfg: ModelConfig, assets_dir: str | Path, vocab_size: int, seed: int = 0) -> dict[str, str]:
    """Save the config's tiny random backbones + image processor under ``assets_dir/<model>/``."""
    from transformers import AutoModel, ViTImageProcessor

    paths = asset_paths(assets_dir, cfg.name)
    torch.manual_seed(seed)
    written = {}
    for what, bcfg, extra in (
        ("image", cfg.image.backbone, {}),
        ("text", cfg.text.backbone, {"vocab_size": vocab_size}),
    ):
        if bcfg.build is None:
            continue
        hf_cfg = _hf_config(bcfg.build, **extra)
        kwargs = {"add_pooling_layer": False} if hf_cfg.model_type in ("vit", "bert", "swin") else {}
        model = AutoModel.from_config(hf_cfg, **kwargs)
        model.save_pretrained(str(paths[what]))
        written[what] = str(paths[what])
    proc = ViTImageProcessor(
        do_resize=True,
        size={"height": cfg.image.image_size, "width": cfg.image.image_size},
        image_mean=list(cfg.image.mean),
        image_std=list(cfg.image.std),
    )
    proc.save_pretrained(str(paths["processor"]))
    written["processor"] = str(paths["processor"])
    return written


def build_assets(
    shards_dir: str | Path,
    out_dir: str | Path,
    models: list[str] | None = None,
    *,
    splits: tuple[str, ...] = ("train",),
    seed: int = 0,
) -> dict:
    """Build the tokenizer from the shards' texts and the backbones of every locally built config."""
    out = Path(out_dir)
    words = collect_vocab(shards_dir, splits)
    if not words:
        raise ValueError(f"{shards_dir}: no caption text found in splits {list(splits)}")
    tok = build_tokenizer(words, out / "tokenizer")
    names = models or [n for n in list_models() if get_model_config(n).image.backbone.build is not None]
    built = {}
    for name in names:
        cfg = get_model_config(name)
        built[name] = build_backbones(cfg, out, len(tok), seed)
    summary = {"vocab_size": len(tok), "models": built, "shards": str(shards_dir), "splits": list(splits)}
    atomic_write_json(out / "assets.json", summary)
    log.info("assets in %s: vocabulary of %d, models %s", out, len(tok), sorted(built))
    return summary


def have_assets(assets_dir: str | Path, model_name: str) -> bool:
    p = asset_paths(assets_dir, model_name)
    return (
        all((p[k] / "config.json").exists() for k in ("image", "text")) and (p["tokenizer"] / "tokenizer.json").exists()
    )


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
