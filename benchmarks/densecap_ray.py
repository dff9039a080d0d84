"""densecap's Ray executor vs its local executor, against the same real vLLM server.

    .venv/bin/python benchmarks/densecap_ray.py [--images 256] [--shard-size 32] [--concurrency 8]
        [--max-tokens 32] [--rounds 2] [--replicas 1] [--base-url URL --model NAME] [--json FILE]

Without --base-url it builds the tiny LLaVA and starts a vLLM CPU server from .venv-vllm (see
scripts/setup_vllm_cpu.sh); it also starts one local Ray cluster (densecap.executors.ray_cluster, 2 CPUs)
for the Ray runs, and stops both at the end. The same images (a synthetic world written as
shards) go through `densecap run` as a fresh process each time, alternating:

  local   --executor local (this process writes the units; `concurrency` requests in flight)
  ray     --executor ray --ray-address <the cluster>, `replicas` actors (default 1, so that the
          server sees the same number of requests in flight as with local)

For each run it records the wall time of the process and the summary's `seconds` (planning
excluded) and `ray_startup_s` (joining the cluster until every replica has started its caption
source). It reports Ray/local in captions per second two ways: end to end (start-up included)
and in steady state (captions / (seconds - ray_startup_s)), target >= 0.9, and Ray's fixed
start-up cost: ray_startup_s when joining a running cluster, plus the time to start a local
cluster (`ray start --head`) when no address is given. Runs alternate so that drift in machine
load hits both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def densecap(args: list[str], env: dict[str, str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "densecap.cli", "run", "--no-progress", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=3600,
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"densecap failed ({r.returncode}): {r.stderr[-3000:]}")
    return wall, json.loads(r.stdout)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="local+ray pairs, alternating")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--base-url", default="")
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from d2s.synthetic import SplitSpec, WorldConfig, write_world
    from densecap.executors.ray_cluster import RayCluster
    from densecap.testing.vllm_server import tiny_server_url

    with tempfile.TemporaryDirectory(prefix="densecap-raybench-") as tmp:
        tmp = Path(tmp)
        world = tmp / "world"
        write_world(world, WorldConfig(), [SplitSpec("train", args.images)], shard_size=args.shard_size, progress=False)
        cluster = None
        with tiny_server_url(tmp, args.base_url, name=args.model, max_num_seqs=max(8, args.concurrency)) as base_url:
            try:
                cluster = RayCluster(num_cpus=2, num_gpus=0, object_store_memory=200_000_000).start()
                print(f"local Ray cluster started in {cluster.start_seconds:.1f}s", file=sys.stderr)
                runs = measure(args, tmp, world, base_url, cluster)
            finally:
                if cluster is not None:
                    cluster.stop(graceful=False)
    result = summarize(args, runs, cluster)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def measure(args: argparse.Namespace, tmp: Path, world: Path, base_url: str, cluster) -> dict[str, list[dict]]:
    """A warm-up, then ``rounds`` pairs of local and Ray runs; one record per run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **cluster.client_env()}
    common = [
        *("--input", str(world), "--filters", "length,repetition,garbage", "-F", "length.min_words=1"),
        *("--caption-source", "vllm-server", "-C", f"base_url={base_url}", "-C", f"model={args.model}"),
        *("-C", "prompt_family=llava", "-C", f"concurrency={args.concurrency}"),
        *("-C", f"sampling.max_tokens={args.max_tokens}"),
    ]
    # warm-up (server caches, page cache), not counted
    densecap([*common, "--out", str(tmp / "warm"), "--set", "caption_sources.0.params.sampling.max_tokens=4"], env)
    ray_args = ["--executor", "ray", "--ray-address", cluster.address, "--set", f"executor.replicas={args.replicas}"]
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    for i in range(args.rounds):
        for kind in ("local", "ray"):
            extra = ray_args if kind == "ray" else []
            wall, s = densecap([*common, "--out", str(tmp / f"{kind}{i}"), *extra], env)
            assert s["captions_requested"] == args.images and s["caption_errors"] == 0, s
            startup = float(s.get("ray_startup_s", 0.0))
            rec = {
                "wall_s": round(wall, 2),
                "seconds": s["seconds"],
                "ray_startup_s": startup,
                "captions_per_s": round(args.images / s["seconds"], 3),
                "steady_captions_per_s": round(args.images / (s["seconds"] - startup), 3),
            }
            runs[kind].append(rec)
            print(f"round {i} {kind:5s}: {json.dumps(rec)}", file=sys.stderr)
    return runs


def summarize(args: argparse.Namespace, runs: dict[str, list[dict]], cluster) -> dict:
    def mean(kind: str, key: str) -> float:
        return statistics.mean(r[key] for r in runs[kind])

    return {
        "images": args.images,
        "units": -(-args.images // args.shard_size),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "replicas": args.replicas,
        "rounds": args.rounds,
        "runs": runs,
        "local_captions_per_s": round(mean("local", "captions_per_s"), 3),
        "ray_captions_per_s": round(mean("ray", "captions_per_s"), 3),
        "ray_steady_captions_per_s": round(mean("ray", "steady_captions_per_s"), 3),
        "ratio_end_to_end": round(mean("ray", "captions_per_s") / mean("local", "captions_per_s"), 3),
        "ratio_steady": round(mean("ray", "steady_captions_per_s") / mean("local", "captions_per_s"), 3),
        "ray_startup_s": round(mean("ray", "ray_startup_s"), 2),
        "local_cluster_start_s": round(cluster.start_seconds, 2) if cluster else None,
        "wall_local_s": round(mean("local", "wall_s"), 2),
        "wall_ray_s": round(mean("ray", "wall_s"), 2),
    }


def report(result: dict) -> None:
    print(f"local executor          : {result['local_captions_per_s']:7.2f} captions/s")
    print(
        f"ray executor, end to end: {result['ray_captions_per_s']:7.2f} captions/s  (ratio {result['ratio_end_to_end']:.3f})"
    )
    print(
        f"ray executor, steady    : {result['ray_steady_captions_per_s']:7.2f} captions/s  (ratio {result['ratio_steady']:.3f}, target >= 0.9)"
    )
    print(
        f"ray fixed start-up      : {result['ray_startup_s']:.1f}s joining a running cluster "
        f"(+ {result['local_cluster_start_s']:.1f}s to start a local one)"
    )


if __name__ == "__main__":
    sys.exit(main())
