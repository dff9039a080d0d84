"""A caption source registered from outside the package, through the entry-point group.

This is the example of docs/caption-sources.md, installed the way pip installs a
distribution (a module plus a .dist-info with entry_points.txt on sys.path) and used by
a real `densecap` process.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from d2s.shards import read_samples
from tests.densecap.conftest import run_densecap

PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass

    from densecap.caption_sources import CaptionSource


    class Shouty(CaptionSource):
        """Says what the sparse captions say, loudly (an example caption source)."""

        @dataclass
        class Params:
            suffix: str = "!"

        async def caption(self, samples):
            self.model = "shouty-1"
            return [self.dense(" ".join(s.sparse).upper() + self.params.suffix) for s in samples]
''')


def install_plugin(site) -> None:
    (site / "shouty_plugin.py").write_text(PLUGIN)
    dist = site / "shouty_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shouty-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[densecap.caption_sources]\nshouty = shouty_plugin:Shouty\n")


@pytest.mark.slow
def test_external_caption_source_via_entry_point(world_dir, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site)
    env = {"PYTHONPATH": str(site)}
    listed = run_densecap(["caption-sources"], env=env)
    assert listed.returncode == 0, listed.stderr
    assert "shouty: Says what the sparse captions say" in listed.stdout and "suffix: str = '!'" in listed.stdout
    out = tmp_path / "out"
    r = run_densecap(
        [
            "run",
            "--no-progress",
            "--input",
            str(world_dir),
            "-S",
            "split=val",
            "--caption-source",
            "shouty",
            "-C",
            "suffix=_LOUD",
            "--filters",
            "length",
            "--out",
            str(out),
        ],
        env=env,
    )
    assert r.returncode == 0, r.stderr
    (s, *_) = read_samples(out, "val")
    (d,) = s.dense
    assert d.source == "shouty" and d.model == "shouty-1" and d.text == " ".join(s.sparse).upper() + "_LOUD"
    # without the plug-in on the path the name is unknown, with a clear message
    r = run_densecap(["run", "--input", str(world_dir), "--caption-source", "shouty", "--out", str(tmp_path / "o2")])
    assert r.returncode == 2 and "unknown caption source 'shouty'" in r.stderr
    assert json.loads((out / "manifest.json").read_text())["splits"]["val"]["count"] == 8
