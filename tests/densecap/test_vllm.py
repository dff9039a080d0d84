"""Against a REAL vLLM server (tiny LLaVA built locally, served from .venv-vllm).

The model is random, so captions are gibberish: these tests check plumbing (provenance,
concurrency, resumption, failure records), never caption quality. Without .venv-vllm
they fail with a message naming scripts/setup_vllm_cpu.sh.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from d2s.shards import completed_shards, iter_samples
from tests.densecap.conftest import REPO, densecap_cmd, run_densecap

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def big_world(tmp_path_factory) -> Path:
    """60 images in 10 shards of 6: enough shards to interrupt a run between two of them."""
    from d2s.synthetic import SplitSpec, WorldConfig, write_world

    out = tmp_path_factory.mktemp("bigworld") / "shards"
    write_world(out, WorldConfig(), [SplitSpec("train", 60)], shard_size=6, progress=False)
    return out


@pytest.fixture(scope="module", autouse=True)
def offline_run(request, tmp_path_factory):
    """The offline-engine job, launched at module start so that it loads while the server starts
    (both spend most of their start-up importing vLLM in separate processes)."""
    if not any(it.name == "test_offline_engine_in_vllm_venv" for it in request.session.items):
        yield None
        return
    from densecap.testing.vllm_server import server_env

    vllm_python = request.getfixturevalue("vllm_python")
    tiny_vlm = request.getfixturevalue("tiny_vlm")
    world_dir = request.getfixturevalue("world_dir")
    tmp = tmp_path_factory.mktemp("offline")
    out = tmp / "out"
    env = server_env(tmp / "scratch", vllm_python)
    # this checkout's densecap, whatever editable install .venv-vllm holds (it may be shared)
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / "packages" / p / "src") for p in ("core", "densecap"))
    # the engine core in the densecap process itself: one process fewer to start (vLLM's
    # start-up is mostly imports); the path through vllm.LLM.chat is the same
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env["OMP_NUM_THREADS"] = "1"  # as vLLM's worker process binds itself (VLLMServer's inline_worker)
    log_file = open(tmp / "offline.log", "w")
    proc = subprocess.Popen(
        [
            str(vllm_python),
            "-m",
            "densecap.cli",
            "run",
            "--no-progress",
            "--input",
            str(world_dir),
            "-S",
            "split=val",
            "--caption-source",
            "vllm-offline",
            "-C",
            f"model={tiny_vlm}",
            "-C",
            "prompt_family=llava",
            "-C",
            "sampling.max_tokens=16",
            "--filters",
            "none",
            "--out",
            str(out),
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        yield proc, out, tmp / "offline.log"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()


def server_args(srv, *extra: str) -> list[str]:
    return [
        "--caption-source",
        "vllm-server",
        "-C",
        f"base_url={srv.base_url}",
        "-C",
        "model=tiny-llava",
        "-C",
        "prompt_family=llava",
        *extra,
    ]


def samples_of(out: Path):
    return list(iter_samples(sorted(completed_shards(out))))


def wait_for_shards(out: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    t0 = time.time()
    while len(completed_shards(out)) < n:
        if proc.poll() is not None:
            raise AssertionError(f"densecap exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("no shard completed in time")
        time.sleep(0.05)


def start_densecap(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        densecap_cmd() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )


def test_captions_arrive_with_provenance_and_concurrency(vllm_server, world_dir, tmp_path):
    from d2s.config import from_dict
    from densecap.config import RunConfig
    from densecap.run import run

    out = tmp_path / "out"
    cfg = from_dict(
        RunConfig,
        {
            "source": {"type": "shards", "params": {"path": str(world_dir)}},
            "caption_sources": [
                {
                    "type": "vllm-server",
                    "params": {
                        "base_url": vllm_server.base_url,
                        "model": "tiny-llava",
                        "prompt_family": "llava",
                        "concurrency": 4,
                        "sampling": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 24, "seed": 7},
                    },
                }
            ],
            "out": str(out),
            "progress": False,
            "batch_size": 16,
        },
    )
    summary = run(cfg)
    assert summary["complete"] and summary["captions_requested"] == 32 and summary["caption_errors"] == 0
    got = samples_of(out)
    assert len(got) == 32
    for s in got:
        (d,) = s.dense
        assert d.source == "vllm-server" and d.model == "tiny-llava" and d.prompt == "Describe this image in detail."
        assert d.params == {"temperature": 0.7, "top_p": 0.95, "max_tokens": 24.0, "seed": 7.0}
        assert d.scores["completion_tokens"] > 0 and d.scores["prompt_tokens"] > 16  # 16 image tokens + text
        assert not d.error and d.text and d.verdict != "error"
        assert d.verdict == "keep" or d.verdict in summary or f"dropped_{d.verdict}" in summary
    stats = [
        json.loads(Path(p).with_name(Path(p).name[:-4] + ".stats.json").read_text()) for p in completed_shards(out)
    ]
    assert max(st["max_in_flight"]["vllm-server"] for st in stats) > 1  # requests really overlapped
    assert sum(st["completion_tokens"] for st in stats) == sum(int(s.dense[0].scores["completion_tokens"]) for s in got)
    assert json.loads((out / "report" / "summary.json").read_text())["captions"] == 32


def test_unreachable_server_and_wrong_model_fail_clearly(vllm_server, world_dir, tmp_path):
    from densecap.testing.vllm_server import free_port

    r = run_densecap(
        [
            "run",
            "--input",
            str(world_dir),
            "--out",
            str(tmp_path / "a"),
            "--caption-source",
            "vllm-server",
            "-C",
            f"base_url=http://127.0.0.1:{free_port()}",
            "-C",
            "connect_timeout=2",
        ]
    )
    assert r.returncode == 2 and "cannot reach" in r.stderr and "Is the server running?" in r.stderr
    r = run_densecap(
        [
            "run",
            "--input",
            str(world_dir),
            "--out",
            str(tmp_path / "b"),
            *server_args(vllm_server, "-C", "model=llava-13b"),
        ]
    )
    assert r.returncode == 2
    assert "model 'llava-13b' is not served" in r.stderr and "tiny-llava" in r.stderr
    assert not completed_shards(tmp_path / "a") and not completed_shards(tmp_path / "b")


def test_sigkilled_run_resumes_with_every_image_once(vllm_server, big_world, tmp_path):
    out = tmp_path / "out"
    args = [
        "run",
        "--no-progress",
        "--input",
        str(big_world),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--filters",
        "length,garbage",
        *server_args(vllm_server, "-C", "concurrency=2", "-C", "sampling.max_tokens=48"),
    ]
    proc = start_densecap(args)
    wait_for_shards(out, proc, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(completed_shards(out))
    assert done_at_kill < 10, "the run finished before it could be killed: make the job longer"
    r = run_densecap(args[:])
    assert r.returncode == 0, r.stderr[-3000:]
    got = samples_of(out)
    keys = Counter(s.key for s in got)
    expected = {f"train_{i:08d}" for i in range(60)}
    assert set(keys) == expected and set(keys.values()) == {1}
    assert all(len(s.dense) == 1 and not s.dense[0].error for s in got)
    assert not list(out.glob("*.tmp"))
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] == 60


def test_offline_engine_in_vllm_venv(offline_run):
    proc, out, log_path = offline_run
    proc.wait(timeout=600)
    assert proc.returncode == 0, log_path.read_text()[-4000:]
    got = samples_of(out)
    assert len(got) == 8
    for s in got:
        (d,) = s.dense
        assert d.source == "vllm-offline" and d.model == "tiny-llava" and d.prompt == "Describe this image in detail."
        assert d.text and not d.error and 0 < d.scores["completion_tokens"] <= 16 and d.params["max_tokens"] == 16.0


def test_server_killed_mid_run_records_failures_then_rerun_fills(vllm_server, vllm_spare_server, big_world, tmp_path):
    out = tmp_path / "out"
    args = [
        "run",
        "--no-progress",
        "--input",
        str(big_world),
        "--out",
        str(out),
        "--batch-size",
        "3",
        "--filters",
        "none",
        *server_args(
            vllm_server,
            "-C",
            "concurrency=3",
            "-C",
            "sampling.max_tokens=48",
            "-C",
            "max_retries=2",
            "-C",
            "backoff=0.1",
            "-C",
            "max_consecutive_failures=3",
            "-C",
            "timeout=20",
        ),
    ]
    proc = start_densecap(args)
    try:
        wait_for_shards(out, proc, 1)
        vllm_server.kill()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, err[-3000:]
    assert "rerun the same command to fill them" in err
    got = samples_of(out)
    failed = [s for s in got if s.dense[0].error]
    assert failed, "the killed server should leave failure records"
    for s in failed:
        (d,) = s.dense
        assert d.verdict == "error" and not d.text and d.source == "vllm-server"
        assert "failed after 3 attempts" in d.error or "not attempted" in d.error
    stats = [
        json.loads(Path(p).with_name(Path(p).name[:-4] + ".stats.json").read_text()) for p in completed_shards(out)
    ]
    assert sum(st["caption_errors"] for st in stats) == len(failed) and any(st["retries"] > 0 for st in stats)
    rejects = [json.loads(x) for p in (out / "rejects").glob("*.jsonl") for x in p.read_text().splitlines()]
    assert {r["key"] for r in rejects if r["reason"] == "error"} == {s.key for s in failed}
    assert len(got) < 60 and not (out / "manifest.json").exists()
    clean = {
        p: (Path(p).stat().st_mtime_ns, Path(p).stat().st_size)
        for p, st in completed_shards(out).items()
        if not st["caption_errors"]
    }
    assert clean, "some shard should have finished before the server died"

    # the server comes back on ANOTHER port (a server of the same model started with the session's
    # takes its place); transport settings change too (issue 11, item 1): failures are filled,
    # finished shards stay as they are
    from tests.conftest import take_over

    old_url = vllm_server.base_url
    take_over(vllm_server, vllm_spare_server)
    assert vllm_server.base_url != old_url
    moved = [
        "run",
        "--no-progress",
        "--input",
        str(big_world),
        "--out",
        str(out),
        "--batch-size",
        "3",
        "--filters",
        "none",
        *server_args(
            vllm_server,
            "-C",
            "concurrency=5",
            "-C",
            "sampling.max_tokens=48",
            "-C",
            "max_retries=4",
            "-C",
            "timeout=60",
            "-C",
            "connect_timeout=5",
        ),
    ]
    r = run_densecap(moved)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "another configuration" not in r.stderr
    assert {p: (Path(p).stat().st_mtime_ns, Path(p).stat().st_size) for p in clean} == clean
    got = samples_of(out)
    keys = Counter(s.key for s in got)
    assert set(keys) == {f"train_{i:08d}" for i in range(60)} and set(keys.values()) == {1}
    assert all(len(s.dense) == 1 and not s.dense[0].error and s.dense[0].text for s in got)
    stats = [
        json.loads(Path(p).with_name(Path(p).name[:-4] + ".stats.json").read_text()) for p in completed_shards(out)
    ]
    assert any(st["filled"] for st in stats) and all(st["caption_errors"] == 0 for st in stats)
