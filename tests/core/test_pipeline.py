import json
from pathlib import Path

import pytest
import yaml

from d2s.cli import main as d2s_main
from d2s.config import ConfigError
from d2s.pipeline import PipelineError, Runner, load_pipeline

TOY = "tests.core.toy_stages"


def pipeline_doc(**over):
    doc = {
        "name": "toy",
        "vars": {"word": "ab"},
        "stages": {
            "make": {"type": f"{TOY}:Write", "params": {"text": "${vars.word}", "repeat": 2}},
            "shout": {"type": f"{TOY}:Upper", "inputs": {"src": "${make.out}"}},
        },
    }
    doc.update(over)
    return doc


def calls(run_dir: Path) -> dict:
    p = run_dir / "calls.json"
    return json.loads(p.read_text()) if p.exists() else {}


def run(tmp_path, doc=None, overrides=(), **kw):
    p = load_pipeline(doc=doc or pipeline_doc(), overrides=list(overrides), run_dir=tmp_path / "run")
    return p, Runner(p).run(**kw)


def test_runs_in_order_and_caches(tmp_path):
    p, report = run(tmp_path)
    out = p.stage("shout").outputs["out"]
    assert out.read_text() == "ABAB"
    assert [r["action"] for r in report] == ["run", "run"]
    _, report = run(tmp_path)
    assert [r["action"] for r in report] == ["skip", "skip"]
    assert calls(tmp_path / "run") == {"make": 1, "shout": 1}


def test_changed_param_reruns_stage_and_downstream(tmp_path):
    run(tmp_path)
    p, report = run(tmp_path, overrides=["vars.word=xy"])
    assert [r["action"] for r in report] == ["run", "run"]
    assert p.stage("shout").outputs["out"].read_text() == "XYXY"
    # Changing only the downstream stage leaves the upstream one cached.
    _, report = run(tmp_path, overrides=["vars.word=xy", "shout.params.fail=false", "make.params.repeat=2"])
    assert [r["action"] for r in report] == ["skip", "skip"]


def test_missing_output_reruns(tmp_path):
    p, _ = run(tmp_path)
    p.stage("make").outputs["out"].unlink()
    _, report = run(tmp_path)
    assert report[0]["status"] == "outputs missing" and report[0]["action"] == "run"


def test_failed_stage_leaves_no_marker_and_reruns(tmp_path):
    with pytest.raises(RuntimeError):
        run(tmp_path, overrides=["shout.params.fail=true"])
    p, report = run(tmp_path)
    assert [r["action"] for r in report] == ["skip", "run"]
    assert calls(tmp_path / "run") == {"make": 1, "shout": 2}


def test_from_until_and_dry_run(tmp_path):
    _, report = run(tmp_path, dry_run=True)
    assert [r["action"] for r in report] == ["run", "run"] and calls(tmp_path / "run") == {}
    _, report = run(tmp_path, until="make")
    assert [r["stage"] for r in report] == ["make"]
    _, report = run(tmp_path, from_stage="shout")
    assert report[-1]["action"] == "run"
    _, report = run(tmp_path, from_stage="shout")  # --from forces the named stage
    assert report[-1]["action"] == "run"
    assert calls(tmp_path / "run") == {"make": 1, "shout": 2}


