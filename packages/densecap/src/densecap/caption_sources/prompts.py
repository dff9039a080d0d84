"""Prompts per VLM family, as OpenAI chat messages with content parts.

The server (or ``vllm.LLM.chat``) applies the model's own chat template to these
messages, so no special tokens are ever written here. Pick a family by name
(``prompt_family``); add one with :func:`register_prompt`, or from another package with a
``densecap.prompt_families`` entry point (a :class:`PromptFamily` instance).
"""

from __future__ import annotations

from dataclasses import dataclass

from d2s.registry import Registry


@dataclass(frozen=True)
class PromptFamily:
    name: str
    text: str
    system: str = ""
    image_first: bool = True
    doc: str = ""

    def messages(self, image_url: str, text: str = "", system: str = "") -> list[dict]:
        text = text or self.text
        system = system or self.system
        image_part = {"type": "image_url", "image_url": {"url": image_url}}
        text_part = {"type": "text", "text": text}
        parts = [image_part, text_part] if self.image_first else [text_part, image_part]
        msgs: list[dict] = [{"role": "system", "content": system}] if system else []
        msgs.append({"role": "user", "content": parts})
        return msgs


PROMPT_FAMILIES: Registry[PromptFamily] = Registry(
    "prompt_family", "densecap.prompt_families", base=PromptFamily, name_attr=None, items="instance"
)


def register_prompt(family: PromptFamily) -> PromptFamily:
    """Add (or replace) a family under its own name."""
    return PROMPT_FAMILIES.add(family.name, family, replace=True)


def get_prompt(name: str) -> PromptFamily:
    return PROMPT_FAMILIES.get(name)


register_prompt(
    PromptFamily(
        "generic",
        "Describe this image in detail: every visible object with its colour, size and position, "
        "what the objects are doing and how they relate to each other. Write one paragraph of plain prose.",
        doc="any chat VLM",
    )
)
# D2S-VSE used LLaVA-v1 with LLaVA's own detailed-description instruction.
register_prompt(PromptFamily("llava", "Describe this image in detail.", doc="LLaVA / LLaVA-1.5 / LLaVA-NeXT"))
register_prompt(
    PromptFamily(
        "qwen2-vl",
        "Describe this image in detail, covering every object, its attributes and its position.",
        system="You are a helpful assistant.",
        doc="Qwen2-VL / Qwen2.5-VL",
    )
)
register_prompt(
    PromptFamily(
        "sharegpt4v",
        "Analyze the image in a comprehensive and detailed manner.",
        doc="ShareGPT4V-style captioners",
    )
)
