"""vllm-server: an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, or any server that
speaks the same API), images sent as base64 data-URL content parts."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def parse_reply(doc: Any) -> tuple[str, str, dict[str, float]]:
    """(text, finish_reason, usage) of a chat-completions reply; _Retryable when it is malformed."""

    def bad(why: str) -> _Retryable:
        return _Retryable(f"malformed reply (HTTP 200): {why}: {str(doc)[:200]}")

    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    choices = doc.get("choices")
    if not isinstance(choices, list) or not choices:
        raise bad("no 'choices'")
    choice = choices[0]
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        raise bad("choices[0] has no 'message'")
    content = choice["message"].get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise bad("choices[0].message.content is not a string")
    usage_doc = doc.get("usage") if isinstance(doc.get("usage"), dict) else {}
    usage = {}
    for k in ("prompt_tokens", "completion_tokens"):
        v = usage_doc.get(k, 0)
        usage[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0
    return content.strip(), str(choice.get("finish_reason") or ""), usage


@dataclass
class Endpoint:
    """One server of a vllm-server source, with what happened on it (reported in shard stats)."""

    url: str
    client: Any = None
    in_flight: int = 0
    ok: int = 0  # requests answered
    failed: int = 0  # failed attempts (connection errors, 5xx / 429, malformed replies)
    consecutive: int = 0  # failed attempts in a row
    down: str = ""  # why it was taken out ('' = in use)

    def record(self) -> dict[str, Any]:
        return {"ok": self.ok, "failed": self.failed, **({"down": self.down} if self.down else {})}


def _clean_url(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@CAPTION_SOURCES.register("vllm-server")
class VLLMServerSource(CaptionSource):
    """A running vLLM OpenAI-compatible server (`vllm serve MODEL`): many requests in flight
    (asyncio, bounded by 'concurrency'), per-request timeouts, retries with exponential backoff on
    5xx / 429 / connection errors / malformed 200 replies, honouring Retry-After. /v1/models is
    checked at start (clear error if the server is unreachable or 'model' is not served). The API
    key comes from $OPENAI_API_KEY or api_key_file, never from the configuration. Prompts come from
    the prompt_family registry. Several servers (base_urls: one per GPU or node): each request goes
    to the least busy one in use; a server whose attempts fail max_consecutive_failures times in a
    row is taken out (recorded in the shard stats) and its requests are retried on the others."""

    # where the server is and how it is asked: changing these keeps the captions already made
    transport_params = (
        "base_url",
        "base_urls",
        "api_key_env",
        "api_key_file",
        "concurrency",
        "timeout",
        "connect_timeout",
        "max_retries",
        "backoff",
        "max_backoff",
        "max_retry_after",
        "max_consecutive_failures",
    )
    # a secret in the configuration would be written to disk (densecap-config, pipeline records)
    refused_params = {
        "api_key": "a key in the configuration would be written to disk (densecap-config.rank*.json, "
        "the pipeline's resolved.yaml and stage records); put it in the OPENAI_API_KEY "
        "environment variable, or in a file named by api_key_file"
    }

    @dataclass
    class Params:
        base_url: str = "http://127.0.0.1:8000"
        # several servers of the same model (one per GPU or node); when given, base_url is not used
        base_urls: list[str] = field(default_factory=list)
        model: str = ""  # '' = the only model the server serves
        api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the API key ('' = none)
        api_key_file: str = ""  # or a file holding it (first line); never the key itself
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
        max_retry_after: float = 60.0  # cap on a server's Retry-After (429 / 503)
        # one server: then the source is marked down and the run stops; several servers: then that
        # server is taken out (its requests move to the others) and the run stops when none is left
        max_consecutive_failures: int = 8
        image_max_side: int = 0  # >0: downscale larger images before sending

        def __post_init__(self) -> None:
            if self.concurrency < 1:
                raise ValueError("concurrency must be >= 1")
            if self.max_retries < 0:
                raise ValueError("max_retries must be >= 0")

    def __init__(self, params: VLLMServerSource.Params, *, label: str = ""):
        super().__init__(params, label=label)
        self.family = get_prompt(params.prompt_family)
        self.prompt = params.prompt or self.family.text
        urls = [_clean_url(u) for u in (params.base_urls or [params.base_url])]
        if len(set(urls)) != len(urls):
            raise CaptionSourceError(f"vllm-server: base_urls lists a server twice: {urls}")
        self.endpoints = [Endpoint(u) for u in urls]
        self.base_url = urls[0]
        self._next = 0  # rotates ties between equally busy servers
        self._sem: asyncio.Semaphore | None = None
        self._consecutive_failures = 0
        self.retries = 0
        self.in_flight = 0
        self.max_in_flight = 0  # observed request concurrency (reported in shard stats)

    def api_key(self) -> str:
        """The key from api_key_file, else from the environment variable api_key_env ('' = none)."""
        p = self.params
        if p.api_key_file:
            path = Path(p.api_key_file).expanduser()
            try:
                lines = path.read_text().splitlines()
            except OSError as exc:
                raise CaptionSourceError(f"vllm-server: api_key_file {path}: cannot read it ({exc})") from None
            key = lines[0].strip() if lines else ""
            if not key:
                raise CaptionSourceError(f"vllm-server: api_key_file {path}: the first line is empty")
            return key
        return os.environ.get(p.api_key_env, "").strip() if p.api_key_env else ""

    @property
    def client(self):
        """The first server's client (None before start / after close)."""
        return self.endpoints[0].client

    @property
    def multi(self) -> bool:
        return len(self.endpoints) > 1

    async def _check(self, ep: Endpoint, headers: dict) -> list[str]:
        """Open ep's client and return the models it serves; CaptionSourceError when it cannot be used."""
        import httpx

        p = self.params
        ep.client = httpx.AsyncClient(
            base_url=ep.url,
            headers=headers,
            timeout=httpx.Timeout(p.timeout, connect=p.connect_timeout),
            limits=httpx.Limits(max_connections=p.concurrency, max_keepalive_connections=p.concurrency),
        )
        url = f"{ep.url}/v1/models"
        try:
            r = await ep.client.get("/v1/models", timeout=p.connect_timeout + 5)
        except httpx.HTTPError as exc:
            raise CaptionSourceError(
                f"vllm-server: cannot reach {url} ({type(exc).__name__}: {exc}). Is the server running? "
                f"Start one with e.g. `vllm serve MODEL --port PORT` and pass base_url."
            ) from None
        if r.status_code != 200:
            raise CaptionSourceError(f"vllm-server: GET {url} answered HTTP {r.status_code}: {r.text[:300]}")
        try:
            return [m.get("id") for m in r.json().get("data", [])]
        except (ValueError, AttributeError, TypeError):
            raise CaptionSourceError(
                f"vllm-server: GET {url} answered HTTP 200 without a model list: {r.text[:300]!r}"
            ) from None

    async def start(self) -> None:
        p = self.params
        key = self.api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._sem = asyncio.Semaphore(p.concurrency)
        unreachable: list[str] = []
        for ep in self.endpoints:
            try:
                served = await self._check(ep, headers)
            except CaptionSourceError as exc:
                if not self.multi:
                    await self.close()
                    raise
                # several servers: one that is down now is recorded and left out; the others work
                ep.down = f"at start: {exc}"
                unreachable.append(str(exc))
                log.warning("%s (left out)", exc)
                continue
            if p.model and p.model not in served:
                await self.close()
                raise CaptionSourceError(
                    f"vllm-server: model {p.model!r} is not served by {ep.url}; served models: {served}"
                )
            if not p.model and len(served) != 1:
                await self.close()
                raise CaptionSourceError(f"vllm-server: set 'model'; {ep.url} serves {served}")
            model = p.model or served[0]
            if self.model and model != self.model:
                await self.close()
                raise CaptionSourceError(
                    f"vllm-server: the servers serve different models ({self.model!r}, {model!r}); set 'model'"
                )
            self.model = model
        if not any(not ep.down for ep in self.endpoints):
            await self.close()
            raise CaptionSourceError("vllm-server: none of the servers can be reached: " + "; ".join(unreachable))
        log.info(
            "vllm-server: %s serve %s (concurrency %d)",
            ", ".join(ep.url for ep in self.endpoints if not ep.down),
            self.model,
            p.concurrency,
        )

    async def close(self) -> None:
        for ep in self.endpoints:
            if ep.client is not None:
                await ep.client.aclose()
                ep.client = None

    def endpoint_stats(self) -> dict[str, dict[str, Any]]:
        """url -> requests answered, failed attempts and, for a server taken out, why."""
        return {ep.url: ep.record() for ep in self.endpoints}

    def _pick(self, avoid: Endpoint | None = None) -> Endpoint | None:
        """The least busy server in use (not ``avoid`` when another is in use); None when none is left."""
        live = [ep for ep in self.endpoints if not ep.down]
        if avoid is not None and len(live) > 1:
            live = [ep for ep in live if ep is not avoid]
        if not live:
            return None
        self._next += 1
        n = len(live)
        return min((live[(self._next + i) % n] for i in range(n)), key=lambda ep: ep.in_flight)

    def _attempt_failed(self, ep: Endpoint, why: str) -> None:
        ep.failed += 1
        ep.consecutive += 1
        if self.multi and not ep.down and ep.consecutive >= self.params.max_consecutive_failures:
            ep.down = f"{ep.consecutive} consecutive failed attempts (last: {why})"
            log.error("vllm-server: taking %s out: %s", ep.url, ep.down)
            if all(e.down for e in self.endpoints) and not self.fatal:
                self.fatal = "every server is out: " + "; ".join(f"{e.url}: {e.down}" for e in self.endpoints)
                log.error("vllm-server: %s", self.fatal)

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

    async def _post(self, body: dict, ep: Endpoint | None = None) -> dict:
        import httpx

        ep = ep or self.endpoints[0]
        self.in_flight += 1
        ep.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            r = await ep.client.post("/v1/chat/completions", json=body)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc or 'connection failed'}") from None
        finally:
            self.in_flight -= 1
            ep.in_flight -= 1
        if r.status_code >= 500 or r.status_code == 429:
            raise _Retryable(f"HTTP {r.status_code}: {r.text[:200]}", parse_retry_after(r.headers.get("retry-after")))
        if r.status_code != 200:
            raise CaptionSourceError(f"HTTP {r.status_code}: {r.text[:300]}")
        try:
            return r.json()
        except ValueError:
            raise _Retryable(f"malformed reply (HTTP 200): not JSON: {r.text[:200]!r}") from None

    async def caption_one(self, sample: Sample) -> DenseText:
        p = self.params
        assert self._sem is not None and any(ep.client is not None for ep in self.endpoints), "call start() first"
        async with self._sem:
            if self.fatal:
                return self.failed(f"not attempted: {self.fatal}")
            body = self.request_body(sample)
            t0 = time.perf_counter()
            last = ""
            retry_after: float | None = None
            ep: Endpoint | None = None
            for attempt in range(p.max_retries + 1):
                if attempt:
                    delay = min(p.max_backoff, p.backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                    if retry_after is not None:  # the server said when to come back
                        delay = max(delay, min(retry_after, p.max_retry_after))
                    self.retries += 1
                    log.debug("retry %d for %s in %.2fs: %s", attempt, sample.key, delay, last)
                    await asyncio.sleep(delay)
                    if self.fatal:
                        break
                ep = self._pick(avoid=ep)  # a retry goes to another server when there is one
                if ep is None:
                    last = last or "no server left"
                    break
                try:
                    text, finish_reason, usage = parse_reply(await self._post(body, ep))
                except _Retryable as exc:
                    last, retry_after = (f"{ep.url}: {exc}" if self.multi else str(exc)), exc.retry_after
                    self._attempt_failed(ep, str(exc))
                    continue
                except CaptionSourceError as exc:
                    return self.failed(f"request rejected: {exc}")
                ep.ok += 1
                ep.consecutive = 0
                self._consecutive_failures = 0
                scores = {**usage, "latency_s": round(time.perf_counter() - t0, 4)}
                if finish_reason == "length":
                    scores["truncated"] = 1.0
                return self.dense(text, scores=scores)
            self._consecutive_failures += 1
            if not self.multi and self._consecutive_failures >= p.max_consecutive_failures and not self.fatal:
                self.fatal = (
                    f"{self._consecutive_failures} consecutive requests to {self.base_url} failed "
                    f"after {p.max_retries} retries each (last: {last})"
                )
                log.error("vllm-server: %s", self.fatal)
            return self.failed(f"failed after {p.max_retries + 1} attempts: {last}")

    async def caption(self, samples: list[Sample]) -> list[DenseText | None]:
        return list(await asyncio.gather(*(self.caption_one(s) for s in samples)))