def test_from_requires_completed_upstream(tmp_path):
    with pytest.raises(PipelineError, match="upstream stage 'make' has never completed"):
        run(tmp_path, from_stage="shout")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["stages"]["make"].update(type="no-such-type"), "stage 'make'.type: unknown stage type"),
        (lambda d: d["stages"]["make"].update(type=f"{TOY}:NotAStage"), "not a d2s.pipeline.Stage"),
        (
            lambda d: d["stages"]["make"]["params"].update(colour=1),
            r"stage 'make' params: unknown field\(s\) \['colour'\]",
        ),
        (lambda d: d["stages"]["make"]["params"].update(repeat="x"), "stage 'make' params.repeat: expected an integer"),
        (lambda d: d["stages"]["make"]["params"].update(repeat=0), "stage 'make' params: repeat must be >= 1"),
        (lambda d: d["stages"]["shout"].update(inputs={}), "stage 'shout' inputs.src: required input is missing"),
        (lambda d: d["stages"]["shout"]["inputs"].update(src="/no/such/file"), "does not exist and no earlier stage"),
        (lambda d: d["stages"]["shout"]["inputs"].update(bogus="x"), "has no input 'bogus'"),
        (lambda d: d["stages"]["shout"]["inputs"].update(src="${nope.out}"), r"unknown reference \$\{nope.out\}"),
        (lambda d: d["stages"]["make"]["params"].update(text="${shout.out}"), "runs later"),
        (lambda d: d["stages"]["make"].update(outputs={"zzz": "x"}), "has no output 'zzz'"),
        (lambda d: d.update(extra=1), r"unknown top-level field\(s\) \['extra'\]"),
    ],
)
def test_validation_errors_name_stage_and_field(tmp_path, mutate, message):
    doc = pipeline_doc()
    mutate(doc)
    with pytest.raises(ConfigError, match=message):
        load_pipeline(doc=doc, run_dir=tmp_path)
    assert not (tmp_path / "calls.json").exists()


def test_bad_override_and_unknown_from(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_pipeline(doc=pipeline_doc(), overrides=["vars.word"], run_dir=tmp_path)
    p = load_pipeline(doc=pipeline_doc(), run_dir=tmp_path)
    with pytest.raises(PipelineError, match="--from 'zzz': no such stage"):
        Runner(p).run(from_stage="zzz")


def test_optional_input_and_literal_input_path_fingerprint(tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text("!")
    doc = pipeline_doc()
    doc["stages"]["shout"]["inputs"]["extra"] = str(extra)
    p, _ = run(tmp_path, doc=doc)
    assert p.stage("shout").outputs["out"].read_text() == "ABAB!"
    extra.write_text("?!")  # an input file that changes invalidates the stage
    _, report = run(tmp_path, doc=doc)
    assert [r["action"] for r in report] == ["skip", "run"]


def test_cli_writes_resolved_config_and_log(tmp_path, monkeypatch):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(pipeline_doc()))
    rd = tmp_path / "cli-run"
    assert d2s_main(["run", str(path), "--run-dir", str(rd), "vars.word=q"]) == 0
    resolved = yaml.safe_load((rd / "resolved.yaml").read_text())
    assert resolved["stages"]["make"]["params"] == {"text": "q", "repeat": 2}
    assert list((rd / "logs").glob("*.log")) and (rd / "shout" / "out").read_text() == "QQ"
    assert d2s_main(["run", str(path), "--run-dir", str(rd), "make.params.repeat=oops"]) == 2


def files_doc(n, outputs=None):
    stage = {"type": f"{TOY}:Files", "params": {"n": n}}
    if outputs:
        stage["outputs"] = outputs
    return {"name": "files", "stages": {"files": stage}}


def written(run_dir):
    return json.loads((run_dir / "written.json").read_text())


def test_interrupted_stage_resumes_on_its_outputs(tmp_path):
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "fail").touch()
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path, doc=files_doc(3))
    marker = json.loads((rd / "files" / "stage.json").read_text())
    assert marker["state"] == "running"
    (rd / "fail").unlink()
    p, report = run(tmp_path, doc=files_doc(3))
    assert report[0]["status"] == "interrupted" and report[0]["action"] == "run"
    assert written(rd) == [0, 1, 2]  # the file written before the interruption was kept, not redone
    assert json.loads((rd / "files" / "stage.json").read_text())["state"] == "done"


def test_changed_configuration_starts_from_clean_outputs(tmp_path):
    rd = tmp_path / "run"
    p, _ = run(tmp_path, doc=files_doc(2))
    (p.stage("files").outputs["dir"] / "stale.txt").write_text("from the old configuration")
    p, report = run(tmp_path, doc=files_doc(3))
    assert report[0]["status"] == "changed"
    assert sorted(f.name for f in p.stage("files").outputs["dir"].iterdir()) == ["0.txt", "1.txt", "2.txt"]
    assert written(rd) == [0, 1, 0, 1, 2]


