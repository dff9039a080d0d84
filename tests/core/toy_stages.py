"""Small stage types for runner tests, referenced as 'tests.core.toy_stages:Name'."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from d2s.pipeline import Stage, StageContext


@dataclass
class WriteParams:
    text: str = "hello"
    repeat: int = 1

    def __post_init__(self) -> None:
        if self.repeat < 1:
            raise ValueError("repeat must be >= 1")


def _bump(ctx: StageContext) -> None:
    counter = ctx.run_dir / "calls.json"
    calls = json.loads(counter.read_text()) if counter.exists() else {}
    calls[ctx.name] = calls.get(ctx.name, 0) + 1
    counter.write_text(json.dumps(calls))


class Write(Stage):
    """Writes params.text * repeat into outputs.out."""

    Params = WriteParams
    outputs = {"out": "a text file"}

    def run(self, ctx: StageContext) -> dict:
        _bump(ctx)
        ctx.outputs["out"].write_text(ctx.params.text * ctx.params.repeat)
        return {"chars": len(ctx.params.text) * ctx.params.repeat}


@dataclass
class UpperParams:
    fail: bool = False


class Upper(Stage):
    """Upper-cases inputs.src into outputs.out (fails on demand, before writing)."""

    Params = UpperParams
    inputs = {"src": "a text file", "extra?": "optional second text file"}
    outputs = {"out": "a text file"}

    def run(self, ctx: StageContext) -> dict:
        _bump(ctx)
        if ctx.params.fail:
            raise RuntimeError("asked to fail")
        text = Path(ctx.inputs["src"]).read_text()
        if "extra" in ctx.inputs:
            text += Path(ctx.inputs["extra"]).read_text()
        ctx.outputs["out"].write_text(text.upper())
        return {}


class NotAStage:
    pass


@dataclass
class FilesParams:
    n: int = 3


class Files(Stage):
    """Writes 0.txt .. n-1.txt into outputs.dir, skipping files already there (resumable);
    fails after the first new file while <run_dir>/fail exists."""

    Params = FilesParams
    outputs = {"dir": "a directory of files"}

    def run(self, ctx: StageContext) -> dict:
        d = ctx.outputs["dir"]
        d.mkdir(parents=True, exist_ok=True)
        log = ctx.run_dir / "written.json"
        written = json.loads(log.read_text()) if log.exists() else []
        for i in range(ctx.params.n):
            f = d / f"{i}.txt"
            if f.exists():
                continue
            f.write_text(str(i))
            written.append(i)
            log.write_text(json.dumps(written))
            if (ctx.run_dir / "fail").exists():
                raise RuntimeError("interrupted")
        return {}


@dataclass
class MeetParams:
    partner: str = ""  # a stage whose arrival this one waits for ("": none)
    release: str = ""  # a file under the run dir that must appear before this stage finishes
    linger: float = 0.0  # seconds to wait after that, before writing the output
    timeout: float = 60.0
    fail: bool = False
    die: bool = False  # SIGKILL its own process on arrival


class Meet(Stage):
    """Says it arrived (``<run_dir>/arrived/<name>`` holds its pid), fails or dies there on demand, waits
    for its partner stage to arrive and for the release file, then writes its pid to outputs.out.
    Two stages that are each other's partner finish only when they run at the same time."""

    Params = MeetParams
    inputs = {"src?": "a file to wait on (its stage runs first)"}
    outputs = {"out": "a text file: the pid of the process the stage ran in"}

    def run(self, ctx: StageContext) -> dict:
        import os
        import time

        p = ctx.params
        arrived = ctx.run_dir / "arrived"
        arrived.mkdir(exist_ok=True)
        (arrived / ctx.name).write_text(str(os.getpid()))
        ctx.log.info("arrived in process %d", os.getpid())
        if p.fail:
            raise RuntimeError(f"{ctx.name} asked to fail")
        if p.die:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        deadline = time.monotonic() + p.timeout
        for f in [arrived / p.partner] * bool(p.partner) + [ctx.run_dir / p.release] * bool(p.release):
            while not f.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{ctx.name}: {f} did not appear within {p.timeout} s")
                time.sleep(0.02)
        time.sleep(p.linger)
        ctx.outputs["out"].write_text(str(os.getpid()))
        import multiprocessing

        return {"pid": os.getpid(), "start_method": multiprocessing.get_start_method()}
