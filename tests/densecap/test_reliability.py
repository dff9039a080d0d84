"""Issue 11, densecap half: nothing lost, nothing redone, nothing executed when things go wrong.

Real processes and signals (SIGKILL of a real `densecap` and its pool workers), real
WebDataset tars read back by the real Hugging Face `datasets`, and an OpenAI-compatible HTTP
server on 127.0.0.1 that injects faults (tests/densecap/fake_openai.py). The tests against a
real vLLM server are in test_vllm.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from d2s.processes import alive
from d2s.shards import completed_shards, iter_samples
from densecap.cli import main
from tests.densecap.conftest import REPO, densecap_cmd, png_bytes
from tests.densecap.fake_openai import FakeOpenAI, caption_for, digest


# ---- helpers ------------------------------------------------------------------------------
def image_folder(root: Path, n_png: int, n_jpg: int = 0) -> dict[str, bytes]:
    """Distinct solid-colour images: img000.png ... then imgNNN.jpg; returns name -> bytes."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for i in range(n_png + n_jpg):
        fmt, ext = ("PNG", "png") if i < n_png else ("JPEG", "jpg")
        data = png_bytes(
            color=((37 * i) % 256, (91 * i + 50) % 256, (13 * i + 100) % 256), size=(40 + i % 3, 30), fmt=fmt
        )
        name = f"img{i:03d}.{ext}"
        (root / name).write_bytes(data)
        files[name] = data
    return files


def server_opts(srv: FakeOpenAI, *extra: str) -> list[str]:
    return ["--caption-source", "vllm-server", "-C", f"base_url={srv.base_url}", "-C", "model=fake-vlm", *extra]


def run_cli(*args) -> int:
    return main(["run", "--no-progress", *map(str, args)])


def samples(out: Path):
    return list(iter_samples(sorted(completed_shards(out))))


def shard_state(out: Path) -> dict[str, tuple[int, int]]:
    return {Path(p).name: (Path(p).stat().st_mtime_ns, Path(p).stat().st_size) for p in completed_shards(out)}


def stats_of(out: Path) -> dict[str, dict]:
    return {Path(p).name: st for p, st in completed_shards(out).items()}


