"""Tiny randomly initialised dual encoders (CLIP, SigLIP) and a text-only BERT, fully offline.

    python -m densecap.testing.tiny_clip OUT_DIR [--family clip|siglip|bert] [--seed 0]

Each builder writes a model directory with ``save_pretrained`` (weights, config, tokenizer,
image processor, and for the dual encoders a processor), so that
``AutoModel.from_pretrained(out_dir)`` and ``AutoProcessor.from_pretrained(out_dir)`` load it
with no hub access. The towers are 2-layer transformers of width 32 on 32x32 images (8x8
patches); the tokenizer is a byte-level BPE trained here on a few sentences about shapes and
colours. Their embeddings carry no meaning: they exist to exercise the real loading and
embedding path of a sentence scorer (``vse.scoring``) in tests. The BERT has no image tower,
for the test that a scorer refuses it. Same seed, same weights; each builds in well under a second.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# ``</s>`` must not be id 2: CLIP reads a text eos id of 2 as the legacy "highest id is the end" rule
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]

_CORPUS = (
    "A photo of a red circle next to a small blue square on a grey background. "
    "There are three shapes: a large green triangle at the top left, a yellow star and a purple ring. "
    "The orange square is below the white circle and to the right of the black triangle. "
    "A kitchen scene with a wooden table, two cups and a bowl of fruit near the window. "
    "The shapes have flat colours. Nothing else is in the picture."
)

_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
_IMAGE = {"image_size": 32, "patch_size": 8}


def build_tokenizer(out_dir: Path, vocab_size: int = 400, model_max_length: int = 77):
    """A byte-level BPE trained on a few sentences; adds ``<s>`` ... ``</s>`` around a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 10, trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
    fast.save_pretrained(out_dir)
    return fast


def _special_ids(tokenizer) -> dict[str, int]:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _save(model, out_dir: Path, tokenizer, image_processor, processor_cls, family: str, seed: int) -> Path:
    model.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    processor_cls(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    (out_dir / "d2s_tiny_model.json").write_text(json.dumps({"family": family, "seed": seed}) + "\n")
    log.info("tiny %s written to %s", family, out_dir)
    return out_dir


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``CLIPModel`` with its tokenizer, image processor and processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, model_max_length=77)
    config = CLIPConfig(
        text_config={**_TOWER, **_special_ids(tokenizer), "max_position_embeddings": 77},
        vision_config={**_TOWER, **_IMAGE},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    return _save(model, out_dir, tokenizer, image_processor, CLIPProcessor, "clip", seed)


def build_tiny_siglip(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``SiglipModel`` (text limit 64, padded to it as SigLIP is trained)."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, model_max_length=64)
    config = SiglipConfig(
        text_config={**_TOWER, **_special_ids(tokenizer), "max_position_embeddings": 64, "projection_size": 32},
        vision_config={**_TOWER, **_IMAGE},
    )
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    return _save(model, out_dir, tokenizer, image_processor, SiglipProcessor, "siglip", seed)


def build_tiny_bert(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``BertModel`` and its tokenizer: a text encoder with no image tower."""
    import torch
    from transformers import BertConfig, BertModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, model_max_length=64)
    config = BertConfig(**_TOWER, **_special_ids(tokenizer), max_position_embeddings=64)
    torch.manual_seed(seed)
    BertModel(config).eval().save_pretrained(out_dir)
    (out_dir / "d2s_tiny_model.json").write_text(json.dumps({"family": "bert", "seed": seed}) + "\n")
    return out_dir


BUILDERS = {"clip": build_tiny_clip, "siglip": build_tiny_siglip, "bert": build_tiny_bert}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m densecap.testing.tiny_clip", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="directory to write the model into")
    ap.add_argument("--family", choices=sorted(BUILDERS), default="clip")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(BUILDERS[args.family](args.out_dir, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
