"""Build a tiny randomly initialised LLaVA model directory that vLLM can serve, fully offline.

    python -m densecap.testing.tiny_vlm OUT_DIR [--seed 0]

About 0.5 M parameters: a 2-layer CLIP vision tower (32x32 images, 8x8 patches -> 16
image tokens) and a 2-layer Llama (hidden 128, head_dim 64) with a byte-level BPE
tokenizer trained here. Its text is gibberish; it exists to exercise the real serving
path (chat template, image processor, weights loading) in tests and benchmarks.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# Jinja chat template: OpenAI-style content parts; an image part becomes "<image>\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set prefix = 'SYSTEM: ' %}"
    "{% elif message['role'] == 'user' %}{% set prefix = 'USER: ' %}"
    "{% else %}{% set prefix = 'ASSISTANT: ' %}{% endif %}"
    "{{ prefix }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS = (
    "A photo of a red car parked on a quiet street next to a tall building. "
    "Two people walk a dog across the green park under a blue sky with white clouds. "
    "The image shows a small kitchen with a wooden table, a bowl of fruit and a window. "
    "In the center there is a large circle, to the left a small square and a yellow triangle. "
    "Describe this image in detail. The scene is bright and colourful, with many objects."
)


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_llava(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a servable tiny LLaVA model directory to ``out_dir`` and return it."""
    import torch
    from transformers import LlavaForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(out_dir)
    model = LlavaForConditionalGeneration(_llava_config(tokenizer)).eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    _save_processor(out_dir, tokenizer)
    n = _rename_vision_weights(out_dir / "model.safetensors")
    (out_dir / "d2s_tiny_vlm.json").write_text(json.dumps({"family": "llava", "seed": seed}) + "\n")
    log.info("tiny LLaVA written to %s (%d tensors)", out_dir, n)
    return out_dir


def _llava_config(tokenizer):
    """A 2-layer CLIP vision tower (32x32 images, 16 patches) and a 2-layer Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        image_seq_length=16,
    )


def _save_processor(out_dir: Path, tokenizer) -> None:
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)


def _rename_vision_weights(st: Path) -> int:
    """transformers 5.x names the vision weights ``vision_tower.embeddings...``; vLLM's LLaVA
    loader expects the CLIPVisionModel layout ``vision_tower.vision_model.embeddings...``."""
    from safetensors.torch import load_file, save_file

    renamed = {}
    for k, v in load_file(st).items():
        for prefix in ("model.vision_tower.", "vision_tower."):
            if k.startswith(prefix) and not k.startswith(prefix + "vision_model."):
                k = prefix + "vision_model." + k[len(prefix) :]
                break
        renamed[k] = v.contiguous()
    save_file(renamed, st, metadata={"format": "pt"})
    return len(renamed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m densecap.testing.tiny_vlm", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="directory to write the model into")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    build_tiny_llava(args.out_dir, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
