"""Issue 13: vllm-server with several servers (base_urls), with the local executor.

Two fault-injecting OpenAI-compatible servers on 127.0.0.1 (tests/densecap/fake_openai.py); one
stops answering mid-run. The same against real vLLM servers on Ray: test_ray.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

from d2s.shards import completed_shards
from tests.densecap.fake_openai import FakeOpenAI
from tests.densecap.test_reliability import image_folder, run_cli, samples, stats_of


def test_one_of_two_servers_dies_mid_run_work_moves_failures_recorded_and_filled(tmp_path):
    files = image_folder(tmp_path / "photos", 12)
    out = tmp_path / "out"
    with FakeOpenAI() as a, FakeOpenAI() as b:
        args = [
            "--source",
            "folder",
            "--input",
            tmp_path / "photos",
            "-S",
            "chunk_size=4",
            "--batch-size",
            2,
            "--filters",
            "length",
            "--out",
            out,
            "--caption-source",
            "vllm-server",
            "-C",
            f"base_urls=[{a.base_url},{b.base_url}]",
            "-C",
            "model=fake-vlm",
            "-C",
            "concurrency=2",
            "-C",
            "max_retries=0",
            "-C",
            "max_consecutive_failures=2",
            "-C",
            "backoff=0.01",
        ]
        stop = threading.Event()

        def kill_b() -> None:  # b stops answering after its 3rd request (connections closed, no reply)
            while not stop.is_set() and len(b.log) < 3:
                time.sleep(0.005)
            b.down = True

        t = threading.Thread(target=kill_b, daemon=True)
        t.start()
        try:
            rc = run_cli(*args)
        finally:
            stop.set()
            t.join()
        assert b.down and len(b.log) >= 3 and len(a.log) > 0  # both served, then b died
        got = samples(out)
        assert Counter(s.id for s in got) == Counter({n: 1 for n in files})
        failed = [s for s in got if s.dense[0].error]
        assert failed and rc == 3  # no retries here: requests that hit b after it died fail, per image
        for s in failed:
            assert b.base_url in s.dense[0].error and s.dense[0].verdict == "error"
        stats = stats_of(out)
        assert sum(st["caption_errors"] for st in stats.values()) == len(failed)
        last = stats[max(stats)]["endpoints"]["vllm-server"]
        assert "consecutive failed attempts" in last[b.base_url]["down"] and "down" not in last[a.base_url]
        assert (
            sum(st["endpoints"]["vllm-server"][a.base_url]["ok"] for st in stats.values())
            >= len(files) - len(failed) - 3
        )
        requested_from_a = len(a.log)

        # rerun with b still dead: it is left out at start (recorded), a fills the failures
        clean = {p: st for p, st in completed_shards(out).items() if not st["caption_errors"]}
        assert run_cli(*args) == 0
        assert len(a.log) - requested_from_a == len(failed)  # only the failed captions were asked again
    got = samples(out)
    assert Counter(s.id for s in got) == Counter({n: 1 for n in files})
    assert all(not s.dense[0].error and s.dense[0].text for s in got)
    for st in stats_of(out).values():
        if st["filled"]:
            assert st["endpoints"]["vllm-server"][b.base_url]["down"].startswith("at start")
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] == 12
    assert all(stats_of(out)[p.split("/")[-1]] == st for p, st in clean.items())


def test_all_servers_down_at_start_fails_clearly_and_one_alive_is_enough(tmp_path):
    image_folder(tmp_path / "photos", 2)
    with FakeOpenAI() as a, FakeOpenAI() as b:
        a.down = b.down = True
        common = [
            "--source",
            "folder",
            "--input",
            tmp_path / "photos",
            "--filters",
            "length",
            "--caption-source",
            "vllm-server",
            "-C",
            f"base_urls=[{a.base_url},{b.base_url}]",
            "-C",
            "model=fake-vlm",
            "-C",
            "connect_timeout=2",
        ]
        assert run_cli(*common, "--out", tmp_path / "none") == 2
        assert not completed_shards(tmp_path / "none")
        a.down = False
        assert run_cli(*common, "--out", tmp_path / "one") == 0
        assert len(b.log) == 0 and len(a.log) == 2