def test_changed_stage_moves_outside_outputs_aside(tmp_path):
    outside = tmp_path / "shared-data"
    p, _ = run(tmp_path, doc=files_doc(1, {"dir": str(outside)}))
    h_old = json.loads((tmp_path / "run" / "files" / "stage.json").read_text())["hash"]
    run(tmp_path, doc=files_doc(2, {"dir": str(outside)}))
    assert sorted(f.name for f in outside.iterdir()) == ["0.txt", "1.txt"]
    aside = tmp_path / f"shared-data.stale-{h_old}"
    assert sorted(f.name for f in aside.iterdir()) == ["0.txt"]


def test_execution_params_stay_out_of_the_cache_key(tmp_path, monkeypatch):
    from tests.core import toy_stages

    monkeypatch.setattr(toy_stages.Write, "execution_params", ("repeat",), raising=False)
    run(tmp_path)
    _, report = run(tmp_path, overrides=["make.params.repeat=5"])  # how it runs, not what: still cached
    assert [r["action"] for r in report] == ["skip", "skip"]
    _, report = run(tmp_path, overrides=["make.params.text=zz"])
    assert [r["action"] for r in report] == ["run", "run"]


def test_log_messages_follow_the_current_stderr(capsys):
    import io
    import logging
    import sys

    from d2s.log import setup_logging

    setup_logging()
    old, sys.stderr = sys.stderr, io.StringIO()
    try:
        logging.getLogger("d2s.test").error("goes to the stderr of the moment")
        assert "goes to the stderr of the moment" in sys.stderr.getvalue()
    finally:
        sys.stderr = old


def test_a_stage_whose_params_name_an_earlier_output_reruns_when_that_stage_does(tmp_path):
    # e.g. densecap's grounding scorer: {path: ${scorer.bundle}} in params, not in inputs
    doc = pipeline_doc()
    doc["stages"]["other"] = {"type": f"{TOY}:Write", "params": {"text": "${make.out}", "repeat": 1}}
    _, report = run(tmp_path, doc=doc)
    assert [r["action"] for r in report] == ["run", "run", "run"]
    _, report = run(tmp_path, doc=doc, overrides=["make.params.repeat=3"])
    # 'other' has the same params (the path string) but 'make' reran: so does 'other'
    assert [r["action"] for r in report] == ["run", "run", "run"]
    _, report = run(tmp_path, doc=doc, overrides=["make.params.repeat=3"])
    assert [r["action"] for r in report] == ["skip", "skip", "skip"]


def test_an_input_inside_an_earlier_stages_output_dir(tmp_path):
    # e.g. a bench stage on ${d2s.run}/bundle-raw: a bundle inside a training stage's run dir
    doc = {
        "name": "toy",
        "stages": {
            "files": {"type": f"{TOY}:Files", "params": {"n": 2}},
            "shout": {"type": f"{TOY}:Upper", "inputs": {"src": "${files.dir}/1.txt"}},
        },
    }
    p, report = run(tmp_path, doc=doc)
    assert [r["action"] for r in report] == ["run", "run"]
    assert (
        p.stage("shout").outputs["out"].read_text() == (p.stage("files").outputs["dir"] / "1.txt").read_text().upper()
    )
    _, report = run(tmp_path, doc=doc)
    assert [r["action"] for r in report] == ["skip", "skip"]
    # the producing stage reran: so does the stage reading inside its output
    _, report = run(tmp_path, doc=doc, overrides=["files.params.n=3"])
    assert [r["action"] for r in report] == ["run", "run"]
    # a path inside no stage's output, that does not exist, is still refused at planning
    doc["stages"]["shout"]["inputs"]["src"] = str(tmp_path / "nowhere" / "1.txt")
    with pytest.raises(
        PipelineError, match="inputs.src: .*nowhere/1.txt does not exist and no earlier stage produces it"
    ):
        run(tmp_path, doc=doc)
