"""End-to-end runs without a model: synthetic-oracle captions, resumption, ranks, workers, the stage."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from d2s.shards import completed_shards, iter_samples, read_samples
from densecap.cli import main


def run(*args) -> int:
    return main(["run", "--no-progress", *map(str, args)])


def all_samples(out: Path):
    return list(iter_samples(sorted(completed_shards(out))))


def test_oracle_run_writes_shards_manifest_report(world_dir, tmp_path):
    from d2s.synthetic import describe

    out = tmp_path / "out"
    assert run("--input", world_dir, "--out", out, "--filters", "length,repetition,refusal,garbage,grounding") == 0
    got = read_samples(out, "train") + read_samples(out, "val")
    assert len(got) == 32 and len({s.key for s in got}) == 32
    for s in got:
        (d,) = s.dense
        assert d.source == "synthetic-oracle" and d.model == "d2s.synthetic.describe"
        assert d.text == describe(json.loads(s.meta["scene"])) and d.verdict == "keep", d.scores
        assert len(s.sparse) == 5  # the input's sparse captions are carried over
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 24 and manifest["splits"]["val"]["count"] == 8
    report = out / "report"
    for f in ("summary.json", "reasons.csv", "lengths.png", "report.md", "rejects.jsonl", "shards.csv"):
        assert (report / f).exists(), f
    assert json.loads((report / "summary.json").read_text())["captions_by_verdict"] == {"keep": 32}
    # the per-source table is a markdown table (tabulate, a densecap dependency), not plain text
    md = (report / "report.md").read_text().splitlines()
    head = md.index("## Captions per source and verdict") + 2
    assert md[head].startswith("| source") and set(md[head + 1]) <= set("|:- ") and "|" in md[head + 1]
    assert md[head + 2].replace(" ", "") == "|synthetic-oracle|keep|32|"
    stats = json.loads((out / "train-000000.stats.json").read_text())
    assert stats["captions_requested"] == 8 and stats["captions_kept"] == 8 and "captions_per_s" in stats


def test_two_sources_coexist_and_rerun_is_a_noop(world_dir, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "".join(json.dumps({"question_id": f"train_{i:08d}", "text": f"imported text {i}"}) + "\n" for i in range(5))
    )
    out = tmp_path / "out"
    args = [
        "--input",
        world_dir,
        "--out",
        out,
        "--caption-source",
        "synthetic-oracle",
        "--caption-source",
        "import=llava-v1",
        "-C",
        f"1:path={corpus}",
        "-C",
        "1:model=llava-v1-13b",
        "--filters",
        "none",
    ]
    assert run(*args) == 0
    got = {s.id: s for s in all_samples(out)}
    assert [d.source for d in got["train_00000003"].dense] == ["synthetic-oracle", "llava-v1"]
    assert got["train_00000003"].dense[1].model == "llava-v1-13b"
    assert [d.source for d in got["train_00000010"].dense] == ["synthetic-oracle"]
    before = {p: Path(p).stat().st_mtime_ns for p in completed_shards(out)}
    assert run(*args) == 0  # everything complete: nothing rewritten
    assert before == {p: Path(p).stat().st_mtime_ns for p in completed_shards(out)}


def test_interrupted_leftovers_are_redone(world_dir, tmp_path):
    out = tmp_path / "out"
    assert run("--input", world_dir, "--out", out) == 0
    # simulate a crash: shard 1 renamed but no marker yet, shard 2 only a .tmp
    (out / "train-000001.stats.json").unlink()
    (out / "train-000002.tar").rename(out / "train-000002.tar.tmp")
    (out / "train-000002.stats.json").unlink()
    assert len(completed_shards(out)) == 2
    assert run("--input", world_dir, "--out", out) == 0
    keys = Counter(s.key for s in all_samples(out))
    assert len(keys) == 32 and set(keys.values()) == {1}
    assert not list(out.glob("*.tmp"))


def test_ranks_split_the_shards(world_dir, tmp_path):
    out = tmp_path / "out"
    assert run("--input", world_dir, "--out", out, "--rank", 1, "--world-size", 2) == 0
    first = set(completed_shards(out))
    assert len(first) == 2 and not (out / "manifest.json").exists()  # not all shards yet
    assert run("--input", world_dir, "--out", out, "--rank", 0, "--world-size", 2) == 0
    assert len(completed_shards(out)) == 4 and (out / "manifest.json").exists()
    keys = Counter(s.key for s in all_samples(out))
    assert len(keys) == 32 and set(keys.values()) == {1}


@pytest.mark.slow
def test_num_workers(world_dir, tmp_path):
    out = tmp_path / "out"
    assert run("--input", world_dir, "--out", out, "--num-workers", 2) == 0
    assert len(all_samples(out)) == 32


def test_config_file_and_errors(world_dir, tmp_path, capsys, caplog):
    cfg = tmp_path / "densecap.yaml"
    cfg.write_text(
        f"source: {{type: shards, params: {{path: {world_dir}}}}}\ncaption_sources: [{{type: synthetic-oracle}}]\n"
        f"filters: [{{type: length, params: {{min_words: 3}}}}]\nout: {tmp_path / 'o'}\n"
    )
    assert main(["run", "--config", str(cfg), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["filters"] == [{"type": "length", "params": {"min_words": 3}, "label": ""}]
    assert main(["run", "--config", str(cfg), "-F", "length.min_words=many"]) == 2
    assert "filters[0].params.min_words: expected an integer" in caplog.text
    assert main(["run", "--config", str(cfg), "--caption-source", "nope"]) == 2
    assert "unknown caption source 'nope'" in caplog.text
    assert main(["run", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "missing does not exist" in caplog.text


def test_help_documents_every_source_and_filter(capsys):
    from densecap.caption_sources import CAPTION_SOURCES
    from densecap.filters import FILTERS
    from densecap.images import IMAGE_SOURCES

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for reg in (IMAGE_SOURCES, CAPTION_SOURCES, FILTERS):
        for name in reg.names():
            assert f"  {name}: " in text, name
    assert main(["filters"]) == 0
    assert "min_words: int = 8" in capsys.readouterr().out


def test_densecap_pipeline_stage(world_dir, tmp_path, monkeypatch):
    from d2s.pipeline import Runner, load_pipeline, stage_types

    assert stage_types()["densecap"] == "densecap.stages:DensecapStage"
    monkeypatch.chdir(tmp_path)
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
                },
            }
        },
    }
    p = load_pipeline(doc=doc, run_dir=tmp_path / "run")
    report = Runner(p).run()
    assert report[0]["summary"]["captions_kept"] == 32
    out = p.stage("captions").outputs["shards"]
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["count"] == 24
    assert (p.stage("captions").outputs["report"] / "summary.json").exists()
    assert Runner(load_pipeline(doc=doc, run_dir=tmp_path / "run")).run()[0]["action"] == "skip"


def test_rerun_with_another_configuration_redoes_the_shards(world_dir, tmp_path):
    out = tmp_path / "out"
    # first pass: the length filter set so that every oracle text is dropped as too long
    assert run("--input", world_dir, "--out", out, "--filters", "length", "-F", "length.max_words=10") == 0
    assert all(d.verdict == "too_long" for s in all_samples(out) for d in s.dense)
    # same output dir, other filters: no shard of the first configuration may survive
    assert run("--input", world_dir, "--out", out, "--filters", "length") == 0
    got = all_samples(out)
    assert len(got) == 32 and all(d.verdict == "keep" for s in got for d in s.dense)
    hashes = {json.loads(Path(p[:-4] + ".stats.json").read_text())["config_hash"] for p in completed_shards(out)}
    assert len(hashes) == 1
