"""Training and bench stages take the integrity index stages' outputs as inputs: they run after
those stages (also with ``--jobs``) and again when the index changes (docs/corpus-integrity.md)."""

import copy

import pytest

from d2s.pipeline import Runner, load_pipeline

DOC = {
    "name": "integrity",
    "stages": {
        "world": {"type": "synthetic-world", "params": {"train": 8, "val": 4, "test": 4}},
        "captions": {
            "type": "densecap",
            "inputs": {"shards": "${world.shards}"},
            "params": {"source": {"type": "synthetic-world"}, "caption_sources": [{"type": "synthetic-oracle"}]},
        },
        "dedup": {"type": "densecap-dedup", "inputs": {"shards": "${captions.shards}"}},
        "train": {
            "type": "vse-train",
            "inputs": {"shards": "${captions.shards}", "dedup": "${dedup.index}"},
            "params": {"recipe": "baseline", "model": "tiny-vit", "steps": 2},
        },
        "bench": {
            "type": "bench-retrieval",
            "inputs": {"bundle": "${train.bundle}", "shards": "${captions.shards}", "dedup": "${dedup.index}"},
        },
    },
}


def hashes(tmp_path, doc) -> dict[str, str]:
    p = load_pipeline(doc=doc, run_dir=tmp_path / "run")
    runner = Runner(p)
    report = runner.run(dry_run=True)
    return {r["stage"]: r["hash"] for r in report} | {
        f"{s.name} after": ",".join(sorted(runner.depends_on(s))) for s in p.stages
    }


@pytest.mark.parametrize("wired", [True, False])
def test_a_changed_dedup_index_retrains_and_rebenches_only_when_wired(tmp_path, wired):
    doc = copy.deepcopy(DOC)
    if not wired:
        for s in ("train", "bench"):
            del doc["stages"][s]["inputs"]["dedup"]
    changed = copy.deepcopy(doc)
    changed["stages"]["dedup"]["params"] = {"image_distance": 2}
    before, after = hashes(tmp_path, doc), hashes(tmp_path, changed)
    assert before["captions"] == after["captions"] and before["dedup"] != after["dedup"]
    assert (before["train"] != after["train"]) is wired
    assert (before["bench"] != after["bench"]) is wired
    # with --jobs, training waits for the index only when wired
    assert ("dedup" in before["train after"].split(",")) is wired
    assert before["bench after"] == ("captions,dedup,train" if wired else "captions,train")


def test_bench_refuses_a_dedup_index_without_shards(tmp_path):
    import logging

    from bench.datasets import DatasetError
    from bench.stages import BenchRetrievalParams, BenchRetrievalStage
    from d2s.pipeline import StageContext

    ctx = StageContext(
        name="bench",
        run_dir=tmp_path,
        work_dir=tmp_path / "bench",
        params=BenchRetrievalParams(benchmark="urban1k"),
        inputs={"bundle": str(tmp_path / "bundle"), "data": str(tmp_path), "dedup": str(tmp_path / "index")},
        outputs={"results": tmp_path / "bench" / "results"},
        log=logging.getLogger("test"),
    )
    with pytest.raises(DatasetError, match="inputs.dedup: an index of shards"):
        BenchRetrievalStage().run(ctx)
