"""Issue 13: densecap with Ray as the executor, on a REAL local Ray cluster.

Real `ray start --head` clusters on 127.0.0.1 (densecap.executors.ray_cluster), real `densecap run`
processes, real SIGKILLs of Ray worker processes and of the driver, the fault-injecting HTTP server
of test_reliability (tests/densecap/fake_openai.py) for the kill tests, and the real vLLM CPU server
for the tests marked vllm. After each cluster is stopped, no process of it may be left. The
cluster the tests join is the session's (``ray_cluster``, tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from d2s.processes import alive
from d2s.shards import completed_shards, iter_samples
from tests.densecap.conftest import REPO, densecap_cmd, run_densecap
from tests.densecap.fake_openai import FakeOpenAI
from tests.densecap.test_reliability import cmdline, image_folder, wait_until

pytestmark = pytest.mark.ray


def samples_of(out: Path):
    return list(iter_samples(sorted(completed_shards(out))))


def by_key(out: Path) -> dict:
    return {s.key: s for s in samples_of(out)}


def stats_of(out: Path) -> dict[str, dict]:
    return {Path(p).name: st for p, st in completed_shards(out).items()}


def ray_env(rc) -> dict[str, str]:
    return rc.client_env()


def ray_args(rc, *extra: str) -> list[str]:
    return ["--executor", "ray", "--ray-address", rc.address, *extra]


def unit_writers(rc) -> list[int]:
    """pids of the cluster's UnitWriter actors (Ray names the process ray::UnitWriter...)."""
    return [p for p in rc.pids() if cmdline(p).startswith("ray::UnitWriter")]