def start_cli(args: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        densecap_cmd() + ["run", "--no-progress", *map(str, args)],
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:  # it ended meanwhile
        return ""


def wait_until(cond, what: str, limit: float = 60.0) -> None:
    """Poll ``cond`` until true; fail (naming ``what``) if it is not true within ``limit`` seconds."""
    t0 = time.time()
    while not cond():
        if time.time() - t0 > limit:
            raise AssertionError(f"not within {limit:.0f}s: {what}")
        time.sleep(0.05)


@pytest.fixture
def fake():
    srv = FakeOpenAI().start()
    yield srv
    srv.stop()


# ---- item 1: moving the server redoes nothing ---------------------------------------------
def test_server_on_another_address_fills_failures_and_keeps_finished_shards(tmp_path, fake):
    files = image_folder(tmp_path / "photos", 16)
    names = sorted(files)
    out = tmp_path / "out"
    # server A dies in the middle of unit 2 (images 8..11): connections closed without a reply
    for n in names[8:12]:
        fake.script(digest(files[n]), *["drop"] * 10)
    common = [
        "--source",
        "folder",
        "--input",
        tmp_path / "photos",
        "-S",
        "chunk_size=4",
        "--filters",
        "length,garbage",
        "--out",
        out,
        "--batch-size",
        "4",
    ]
    rc = run_cli(
        *common, *server_opts(fake, "-C", "max_retries=1", "-C", "backoff=0.01", "-C", "max_consecutive_failures=3")
    )
    assert rc == 4  # the source was declared down; shard 2 is written with its failures recorded
    assert sorted(stats_of(out)) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert stats_of(out)["train-000002.tar"]["caption_errors"] == 4
    before = shard_state(out)

    with FakeOpenAI() as moved:  # the server comes back on another port; transport settings changed too
        rc = run_cli(
            *common,
            *server_opts(
                moved,
                "-C",
                "concurrency=3",
                "-C",
                "timeout=30",
                "-C",
                "connect_timeout=5",
                "-C",
                "max_retries=2",
                "-C",
                "backoff=0.2",
                "-C",
                "max_backoff=1",
            ),
        )
        assert rc == 0
        # only the 4 failed captions (shard 2) and the never-started shard 3 were requested
        assert moved.counts() == Counter({digest(files[n]): 1 for n in names[8:]})
    after = shard_state(out)
    assert {k: after[k] for k in ("train-000000.tar", "train-000001.tar")} == {
        k: before[k] for k in ("train-000000.tar", "train-000001.tar")
    }
    got = samples(out)
    assert Counter(s.id for s in got) == Counter({n: 1 for n in names})
    assert all(len(s.dense) == 1 and s.dense[0].text and not s.dense[0].error for s in got)
    assert len({st["config_hash"] for st in stats_of(out).values()}) == 1

    # what decides a caption's content still makes shards stale: other sampling -> all redone
    with FakeOpenAI() as third:
        assert run_cli(*common, *server_opts(third, "-C", "sampling.temperature=0.9")) == 0
        assert third.counts() == Counter({digest(files[n]): 1 for n in names})


@pytest.mark.parametrize(
    "field,value,stale",
    [
        ("base_url", "http://127.0.0.1:9", False),
        ("concurrency", 64, False),
        ("timeout", 5.0, False),
        ("connect_timeout", 1.0, False),
        ("max_retries", 0, False),
        ("backoff", 3.0, False),
        ("max_backoff", 1.0, False),
        ("max_retry_after", 5.0, False),
        ("max_consecutive_failures", 100, False),
        ("api_key_env", "MY_KEY", False),
        ("api_key_file", "/run/secrets/k", False),
        ("model", "other-vlm", True),
        ("prompt", "Say it.", True),
        ("prompt_family", "llava", True),
        ("system", "Be brief.", True),
        ("sampling", {"temperature": 0.9}, True),
        ("image_max_side", 256, True),
    ],
)
def test_fingerprint_counts_what_decides_content_only(field, value, stale):
    from d2s.config import from_dict
    from densecap.config import DensecapConfig
    from densecap.worker import config_fingerprint

    def cfg(params):
        return from_dict(
            DensecapConfig,
            {
                "source": {"type": "shards", "params": {"path": "x"}},
                "caption_sources": [{"type": "vllm-server", "params": params}],
            },
        )

    base = {"base_url": "http://127.0.0.1:8000", "model": "m"}
    assert (config_fingerprint(cfg(base)) != config_fingerprint(cfg({**base, field: value}))) is stale


def test_pipeline_stage_keeps_its_shards_when_the_server_moves(tmp_path, fake, monkeypatch):
    from d2s.pipeline import Runner, load_pipeline

    files = image_folder(tmp_path / "photos", 6)
    monkeypatch.chdir(tmp_path)

    def doc(url, **extra):
        return {
            "name": "moved",
            "stages": {
                "captions": {
                    "type": "densecap",
                    "params": {
                        "source": {"type": "folder", "params": {"path": str(tmp_path / "photos"), "chunk_size": 3}},
                        "caption_sources": [
                            {"type": "vllm-server", "params": {"base_url": url, "model": "fake-vlm", **extra}}
                        ],
                        "filters": [{"type": "length"}],
                        "progress": False,
                    },
                }
            },
        }

    assert Runner(load_pipeline(doc=doc(fake.base_url), run_dir=tmp_path / "run")).run()[0]["action"] == "run"
    out = tmp_path / "run" / "captions" / "shards"
    before = shard_state(out)
    with FakeOpenAI() as moved:
        report = Runner(
            load_pipeline(doc=doc(moved.base_url, concurrency=2, timeout=9.0), run_dir=tmp_path / "run")
        ).run()
        assert report[0]["action"] == "skip" and not moved.log
        assert shard_state(out) == before
        # a content setting does change the stage
        report = Runner(
            load_pipeline(doc=doc(moved.base_url, sampling={"max_tokens": 7}), run_dir=tmp_path / "run")
        ).run()
        assert report[0]["action"] == "run" and moved.counts() == Counter({digest(b): 1 for b in files.values()})


# ---- item 4: no secret on disk ------------------------------------------------------------
SECRET = "sk-test-6d1f0b9e-SECRET"


def files_containing(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_api_key_comes_from_the_environment_or_a_file_and_is_never_written(tmp_path, monkeypatch, caplog):
    from d2s.pipeline import Runner, load_pipeline, write_run_record

    image_folder(tmp_path / "photos", 4)
    with FakeOpenAI(api_key=SECRET) as srv:
        # the environment variable, as the OpenAI clients read it
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        out = tmp_path / "out"
        assert (
            run_cli(
                "--source",
                "folder",
                "--input",
                tmp_path / "photos",
                "--filters",
                "length",
                "--out",
                out,
                *server_opts(srv),
            )
            == 0
        )
        assert len(samples(out)) == 4 and set(srv.auth_seen) == {f"Bearer {SECRET}"}
        # a file path (first line), e.g. a mounted secret; the variable is ignored then
        monkeypatch.setenv("OPENAI_API_KEY", "wrong")
        key_file = tmp_path / "secrets" / "vllm.key"
        key_file.parent.mkdir()
        key_file.write_text(SECRET + "\n")
        out2 = tmp_path / "out2"
        assert (
            run_cli(
                "--source",
                "folder",
                "--input",
                tmp_path / "photos",
                "--filters",
                "length",
                "--out",
                out2,
                *server_opts(srv, "-C", f"api_key_file={key_file}"),
            )
            == 0
        )
        # the pipeline: resolved config, logs, stage records
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        monkeypatch.chdir(tmp_path)
        p = load_pipeline(
            doc={
                "name": "k",
                "stages": {
                    "captions": {
                        "type": "densecap",
                        "params": {
                            "source": {"type": "folder", "params": {"path": str(tmp_path / "photos")}},
                            "caption_sources": [
                                {"type": "vllm-server", "params": {"base_url": srv.base_url, "model": "fake-vlm"}}
                            ],
                            "filters": [{"type": "length"}],
                            "progress": False,
                        },
                    }
                },
            },
            run_dir=tmp_path / "run",
        )
        write_run_record(p)
        Runner(p).run()
        assert len(samples(tmp_path / "run" / "captions" / "shards")) == 4
    assert (out / "densecap-config.rank0.json").exists() and (tmp_path / "run" / "resolved.yaml").exists()
    assert files_containing(tmp_path, SECRET) == [str(key_file)]

    # a key in the configuration is refused, naming the field, before anything is written
    out3 = tmp_path / "out3"
    assert (
        run_cli(
            "--source",
            "folder",
            "--input",
            tmp_path / "photos",
            "--out",
            out3,
            "--caption-source",
            "vllm-server",
            "-C",
            f"api_key={SECRET}",
        )
        == 2
    )
    assert "caption_sources[0].params.api_key: not accepted" in caplog.text and "OPENAI_API_KEY" in caplog.text
    assert files_containing(tmp_path, SECRET) == [str(key_file)]


def test_unreadable_api_key_file_names_the_file(tmp_path, fake, caplog):
    image_folder(tmp_path / "photos", 1)
    (tmp_path / "empty.key").write_text("\n")
    for key_file, why in (
        (tmp_path / "missing.key", "cannot read it"),
        (tmp_path / "empty.key", "the first line is empty"),
    ):
        assert (
            run_cli(
                "--source",
                "folder",
                "--input",
                tmp_path / "photos",
                "--out",
                tmp_path / "out",
                *server_opts(fake, "-C", f"api_key_file={key_file}"),
            )
            == 2
        )
        assert f"api_key_file {key_file}: {why}" in caplog.text
    assert not completed_shards(tmp_path / "out") and not fake.log


# ---- item 8: HTTP edge cases are per image ------------------------------------------------
def test_malformed_replies_and_retry_after_are_handled_per_image(tmp_path, fake):
    files = image_folder(tmp_path / "photos", 6)
    d = {n: digest(b) for n, b in files.items()}
    n0, n1, n2, n3, n4, n5 = sorted(files)
    fake.script(d[n0], "malformed", "ok")  # 200 that is not JSON, then fine
    fake.script(d[n1], "no_choices", "empty_choices")  # never a usable reply: a recorded failure
    fake.script(d[n2], ("status", 429, "1"), "ok")  # Retry-After in seconds
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 2))
    fake.script(d[n3], ("status", 503, when), "ok")  # Retry-After as an HTTP date
    fake.script(d[n4], ("status", 500, None), "ok")
    out = tmp_path / "out"
    args = [
        "--source",
        "folder",
        "--input",
        tmp_path / "photos",
        "--filters",
        "length,garbage",
        "--out",
        out,
        *server_opts(fake, "-C", "max_retries=1", "-C", "backoff=0.01", "-C", "max_backoff=0.01"),
    ]
    assert run_cli(*args) == 3  # finished, one caption failed and is recorded
    got = {s.id: s.dense[0] for s in samples(out)}
    assert set(got) == set(files)
    assert (
        got[n1].error
        and "malformed reply" in got[n1].error
        and "no 'choices'" in got[n1].error
        and got[n1].verdict == "error"
    )
    assert all(got[n].text and not got[n].error for n in (n0, n2, n3, n4, n5))
    # the server said when to come back, and it was waited for (backoff alone is 0.01 s)
    t429 = [r["t"] for r in fake.requests_for(d[n2])]
    assert len(t429) == 2 and t429[1] - t429[0] >= 1.0
    t503 = [r["t"] for r in fake.requests_for(d[n3])]
    assert len(t503) == 2 and t503[1] - t503[0] >= 0.5  # an HTTP date has whole seconds
    rejects = [json.loads(x) for x in (out / "rejects" / "train-000000.rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejects if r["reason"] == "error"] == [n1]

    first = Counter(fake.counts())
    assert run_cli(*args) == 0  # the fill asks for the failed one only
    assert fake.counts() - first == Counter({d[n1]: 1})
    got = samples(out)
    assert Counter(s.id for s in got) == Counter({n: 1 for n in files})
    assert all(s.dense[0].text and not s.dense[0].error for s in got)


def test_retry_after_parsing():
    from densecap.caption_sources.vllm_server import parse_reply, parse_retry_after

    assert parse_retry_after("3") == 3.0 and parse_retry_after("0.5") == 0.5 and parse_retry_after("-4") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None and parse_retry_after("nan") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_reply(
        {
            "choices": [{"message": {"content": " hi "}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": "x"},
        }
    ) == ("hi", "length", {"prompt_tokens": 3.0, "completion_tokens": 0.0})
    assert parse_reply({"choices": [{"message": {"content": None}}]})[0] == ""
    for bad in (
        [],
        {"error": {"message": "boom"}},
        {"choices": []},
        {"choices": ["x"]},
        {"choices": [{"message": {"content": 3}}]},
    ):
        with pytest.raises(Exception, match="malformed reply"):
            parse_reply(bad)


# ---- item 9: fills filter exactly like a first pass ---------------------------------------
def test_fill_filters_kept_and_new_captions_like_a_first_pass(tmp_path):
    files = image_folder(tmp_path / "photos", 5)
    names = sorted(files)
    twin = caption_for(digest(files[names[0]]))

    def text(dg: str) -> str:  # image 3 gets the same caption as image 0: a near-duplicate
        return twin if dg == digest(files[names[3]]) else caption_for(dg)

    args = [
        "--source",
        "folder",
        "--input",
        tmp_path / "photos",
        "--filters",
        "length,near-duplicate,garbage",
        "-C",
        "max_retries=0",
        "-C",
        "model=fake-vlm",
        "--caption-source",
        "vllm-server",
    ]
    out = tmp_path / "out"
    with FakeOpenAI(text_fn=text) as srv:
        srv.script(digest(files[names[3]]), ("status", 500, None))  # image 3 fails in the first pass
        assert run_cli(*args, "-C", f"base_url={srv.base_url}", "--out", out) == 3
        assert run_cli(*args, "-C", f"base_url={srv.base_url}", "--out", out) == 0  # fill
        fresh = tmp_path / "fresh"
        assert run_cli(*args, "-C", f"base_url={srv.base_url}", "--out", fresh) == 0  # one clean pass
    filled = {s.id: s.dense[0].verdict for s in samples(out)}
    assert filled[names[3]] == "near_duplicate"
    assert filled == {s.id: s.dense[0].verdict for s in samples(fresh)}
    keep = ("captions_kept", "captions_dropped", "dropped_near_duplicate", "caption_errors")
    st, st_fresh = stats_of(out)["train-000000.tar"], stats_of(fresh)["train-000000.tar"]
    assert (
        {k: st.get(k, 0) for k in keep}
        == {k: st_fresh.get(k, 0) for k in keep}
        == {"captions_kept": 4, "captions_dropped": 1, "dropped_near_duplicate": 1, "caption_errors": 0}
    )
    assert st["filled"] and st["captions_requested"] == 1
    rejects = [json.loads(x) for x in (out / "rejects" / "train-000000.rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [(names[3], "near_duplicate")]


# ---- item 3: one image extension per split, read by the real `datasets` -------------------
def _decoded(data: bytes):
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("n_png,n_jpg,ext", [(18, 4, "png"), (3, 9, "jpg")])
def test_mixed_folder_loads_every_image_with_hf_datasets(tmp_path, n_png, n_jpg, ext):
    import datasets
    import numpy as np

    files = image_folder(tmp_path / "photos", n_png, n_jpg)
    corpus = tmp_path / "dense.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"image": n, "text": f"A long description of picture {n} with colours."}) + "\n" for n in files
        )
    )
    out = tmp_path / "out"
    assert (
        run_cli(
            "--source",
            "folder",
            "--input",
            tmp_path / "photos",
            "-S",
            "chunk_size=5",
            "--caption-source",
            "import",
            "-C",
            f"path={corpus}",
            "--filters",
            "none",
            "--out",
            out,
        )
        == 0
    )
    ds = datasets.load_dataset(
        "webdataset",
        data_files={"train": str(out / "train-*.tar")},
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert len(ds) == n_png + n_jpg
    assert ext in ds.column_names and not ({"png", "jpg"} - {ext}) & set(ds.column_names)
    by_id = {row["json"]["id"]: row for row in ds}
    assert set(by_id) == set(files)
    for name, data in files.items():
        img = by_id[name][ext]
        assert img is not None, name
        stored = np.asarray(img.convert("RGB"))
        if name.endswith("." + ext) or ext == "png":  # as stored, or converted losslessly
            assert np.array_equal(stored, _decoded(data)), name
        else:  # PNG -> JPEG at quality 95
            assert stored.shape == _decoded(data).shape
            assert np.abs(stored.astype(int) - _decoded(data).astype(int)).mean() < 3
    got = {s.id: s for s in samples(out)}
    for name, data in files.items():
        s = got[name]
        assert s.image_ext == ext
        if name.endswith("." + ext):
            assert s.image == data and "original_format" not in s.meta  # byte for byte
        else:
            assert s.meta["original_format"] == name.rsplit(".", 1)[1]
    assert {st["image_ext"] for st in stats_of(out).values()} == {ext}


def test_image_ext_keep_and_fixed(tmp_path):
    files = image_folder(tmp_path / "photos", 2, 2)
    corpus = tmp_path / "dense.jsonl"
    corpus.write_text(
        "".join(json.dumps({"image": n, "text": "A description of the picture in some words."}) + "\n" for n in files)
    )
    base = [
        "--source",
        "folder",
        "--input",
        tmp_path / "photos",
        "--caption-source",
        "import",
        "-C",
        f"path={corpus}",
        "--filters",
        "none",
    ]
    assert run_cli(*base, "--out", tmp_path / "keep", "--set", "image_ext=keep") == 0
    assert {s.id: s.image for s in samples(tmp_path / "keep")} == files  # opt-out: images exactly as they came
    assert run_cli(*base, "--out", tmp_path / "webp", "--set", "image_ext=webp") == 0
    assert {s.image_ext for s in samples(tmp_path / "webp")} == {"webp"}
    assert run_cli(*base, "--out", tmp_path / "bad", "--set", "image_ext=gif") == 2


# ---- item 2: workers die with densecap; one process per output and rank -------------------
@pytest.mark.slow
def test_sigkilled_densecap_takes_its_workers_along_and_a_rerun_completes(tmp_path):
    files = image_folder(tmp_path / "photos", 12)
    out = tmp_path / "out"
    with FakeOpenAI() as srv:
        import threading

        srv.hold = threading.Event()  # every request hangs until released: workers stay busy
        args = [
            "--source",
            "folder",
            "--input",
            tmp_path / "photos",
            "-S",
            "chunk_size=2",
            "--num-workers",
            2,
            "--batch-size",
            1,
            "--filters",
            "length",
            "--out",
            out,
            *server_opts(srv, "-C", "concurrency=1"),
        ]
        proc = start_cli(args, tmp_path / "first.log")
        kids: list[int] = []
        try:
            wait_until(
                lambda: len([c for c in children(proc.pid) if "spawn_main" in cmdline(c)]) == 2 and len(srv.log) >= 2,
                "two pool workers with a request in flight",
            )
            kids = children(proc.pid)
            assert list(out.glob("*.tar.tmp"))  # shards being written
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            wait_until(
                lambda: not any(alive(k) for k in kids), f"the workers {kids} of the SIGKILLed densecap end", limit=30
            )
        finally:
            srv.hold.set()
            if proc.poll() is None:
                proc.kill()
            for k in kids:  # never leave a survivor behind, even when the test fails
                if alive(k):
                    os.kill(k, signal.SIGKILL)
        assert not completed_shards(out)
        # the lock of the killed run does not block the rerun (the kernel dropped it); the rerun in
        # this process, with its own pool of workers
        assert main(["run", "--no-progress", *map(str, args)]) == 0
    got = samples(out)
    assert Counter(s.id for s in got) == Counter({n: 1 for n in files})
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_second_run_on_the_same_output_and_rank_stops_at_once(tmp_path, capsys):
    import threading

    files = image_folder(tmp_path / "photos", 4)
    out = tmp_path / "out"
    with FakeOpenAI() as srv:
        srv.hold = threading.Event()
        args = [
            "--source",
            "folder",
            "--input",
            tmp_path / "photos",
            "--filters",
            "length",
            "--out",
            out,
            *server_opts(srv),
        ]
        first = start_cli(args, tmp_path / "first.log")
        try:
            wait_until(lambda: len(srv.log) >= 1, "the first run's first request")
            capsys.readouterr()
            rc = main(["run", "--no-progress", *map(str, args)])  # the second run: this process
            err = capsys.readouterr().err
            assert rc == 5, err[-2000:]
            assert f"pid {first.pid}" in err and "rank 0" in err and "densecap-rank0.lock" in err
            assert first.poll() is None  # the first run is untouched
            srv.hold.set()
            assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            srv.hold.set()
            if first.poll() is None:
                first.kill()
    assert Counter(s.id for s in samples(out)) == Counter({n: 1 for n in files})
    assert len(srv.log) == 4  # every image requested once: the second run did nothing


def test_lock_names_the_holder_in_process():
    import tempfile

    from densecap.locks import RunLock, RunLocked

    with tempfile.TemporaryDirectory() as d:
        with RunLock(Path(d), 3):
            with pytest.raises(RunLocked, match=rf"rank 3 .*pid {os.getpid()}"):
                RunLock(Path(d), 3).acquire()
            RunLock(Path(d), 2).acquire().release()  # another rank is free
        RunLock(Path(d), 3).acquire().release()  # released on exit
