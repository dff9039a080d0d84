"""Record (or rerun) the trainer's per-step losses on a fixed seed: the reference the speed-ups
of the trainer are checked against (tests/vse/test_reference_losses.py).

Three short runs on a tiny synthetic world (the test suite's world: 512 train / 64 val
images, tiny-vit, batch 32, one thread), each recording every step's loss terms and lr
(``log_every: 1``), the final validation metrics and a SHA-256 of the final weights:

- ``stage1``: the stage-1 recipe as registered (the reference's hardest-negative triplet with
  its one-epoch warm-up of summed hinges; the switch happens at step 16 of 24);
- ``stage1_quickstart``: stage 1 as the quickstart trains it (InfoNCE summed over the batch,
  full backbone lr, cosine schedule with warm-up), through one data-loader worker;
- ``stage2``: the stage-2 recipe (triplet on sparse captions with the student head, the
  frozen stage-1 text encoder as teacher in train mode, cosine distillation) from ``stage1``.

Record the fixture (only with the code before a speed-up; the file names the commit)::

    .venv/bin/python -m tests.vse.record_reference_losses --out tests/vse/data/reference_losses.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STEPS = 24


def base_doc(world: Path, assets: Path, out: Path, **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "shards": str(world),
        "out": str(out),
        "assets": str(assets),
        "model": "tiny-vit",
        "steps": STEPS,
        "seed": 0,
        "threads": 1,
        "tracker": "none",
        "log_every": 1,
        "save_every": 1000,
        "data": {"batch_size": 32, "num_workers": 0, "shuffle_buffer": 64},
        "optim": {"lr": 1e-3},
    }
    doc.update(kw)
    return doc


RUNS: dict[str, dict[str, Any]] = {
    "stage1": {"recipe": "stage1"},
    "stage1_quickstart": {
        "recipe": "stage1",
        "lr_mult": {"image_backbone": 1.0, "text_backbone": 1.0},
        "align_loss": {"kind": "infonce", "params": {"reduction": "sum"}},
        "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 5},
        "data": {"batch_size": 32, "num_workers": 1, "shuffle_buffer": 64},
    },
    "stage2": {"recipe": "stage2", "init": "stage1"},  # init: the stage1 run's result
}


def weights_sha(checkpoint: Path) -> str:
    """SHA-256 over the tensors of a checkpoint's weights (names, dtypes, bytes)."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for k, v in sorted(load_file(str(checkpoint / "model.safetensors")).items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def read_metrics(run_dir: Path) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Per-step losses and lr (one record per step), and the last validation's metrics."""
    steps, val = [], {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if any(k.startswith("loss/") for k in rec):
            steps.append({k: v for k, v in rec.items() if k.startswith("loss/") or k in ("step", "lr")})
        elif any(k.startswith("val/") for k in rec):
            val = {k: v for k, v in rec.items() if k.startswith("val/")}
    return steps, val


def run_all(work: Path, names: list[str] | None = None) -> dict[str, Any]:
    """Build the world and assets in ``work``, run the reference runs, return their records."""
    import torch

    from tests.vse.conftest import write_world_with_dense
    from vse.assets import build_assets
    from vse_train.config import parse_config
    from vse_train.train import train

    torch.set_num_threads(1)
    world = write_world_with_dense(work / "world")
    assets = work / "assets"
    build_assets(world, assets, ["tiny-vit"])
    out: dict[str, Any] = {}
    summaries: dict[str, dict] = {}
    for name, extra in RUNS.items():
        if names is not None and name not in names and not any(RUNS[n].get("init") == name for n in names):
            continue
        extra = dict(extra)
        if "init" in extra:
            extra["init"] = summaries[extra["init"]]["checkpoint"]
        run_dir = work / name
        summaries[name] = train(parse_config(base_doc(world, assets, run_dir, **extra)))
        steps, val = read_metrics(run_dir)
        out[name] = {"steps": steps, "val": val, "last_weights_sha256": weights_sha(run_dir / "last")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the JSON fixture to write")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--", "packages"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    )
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        runs = run_all(Path(tmp))
    doc = {
        "commit": commit,
        "packages_dirty": dirty,
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "-m", "tests.vse.record_reference_losses"])
        + f" --out {shlex.quote(str(args.out))}",
        "torch": torch.__version__,
        "steps": STEPS,
        "runs": runs,
    }
    from d2s.atomic import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, doc)
    print(f"wrote {args.out} (commit {commit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
