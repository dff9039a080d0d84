"""vllm-server: an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, or any server that
speaks the same API), images sent as base64 data-URL content parts."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import random
import time
from dataclasses import dataclass, field

from d2s.schema import DenseText, Sample, sniff_image_ext

from .base import CAPTION_SOURCES, CaptionSource, CaptionSourceError, SamplingParams
from .prompts import get_prompt

log = logging.getLogger(__name__)

MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def data_url(image: bytes, max_side: int = 0) -> str:
    """The image as a ``data:`` URL; re-encoded as PNG only when it must be resized."""
    ext = sniff_image_ext(image) or "jpg"
    if max_side > 0:
        from PIL import Image

        with Image.open(io.BytesIO(image)) as im:
            if max(im.size) > max_side:
                im = im.convert("RGB")
                im.thumbnail((max_side, max_side))
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                image, ext = buf.getvalue(), "png"
    return f"data:{MIME[ext]};base64,{base64.b64encode(image).decode('ascii')}"


class _Retryable(Exception):
    pass


@CAPTION_SOURCES.register("vllm-server")
class VLLMServerSource(CaptionSource):
    """A running vLLM OpenAI-compatible server (`vllm serve MODEL`): many requests in flight
    (asyncio, bounded by 'concurrency'), per-request timeouts, retries with exponential backoff on
    5xx / 429 / connection errors. /v1/models is checked at start (clear error if the server is
    unreachable or 'model' is not served). Prompts come from the prompt_family registry."""

    @dataclass
    class Params:
        base_url: str = "http://127.0.0.1:8000"
        model: str = ""  # '' = the only model the server serves
        api_key: str = ""
        prompt_family: str = "generic"
        prompt: str = ""  # overrides the family's instruction text
        system: str = ""
        sampling: SamplingParams = field(default_factory=SamplingParams)
        concurrency: int = 8
        timeout: float = 120.0
        connect_timeout: float = 10.0
        max_retries: int = 4
        backoff: float = 0.5
        max_backoff: float = 8.0
        max_consecutive_failures: int = 8  # then the source is marked down and the run stops
        image_max_side: int = 0  # >0: downscale larger images before sending

        def __post_init__(self) -> None:
            if self.concurrency < 1:
                raise ValueError("concurrency must be >= 1")
            if self.max_retries < 0:
                raise ValueError("max_retries must be >= 0")

    def __init__(self, params: "VLLMServerSource.Params", *, label: str = ""):
        super().__init__(params, label=label)
        self.family = get_prompt(params.prompt_family)
        self.prompt = params.prompt or self.family.text
        self.base_url = params.base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        self.client = None
        self._sem: asyncio.Semaphore | None = None
        self._consecutive_failures = 0
        self.retries = 0
        self.in_flight = 0
        self.max_in_flight = 0  # observed request concurrency (reported in shard stats)

    async def start(self) -> None:
        import httpx

        p = self.params
        headers = {"Authorization": f"Bearer {p.api_key}"} if p.api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(p.timeout, connect=p.connect_timeout),
            limits=httpx.Limits(max_connections=p.concurrency, max_keepalive_connections=p.concurrency),
        )
        self._sem = asyncio.Semaphore(p.concurrency)
        url = f"{self.base_url}/v1/models"
        try:
            r = await self.client.get("/v1/models", timeout=p.connect_timeout + 5)
        except httpx.HTTPError as exc:
            await self.close()
            raise CaptionSourceError(
                f"vllm-server: cannot reach {url} ({type(exc).__name__}: {exc}). Is the server running? "
                f"Start one with e.g. `vllm serve MODEL --port PORT` and pass base_url."
            ) from None
        if r.status_code != 200:
            await self.close()
            raise CaptionSourceError(f"vllm-server: GET {url} answered HTTP {r.status_code}: {r.text[:300]}")
        served = [m.get("id") for m in r.json().get("data", [])]
        if p.model and p.model not in served:
            await self.close()
            raise CaptionSourceError(f"vllm-server: model {p.model!r} is not served by {self.base_url}; served models: {served}")
        if not p.model:
            if len(served) != 1:
                await self.close()
                raise CaptionSourceError(f"vllm-server: set 'model'; {self.base_url} serves {served}")
        self.model = p.model or served[0]
        log.info("vllm-server: %s serves %s (concurrency %d)", self.base_url, self.model, p.concurrency)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def request_body(self, sample: Sample) -> dict:
        p = self.params
        body = {
            "model": self.model,
            "messages": self.family.messages(data_url(sample.image, p.image_max_side), p.prompt, p.system),
            "temperature": p.sampling.temperature,
            "top_p": p.sampling.top_p,
            "max_tokens": p.sampling.max_tokens,
        }
        if p.sampling.seed is not None:
            body["seed"] = p.sampling.seed
        return body

    async def _post(self, body: dict) -> dict:
        import httpx

        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            r = await self.client.post("/v1/chat/completions", json=body)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc or 'connection failed'}") from None
        finally:
            self.in_flight -= 1
        if r.status_code >= 500 or r.status_code == 429:
            raise _Retryable(f"HTTP {r.status_code}: {r.text[:200]}")
        if r.status_code != 200:
            raise CaptionSourceError(f"HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    async def caption_one(self, sample: Sample) -> DenseText:
        p = self.params
        assert self._sem is not None and self.client is not None, "call start() first"
        async with self._sem:
            if self.fatal:
                return self.failed(f"not attempted: {self.fatal}")
            body = self.request_body(sample)
            t0 = time.perf_counter()
            last = ""
            for attempt in range(p.max_retries + 1):
                if attempt:
                    delay = min(p.max_backoff, p.backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                    self.retries += 1
                    log.debug("retry %d for %s in %.2fs: %s", attempt, sample.key, delay, last)
                    await asyncio.sleep(delay)
                    if self.fatal:
                        break
                try:
                    doc = await self._post(body)
                except _Retryable as exc:
                    last = str(exc)
                    continue
                except CaptionSourceError as exc:
                    return self.failed(f"request rejected: {exc}")
                self._consecutive_failures = 0
                choice = doc["choices"][0]
                usage = doc.get("usage") or {}
                scores = {
                    "prompt_tokens": float(usage.get("prompt_tokens", 0)),
                    "completion_tokens": float(usage.get("completion_tokens", 0)),
                    "latency_s": round(time.perf_counter() - t0, 4),
                }
                if choice.get("finish_reason") == "length":
                    scores["truncated"] = 1.0
                return self.dense((choice["message"].get("content") or "").strip(), scores=scores)
            self._consecutive_failures += 1
            if self._consecutive_failures >= p.max_consecutive_failures and not self.fatal:
                self.fatal = (
                    f"{self._consecutive_failures} consecutive requests to {self.base_url} failed "
                    f"after {p.max_retries} retries each (last: {last})"
                )
                log.error("vllm-server: %s", self.fatal)
            return self.failed(f"failed after {p.max_retries + 1} attempts: {last}")

    async def caption(self, samples: list[Sample]) -> list[DenseText | None]:
        return list(await asyncio.gather(*(self.caption_one(s) for s in samples)))
