"""Importing existing dense-caption corpora in each supported format."""

from __future__ import annotations

import asyncio
import json

import pytest

from d2s.config import ConfigError
from d2s.schema import Sample
from densecap.caption_sources import CAPTION_SOURCES


def samples():
    return [
        Sample("a", b"x", "jpg", "9", "coco", "train", path="val2014/COCO_val2014_000000000009.jpg"),
        Sample("b", b"x", "jpg", "25", "coco", "train", path="train2014/COCO_train2014_000000000025.jpg"),
        Sample("c", b"x", "jpg", "77", "coco", "train", path="x/000000000077.jpg"),
    ]


def caption(params):
    src = CAPTION_SOURCES.create("import", params, "caption_sources[0].params")

    async def go():
        await src.start()
        return await src.caption(samples())

    return src, asyncio.run(go())


def test_llava_jsonl(tmp_path):
    p = tmp_path / "llava.jsonl"
    p.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "question_id": 9,
                    "prompt": "Describe this image in detail.",
                    "text": "dense nine",
                    "model_id": "llava-v1-13b",
                },
                {"question_id": 25, "text": "dense twenty-five"},
            ]
        )
        + "\n"
    )
    src, out = caption({"path": str(p), "model": "llava-v1-13b", "prompt": "Describe this image in detail."})
    assert [d.text if d else None for d in out] == ["dense nine", "dense twenty-five", None]
    assert out[0].source == "import" and out[0].model == "llava-v1-13b" and out[0].prompt.startswith("Describe")
    assert src.missing == 1


def test_sharegpt4v_json(tmp_path):
    p = tmp_path / "share-captioner_coco_lcs_sam_1246k_1107.json"
    p.write_text(
        json.dumps(
            [
                {
                    "id": "000000000009",
                    "image": "coco/train2017/000000000009.jpg",
                    "conversations": [
                        {"from": "human", "value": "<image>\nAnalyze the image."},
                        {"from": "gpt", "value": " sg nine "},
                    ],
                },
                {"id": "sa_1", "image": "sam/images/sa_1.jpg", "conversations": [{"from": "gpt", "value": "sam"}]},
                {
                    "id": "x",
                    "image": "coco/train2017/000000000077.jpg",
                    "conversations": [{"from": "gpt", "value": "sg 77"}],
                },
            ]
        )
    )
    _, out = caption({"path": str(p)})
    assert [d.text if d else None for d in out] == ["sg nine", None, "sg 77"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_generic_tables(tmp_path, fmt):
    import pandas as pd

    df = pd.DataFrame({"image_id": ["9", "25"], "caption": ["t nine", "t 25"], "extra": [1, 2]})
    p = tmp_path / f"corpus.{fmt}"
    {
        "csv": lambda: df.to_csv(p, index=False),
        "jsonl": lambda: df.to_json(p, orient="records", lines=True),
        "parquet": lambda: df.to_parquet(p),
    }[fmt]()
    _, out = caption({"path": str(p), "format": "table", "id_field": "image_id", "text_field": "caption"})
    assert [d.text if d else None for d in out] == ["t nine", "t 25", None]


def test_import_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question_id": 1, "text": "a"}\n{broken\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        caption({"path": str(p), "format": "llava-jsonl"})
    q = tmp_path / "t.csv"
    q.write_text("name,desc\n9,x\n")
    with pytest.raises(ConfigError, match="columns"):
        caption({"path": str(q)})
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        caption({"path": str(tmp_path / "missing.jsonl")})