def start_cli(args: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return subprocess.Popen(
        densecap_cmd() + ["run", "--no-progress", *map(str, args)],
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )


COMPARED_STATS = (
    "count",
    "captions_requested",
    "captions_kept",
    "captions_dropped",
    "captions_missing",
    "caption_errors",
    "images_rejected",
    "config_hash",
    "image_ext",
    "filters",
    "caption_sources",
)


@pytest.mark.slow
def test_ray_shards_equal_local_shards_with_oracle_and_import(world_dir, tmp_path, ray_cluster):
    # an imported corpus covering two thirds of the images (the rest are counted as missing)
    ids = sorted(s.id for s in iter_samples(sorted(completed_shards(world_dir))))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"id": i, "text": f"an imported description of image {i} with enough words to keep"}) + "\n"
            for n, i in enumerate(ids)
            if n % 3
        )
    )
    common = [
        "--input",
        str(world_dir),
        "--caption-source",
        "synthetic-oracle",
        "--caption-source",
        "import",
        "-C",
        f"1:path={corpus}",
        "-C",
        "1:model=corpus-v1",
        "--filters",
        "length,repetition,near-duplicate",
        "--batch-size",
        "3",
    ]
    from densecap.cli import main

    assert main(["run", "--no-progress", *common, "--out", str(tmp_path / "local")]) == 0  # here: the reference
    r = run_densecap(
        [
            "run",
            "--no-progress",
            *common,
            "--out",
            str(tmp_path / "ray"),
            *ray_args(ray_cluster),
            "--set",
            "executor.replicas=2",
        ],
        env=ray_env(ray_cluster),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["executor"] == "ray" and summary["complete"] and summary["units_run"] == 4

    local, ray_ = by_key(tmp_path / "local"), by_key(tmp_path / "ray")
    assert len(local) == 32 and set(local) == set(ray_)
    for k, a in local.items():
        b = ray_[k]
        assert (a.id, a.split, a.image, a.sparse) == (b.id, b.split, b.image, b.sparse)
        assert [(d.source, d.text, d.model, d.verdict) for d in a.dense] == [
            (d.source, d.text, d.model, d.verdict) for d in b.dense
        ]
    assert any(len(s.dense) == 1 for s in local.values()) and any(len(s.dense) == 2 for s in local.values())
    sl, sr = stats_of(tmp_path / "local"), stats_of(tmp_path / "ray")
    assert set(sl) == set(sr)
    for name in sl:
        assert {k: sl[name].get(k) for k in COMPARED_STATS} == {k: sr[name].get(k) for k in COMPARED_STATS}, name
    # two replicas shared the work: units were written by two different processes
    assert len({st["worker"] for st in sr.values()}) == 2
    for f in ("manifest.json", "sizes.json"):
        assert json.loads((tmp_path / "local" / f).read_text()) == json.loads((tmp_path / "ray" / f).read_text())
    assert (tmp_path / "ray" / "report" / "summary.json").exists()
    # the rerun is a no-op on Ray too
    before = {p: Path(p).stat().st_mtime_ns for p in completed_shards(tmp_path / "ray")}
    r = run_densecap(
        ["run", "--no-progress", *common, "--out", str(tmp_path / "ray"), *ray_args(ray_cluster)],
        env=ray_env(ray_cluster),
    )
    assert r.returncode == 0 and json.loads(r.stdout)["units_run"] == 0
    assert before == {p: Path(p).stat().st_mtime_ns for p in completed_shards(tmp_path / "ray")}


def descendants(pid: int) -> set[int]:
    """Live processes below ``pid`` (children, grandchildren...)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


def cluster_dirs(pid: int) -> list[Path]:
    """Temporary directories of the local clusters started by process ``pid``."""
    out = []
    for d in Path("/tmp").glob("dcray-*"):
        try:
            if (d / "owner.pid").read_text() == str(pid):
                out.append(d)
        except OSError:
            continue
    return out


def watch_tree(proc: subprocess.Popen, seen: set[int], until) -> None:
    """Record every process below ``proc`` until ``until()``."""
    while not until():
        seen |= descendants(proc.pid)
        time.sleep(0.1)


@pytest.mark.slow
def test_ray_cluster_started_by_the_driver_ends_with_it(tmp_path):
    """Without --ray-address the driver starts a local cluster of its own (GCS, raylet, workers).
    SIGKILLed mid-unit, it takes the whole cluster along; rerun, it finishes the job and shuts its
    cluster down: no process of either cluster is left."""
    files = image_folder(tmp_path / "photos", 6)
    out = tmp_path / "out"
    with FakeOpenAI() as srv:
        srv.hold = threading.Event()
        args = [
            "--source",
            "folder",
            "--input",
            tmp_path / "photos",
            "-S",
            "chunk_size=2",
            "--filters",
            "length",
            "--out",
            out,
            "--caption-source",
            "vllm-server",
            "-C",
            f"base_url={srv.base_url}",
            "-C",
            "model=fake-vlm",
            "--executor",
            "ray",
            "--set",
            "executor.init={num_cpus: 2, object_store_memory: 100000000}",
        ]
        first = start_cli(args, tmp_path / "first.log")
        seen: set[int] = set()
        try:
            watch_tree(first, seen, lambda: len(srv.log) >= 2 or first.poll() is not None)
            seen |= descendants(first.pid)
            writers = [p for p in seen if cmdline(p).startswith("ray::UnitWriter")]
            assert (
                writers and any("raylet" in cmdline(p) for p in seen) and any("gcs_server" in cmdline(p) for p in seen)
            ), [cmdline(p)[:50] for p in seen]
            first.send_signal(signal.SIGKILL)
            first.wait()
            wait_until(
                lambda: not any(alive(p) for p in seen), "every process of the killed driver's cluster ends", limit=60
            )
        finally:
            srv.hold.set()
            if first.poll() is None:
                first.kill()
        first_dirs = set(cluster_dirs(first.pid))
        assert first_dirs, "the killed driver's cluster directory"
        second = start_cli(args, tmp_path / "second.log")
        seen2: set[int] = set()
        watch_tree(second, seen2, lambda: second.poll() is not None)
        assert second.wait() == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert len(seen2) >= 3  # GCS, raylet, replicas... were seen (cmdlines are gone once they have ended)
    # the rerun removed the killed driver's cluster directory, and its own at the end
    assert not any(d.exists() for d in first_dirs)
    assert not cluster_dirs(second.pid)
    wait_until(lambda: not any(alive(p) for p in seen2), "the finished driver's cluster is shut down", limit=60)
    got = samples_of(out)
    assert Counter(s.id for s in got) == Counter({n: 1 for n in files}) and not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_sigkilled_ray_worker_unit_is_retried_every_image_once(tmp_path, ray_cluster):
    files = image_folder(tmp_path / "photos", 12)
    out = tmp_path / "out"
    with FakeOpenAI() as srv:
        srv.hold = threading.Event()  # requests hang until released: both replicas stay mid-unit
        args = [
            "--source",
            "folder",
            "--input",
            tmp_path / "photos",
            "-S",
            "chunk_size=2",
            "--batch-size",
            1,
            "--filters",
            "length",
            "--out",
            out,
            "--caption-source",
            "vllm-server",
            "-C",
            f"base_url={srv.base_url}",
            "-C",
            "model=fake-vlm",
            "-C",
            "concurrency=1",
            *ray_args(ray_cluster),
            "--set",
            "executor.replicas=2",
            "--set",
            "executor.max_retries=2",
        ]
        proc = start_cli(args, tmp_path / "driver.log", ray_env(ray_cluster))
        try:
            wait_until(
                lambda: len(unit_writers(ray_cluster)) == 2 and len(srv.log) >= 2,
                "two Ray replicas with a request in flight",
                limit=120,
            )
            assert list(out.glob("*.tar.tmp")), "the replicas should be writing their shards"
            victim = unit_writers(ray_cluster)[0]
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: not alive(victim), "the killed replica is gone", limit=30)
            assert not completed_shards(out)
            srv.hold.set()
            assert proc.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-4000:]
        finally:
            srv.hold.set()
            if proc.poll() is None:
                proc.kill()
        requests = len(srv.log)
    got = samples_of(out)
    assert Counter(s.id for s in got) == Counter({n: 1 for n in files})
    assert all(len(s.dense) == 1 and s.dense[0].text and not s.dense[0].error for s in got)
    assert not list(out.glob("*.tmp")) and len(completed_shards(out)) == 6
    # the killed replica's unit was written again by its restarted actor (its image asked twice)
    assert requests > len(files)
    assert all(st["worker"] != f"{os.uname().nodename}:{victim}" for st in stats_of(out).values())
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] == 12


@pytest.mark.slow
def test_sigkilled_ray_driver_rerun_finishes_nothing_twice(tmp_path, ray_cluster):
    files = image_folder(tmp_path / "photos", 16)
    out = tmp_path / "out"
    with FakeOpenAI(delay=0.15) as srv:
        args = [
            "--source",
            "folder",
            "--input",
            tmp_path / "photos",
            "-S",
            "chunk_size=2",
            "--batch-size",
            1,
            "--filters",
            "length",
            "--out",
            out,
            "--caption-source",
            "vllm-server",
            "-C",
            f"base_url={srv.base_url}",
            "-C",
            "model=fake-vlm",
            "-C",
            "concurrency=1",
            *ray_args(ray_cluster),
            "--set",
            "executor.replicas=2",
        ]
        proc = start_cli(args, tmp_path / "first.log", ray_env(ray_cluster))
        try:
            wait_until(lambda: len(completed_shards(out)) >= 2, "two shards written by the first driver", limit=180)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
        # Ray ends the dead driver's actors (they belong to its job)
        wait_until(lambda: not unit_writers(ray_cluster), "the killed driver's replicas end", limit=90)
        done_at_kill = {p: (Path(p).stat().st_mtime_ns, st) for p, st in completed_shards(out).items()}
        assert 2 <= len(done_at_kill) < 8, "the run finished before it could be killed: make it longer"
        assert not (out / "manifest.json").exists()
        n_first = len(srv.log)
        r = subprocess.run(
            densecap_cmd() + ["run", "--no-progress", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
            env={**os.environ, **ray_env(ray_cluster)},
        )
        assert r.returncode == 0, r.stderr[-3000:]
        rerun_digests = Counter(e["digest"] for e in srv.log[n_first:])
    got = samples_of(out)
    assert Counter(s.id for s in got) == Counter({n: 1 for n in files})
    assert (
        not list(out.glob("*.tmp"))
        and json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] == 16
    )
    # shards finished before the kill are untouched, and none of their images was asked again
    from tests.densecap.fake_openai import digest

    for p, (mtime, _) in done_at_kill.items():
        assert Path(p).stat().st_mtime_ns == mtime
        for s in iter_samples([p]):
            assert rerun_digests[digest(s.image)] == 0, s.id
    summary = json.loads(r.stdout)
    assert summary["units_total"] == 8 and summary["units_run"] == 8 - len(done_at_kill)


def test_executor_is_an_execution_setting(world_dir):
    """Switching executors never makes finished shards stale, in densecap run and in the pipeline stage."""
    from d2s.config import from_dict
    from densecap.config import RunConfig
    from densecap.stages import DensecapStage
    from densecap.worker import config_fingerprint

    a = from_dict(RunConfig, {"out": "x", "source": {"type": "shards", "params": {"path": str(world_dir)}}}, "config")
    b = from_dict(
        RunConfig,
        {
            "out": "x",
            "source": {"type": "shards", "params": {"path": str(world_dir)}},
            "executor": {"type": "ray", "address": "auto", "replicas": 8, "num_gpus": 1},
        },
        "config",
    )
    assert config_fingerprint(a) == config_fingerprint(b)
    assert "executor" not in DensecapStage.cache_params({"executor": {"type": "ray"}, "recaption": False})
    from d2s.config import ConfigError

    with pytest.raises(ConfigError, match="executor.type"):
        from_dict(RunConfig, {"out": "x", "executor": {"type": "spark"}}, "config")


# ---- against the real vLLM CPU server ------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_world(tmp_path_factory) -> Path:
    from d2s.synthetic import SplitSpec, WorldConfig, write_world

    out = tmp_path_factory.mktemp("rayworld") / "shards"
    write_world(out, WorldConfig(), [SplitSpec("train", 48)], shard_size=6, progress=False)
    return out


def vllm_args(*urls: str, extra: tuple[str, ...] = ()) -> list[str]:
    where = [f"base_urls=[{','.join(urls)}]"] if len(urls) > 1 else [f"base_url={urls[0]}"]
    return [
        "--caption-source",
        "vllm-server",
        *[x for w in where for x in ("-C", w)],
        "-C",
        "model=tiny-llava",
        "-C",
        "prompt_family=llava",
        "-C",
        "sampling.temperature=0",
        "-C",
        "sampling.max_tokens=24",
        *extra,
    ]


@pytest.mark.vllm
@pytest.mark.slow
def test_ray_and_local_give_the_same_counts_and_verdicts_with_real_vllm(vllm_server, vllm_world, tmp_path, ray_cluster):
    common = [
        "run",
        "--no-progress",
        "--input",
        str(vllm_world),
        "--batch-size",
        "3",
        "--filters",
        "length,repetition,garbage",
        "-F",
        "length.min_words=1",
        *vllm_args(vllm_server.base_url, extra=("-C", "concurrency=4")),
    ]
    from densecap.cli import main

    assert main([*common, "--out", str(tmp_path / "local")]) == 0  # in this process: the reference
    r = run_densecap(
        [*common, "--out", str(tmp_path / "ray"), *ray_args(ray_cluster), "--set", "executor.replicas=2"],
        env=ray_env(ray_cluster),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    sl, sr = stats_of(tmp_path / "local"), stats_of(tmp_path / "ray")
    assert set(sl) == set(sr) and len(sl) == 8
    for name in sl:
        assert {k: sl[name].get(k) for k in COMPARED_STATS} == {k: sr[name].get(k) for k in COMPARED_STATS}, name
    local, ray_ = by_key(tmp_path / "local"), by_key(tmp_path / "ray")
    assert set(local) == set(ray_) and len(local) == 48
    assert Counter(d.verdict for s in local.values() for d in s.dense) == Counter(
        d.verdict for s in ray_.values() for d in s.dense
    )
    assert all(not d.error and d.model == "tiny-llava" for s in ray_.values() for d in s.dense)


@pytest.mark.vllm
@pytest.mark.slow
def test_two_vllm_endpoints_one_killed_mid_run(vllm_server, vllm_spare_server, vllm_world, tmp_path, ray_cluster):
    second = vllm_spare_server  # a second real server (started with the session's), killed below
    out = tmp_path / "out"
    urls = (vllm_server.base_url, second.base_url)
    args = [
        "run",
        "--no-progress",
        "--input",
        str(vllm_world),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--filters",
        "none",
        *vllm_args(
            *urls,
            extra=(
                "-C",
                "concurrency=4",
                "-C",
                "max_retries=0",
                "-C",
                "max_consecutive_failures=2",
                "-C",
                "timeout=30",
                "-C",
                "connect_timeout=3",
            ),
        ),
        *ray_args(ray_cluster),
        "--set",
        "executor.replicas=2",
    ]
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **ray_env(ray_cluster)}
        proc = subprocess.Popen(
            densecap_cmd() + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
        )
        try:
            wait_until(lambda: len(completed_shards(out)) >= 1 or proc.poll() is not None, "a first shard", limit=300)
            second.kill()  # one server dies mid-run (requests in flight on it fail: max_retries=0)
            _, err = proc.communicate(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        second.stop()
    # the run went on with the other server: every image is there, once
    got = samples_of(out)
    assert Counter(s.key for s in got) == Counter({f"train_{i:08d}": 1 for i in range(48)})
    assert proc.returncode in (0, 3), err[-3000:]
    stats = stats_of(out)
    eps = [st["endpoints"]["vllm-server"] for st in stats.values()]
    assert any(e[second.base_url].get("down") for e in eps), "the killed server is recorded as taken out"
    assert sum(e[vllm_server.base_url]["ok"] for e in eps) > 0 and sum(e[second.base_url]["ok"] for e in eps) > 0
    # requests in flight on the killed server (and any sent before it was taken out) failed: no retries
    # here (max_retries=0), so they are recorded per image, with the server's address, exit status 3
    failed = [s for s in got if s.dense[0].error]
    assert failed and proc.returncode == 3
    assert sum(st["caption_errors"] for st in stats.values()) == len(failed)
    for s in failed:
        assert second.base_url in s.dense[0].error and s.dense[0].verdict == "error"
    # a rerun of the same command (the dead server is left out at start) fills what failed, keeps the rest
    clean = {p: Path(p).stat().st_mtime_ns for p, st in completed_shards(out).items() if not st["caption_errors"]}
    r = run_densecap(args, env=ray_env(ray_cluster))
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: Path(p).stat().st_mtime_ns for p in clean} == clean
    got = samples_of(out)
    assert Counter(s.key for s in got) == Counter({f"train_{i:08d}": 1 for i in range(48)})
    # (greedy text of the random model may be whitespace only: check that tokens came back)
    assert all(len(s.dense) == 1 and not s.dense[0].error and s.dense[0].scores["completion_tokens"] > 0 for s in got)
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] == 48
    filled = [st for st in stats_of(out).values() if st["filled"]]
    assert filled and all("at start" in st["endpoints"]["vllm-server"][second.base_url]["down"] for st in filled)


@pytest.mark.slow
def test_pipeline_stage_runs_on_ray_and_keeps_its_cache_when_switched_back(world_dir, tmp_path, ray_cluster):
    """The densecap stage's params take the executor; switching executors does not redo the stage."""
    import sys

    import yaml

    def pipeline(executor: dict) -> Path:
        doc = {
            "name": "dc",
            "stages": {
                "captions": {
                    "type": "densecap",
                    "inputs": {"shards": str(world_dir)},
                    "params": {
                        "caption_sources": [{"type": "synthetic-oracle"}],
                        "filters": [{"type": "length"}],
                        "progress": False,
                        "executor": executor,
                    },
                }
            },
        }
        path = tmp_path / f"p-{executor['type']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **ray_env(ray_cluster)}
    d2s = [sys.executable, "-m", "d2s.cli", "run"]
    r = subprocess.run(
        [
            *d2s,
            str(pipeline({"type": "ray", "address": ray_cluster.address, "replicas": 2})),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run" / "captions" / "shards"
    stats = stats_of(out)
    assert len(stats) == 4 and len({st["worker"] for st in stats.values()}) == 2  # written by the two replicas
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] == 24
    before = {p: Path(p).stat().st_mtime_ns for p in completed_shards(out)}
    r = subprocess.run(
        [*d2s, str(pipeline({"type": "local"})), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert before == {p: Path(p).stat().st_mtime_ns for p in completed_shards(out)}
    assert "skip" in (r.stdout + r.stderr)


# ---- issue 17: the entry (addresses, checks before the cluster) and interrupts ----------------
@pytest.fixture
def no_ray_found(tmp_path, monkeypatch) -> Path:
    """An environment in which Ray's own search finds no cluster: no $RAY_ADDRESS, and a Ray temp
    directory ($RAY_TMPDIR) of this test without the address file `ray start` writes (returned)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))
    return tmp_path / "raytmp" / "ray" / "ray_current_cluster"


def densecap_main(args: list) -> int:
    from densecap.cli import main

    return main(["run", "--no-progress", *map(str, args)])


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "address, says",
    [
        ("127.0.0.1:1", "nothing accepted a connection at 127.0.0.1:1"),  # unreachable
        ("auto", "found no running Ray cluster ($RAY_ADDRESS is not set and "),  # no cluster
        ("127.0.0.1", "no port; expected ''"),  # malformed
        ("127.0.0.1:99999", "port 99999 is not in 1..65535"),  # malformed
    ],
)
def test_bad_ray_address_exits_2_naming_the_field(address, says, world_dir, tmp_path, no_ray_found, caplog):
    ray_before = "ray" in sys.modules
    assert densecap_main(["--input", world_dir, "--out", tmp_path / "o", "--ray-address", address]) == 2
    assert f"executor.address: {address!r}" in caplog.text and says in caplog.text, caplog.text
    # Ray was never imported (nor a cluster joined) and nothing was written
    assert ("ray" in sys.modules) == ray_before and not list((tmp_path / "o").glob("*.tar*"))


@pytest.mark.timeout(60)
def test_auto_reads_the_address_file_ray_writes_and_names_it_when_stale(world_dir, tmp_path, no_ray_found, caplog):
    """'auto' follows Ray's address file (<Ray temp dir>/ray_current_cluster) or $RAY_ADDRESS; a file
    left by a cluster that is gone exits 2 naming the address, where it came from and the field."""
    no_ray_found.parent.mkdir(parents=True)
    no_ray_found.write_text("127.0.0.1:1\n")
    args = ["--input", world_dir, "--out", tmp_path / "o", "--ray-address", "auto"]
    assert densecap_main(args) == 2
    assert (
        f"executor.address: 'auto' ('127.0.0.1:1', from {no_ray_found}): nothing accepted a connection" in caplog.text
    )
    os.environ["RAY_ADDRESS"] = "nohost"  # monkeypatch restores it (deleted)
    assert densecap_main(args) == 2
    assert "executor.address: 'auto' ('nohost', from $RAY_ADDRESS): no port" in caplog.text


@pytest.mark.timeout(120)
def test_caption_server_is_checked_before_a_cluster_is_started(world_dir, tmp_path):
    """A wrong base_url fails as with the local executor (exit 2, the server named), and no local
    Ray cluster is ever started: the driver starts no process at all."""
    args = [
        *("--input", world_dir, "--out", tmp_path / "o", "--executor", "ray"),
        *("--caption-source", "vllm-server", "-C", "base_url=http://127.0.0.1:1", "-C", "model=m"),
    ]
    proc = start_cli(args, tmp_path / "driver.log")
    seen: set[int] = set()
    watch_tree(proc, seen, lambda: proc.poll() is not None)
    log = (tmp_path / "driver.log").read_text()
    assert proc.returncode == 2, log[-3000:]
    assert "vllm-server: cannot reach http://127.0.0.1:1/v1/models" in log
    assert not seen and "Ray cluster" not in log and not cluster_dirs(proc.pid)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_auto_joins_the_cluster_in_the_address_file(world_dir, tmp_path, ray_cluster):
    f = tmp_path / "raytmp" / "ray" / "ray_current_cluster"
    f.parent.mkdir(parents=True)
    f.write_text(ray_cluster.address + "\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", RAY_TMPDIR=str(tmp_path / "raytmp"), **ray_env(ray_cluster))
    args = ["--input", world_dir, "--out", tmp_path / "o", "--ray-address", "auto", "--set", "executor.replicas=2"]
    cmd = densecap_cmd() + ["run", "--no-progress", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["complete"] and f"Ray cluster {ray_cluster.address} with" in r.stderr
    assert len({st["worker"] for st in stats_of(tmp_path / "o").values()}) == 2


def _interrupt_then_rerun(sig: signal.Signals, tmp: Path) -> dict:
    """A driver with its own local cluster, sent ``sig`` once two of its 8 shards are finished, and
    the rerun of the same command; what each left is looked at as soon as it exits."""
    files = image_folder(tmp / "photos", 16)
    out = tmp / "out"
    with FakeOpenAI(delay=0.2) as srv:
        args = [
            *("--source", "folder", "--input", tmp / "photos", "-S", "chunk_size=2", "--batch-size", 1),
            *("--filters", "length", "--out", out, "--caption-source", "vllm-server"),
            *("-C", f"base_url={srv.base_url}", "-C", "model=fake-vlm", "-C", "concurrency=1"),
            *("--executor", "ray", "--set", "executor.replicas=2"),
            *("--set", "executor.init={num_cpus: 2, object_store_memory: 100000000}"),
        ]
        proc = start_cli(args, tmp / "first.log")
        seen: set[int] = set()
        try:
            watch_tree(proc, seen, lambda: len(completed_shards(out)) >= 2 or proc.poll() is not None)
            running_at_signal = proc.poll() is None
            if running_at_signal:
                proc.send_signal(sig)
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
        left = {
            "done": len(completed_shards(out)),
            "alive": [cmdline(p)[:60] for p in seen if alive(p)],
            "cluster_dirs": cluster_dirs(proc.pid),
        }
        r = subprocess.run(
            densecap_cmd() + ["run", "--no-progress", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    return {
        "files": files,
        "out": out,
        "running_at_signal": running_at_signal,
        "rc": rc,
        "log": (tmp / "first.log").read_text(),
        "seen": seen,
        **left,
        "rerun": r,
    }


INTERRUPT_TEST = "test_interrupted_ray_run_is_one_line_leaves_nothing_and_a_rerun_finishes"


@pytest.fixture(scope="module")
def interrupted_runs(request, tmp_path_factory) -> dict[str, dict]:
    """``_interrupt_then_rerun`` for each selected signal, the two at the same time: most of a
    driver's time goes to starting and stopping its cluster (waits, one busy process at a time),
    so two of them overlap well on 2 cores. Each has its own cluster, images and caption server."""
    from concurrent.futures import ThreadPoolExecutor

    selected = {it.name for it in request.session.items}
    sigs = [sig for sig in (signal.SIGINT, signal.SIGTERM) if f"{INTERRUPT_TEST}[{int(sig)}]" in selected]
    with ThreadPoolExecutor(2) as pool:
        jobs = {sig.name: pool.submit(_interrupt_then_rerun, sig, tmp_path_factory.mktemp(sig.name)) for sig in sigs}
        return {name: job.result() for name, job in jobs.items()}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_ray_run_is_one_line_leaves_nothing_and_a_rerun_finishes(sig, interrupted_runs):
    """SIGINT / SIGTERM to a driver with its own local cluster, mid-run: exit 130 / 143, one line
    saying how many shards are finished, no traceback; every process it started has ended and its
    cluster directory is gone when it exits; the rerun writes every image exactly once."""
    x = interrupted_runs[sig.name]
    out, log, done, r = x["out"], x["log"], x["done"], x["rerun"]
    assert x["running_at_signal"], log[-3000:]
    assert x["rc"] == 128 + sig, log[-3000:]
    said = [line for line in log.splitlines() if "interrupted" in line]
    assert said == [
        f"densecap: interrupted ({sig.name}): {done} of 8 shard(s) finished in {out}; "
        "rerun the same command to continue"
    ], log[-3000:]
    assert "Traceback" not in log and 2 <= done < 8
    assert len(x["seen"]) >= 3 and not x["alive"], x["alive"]
    assert not x["cluster_dirs"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["units_run"] == 8 - done
    assert Counter(s.id for s in samples_of(out)) == Counter({n: 1 for n in x["files"]})
    assert not list(out.glob("*.tmp"))
