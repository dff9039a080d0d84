"""Pipelines: YAML files of named stages, validated whole, run with caching and resumption.

See ``docs/pipeline-format.md``. In short::

    name: demo
    vars: {seed: 0}
    stages:
      world:                          # stage name
        type: synthetic-world         # a registered stage type (entry point group d2s.stages)
        params: {n_train: 1000, seed: "${vars.seed}"}
      captions:
        type: densecap
        inputs: {shards: "${world.shards}"}   # an earlier stage's output

A stage is skipped when its marker (``<run_dir>/<stage>/stage.json``) holds the same
hash of (type, version, params, inputs) and its outputs exist; a changed parameter or a
changed upstream stage reruns it and everything downstream of it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .atomic import atomic_write_json
from .config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from .registry import Registry

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "d2s.stages"
_REF = re.compile(r"\$\{([^}]+)\}")


class PipelineError(ConfigError):
    """A pipeline that cannot run as written; the message names the stage and field."""


@dataclass
class StageContext:
    """What a stage's ``run`` gets: its typed params, resolved inputs and outputs."""

    name: str
    run_dir: Path
    work_dir: Path
    params: Any
    inputs: dict[str, Any]
    outputs: dict[str, Path]
    log: logging.Logger


class Stage:
    """Base of every stage type.

    Subclasses set ``Params`` (a dataclass), ``inputs`` and ``outputs`` (name ->
    description; an input whose name ends in ``?`` is optional) and implement ``run``.
    ``version`` is part of the cache key: bump it when the stage's output for the same
    params changes. ``execution_params`` names params that decide how the stage runs but
    not what it produces (workers, this machine's rank): they are left out of the cache key,
    so changing them neither invalidates nor clears outputs. ``run`` must write its outputs resumably (temporary names, markers)
    so that an interrupted stage restarted later finishes the job.
    """

    Params: ClassVar[type] = type("NoParams", (), {"__dataclass_fields__": {}})
    inputs: ClassVar[dict[str, str]] = {}
    outputs: ClassVar[dict[str, str]] = {}
    version: ClassVar[str] = "1"
    execution_params: ClassVar[tuple[str, ...]] = ()

    def run(self, ctx: StageContext) -> dict[str, Any] | None:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def cache_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The params (as plain data) that go into the cache key: all but ``execution_params``.
        A stage type may leave out more, e.g. densecap leaves out where its caption server is."""
        return {k: v for k, v in params.items() if k not in cls.execution_params}


STAGES: Registry[type[Stage]] = Registry(
    "stage type", ENTRY_POINT_GROUP, base=Stage, error=PipelineError, name_attr=None, items="class"
)
"""Stage types: the ``d2s.stages`` entry points of installed packages (and ``STAGES.register`` in code)."""


def stage_types() -> dict[str, str]:
    """Registered stage types: name -> 'module:attr' (from installed packages' entry points)."""
    return STAGES.targets()


def load_stage_type(type_name: str, where: str) -> type[Stage]:
    try:
        return STAGES.get(type_name)
    except PipelineError as exc:
        raise PipelineError(f"{where}.type: {exc}") from None


@dataclass
class PlannedStage:
    name: str
    type_name: str
    cls: type[Stage]
    params: Any
    inputs: dict[str, Any]
    outputs: dict[str, Path]
    work_dir: Path
    upstream: list[str] = field(default_factory=list)


@dataclass
class Pipeline:
    name: str
    path: Path | None
    run_dir: Path
    vars: dict[str, Any]
    stages: list[PlannedStage]
    resolved: dict[str, Any]

    def stage(self, name: str) -> PlannedStage:
        for s in self.stages:
            if s.name == name:
                return s
        raise PipelineError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")


def _interpolate(value: Any, scope: dict[str, Any], where: str, deps: set[str]) -> Any:
    """Replace ``${...}`` references; a value that is exactly one reference keeps its type."""
    if isinstance(value, dict):
        return {k: _interpolate(v, scope, f"{where}.{k}", deps) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, scope, f"{where}[{i}]", deps) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(ref: str) -> Any:
        ref = ref.strip()
        if ref in scope:
            if ref.count(".") == 1 and ref.split(".")[0] in scope["__stages__"]:
                deps.add(ref.split(".")[0])
            return scope[ref]
        stage = ref.split(".")[0]
        if stage in scope["__later__"]:
            raise PipelineError(f"{where}: ${{{ref}}} refers to stage {stage!r}, which runs later")
        known = sorted(k for k in scope if not k.startswith("__"))
        raise PipelineError(f"{where}: unknown reference ${{{ref}}}; known: {known}")

    m = _REF.fullmatch(value)
    if m:
        return lookup(m.group(1))
    return _REF.sub(lambda mm: str(lookup(mm.group(1))), value)


def load_pipeline(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    doc: dict | None = None,
    run_dir: str | Path | None = None,
) -> Pipeline:
    """Read, override, interpolate and validate a whole pipeline before anything runs."""
    doc, src = _read_pipeline_doc(path, overrides, doc)
    name = doc.get("name") or (Path(path).stem if path else "pipeline")
    vars_ = doc.get("vars") or {}
    if not isinstance(vars_, dict):
        raise PipelineError(f"{src}: 'vars' must be a mapping")
    rd = Path(run_dir or doc.get("run_dir") or f"runs/{name}")
    if not rd.is_absolute():
        rd = (Path.cwd() / rd).resolve()
    scope = _initial_scope(name, rd, Path(path).resolve().parent.parent if path else Path.cwd(), vars_, doc)
    planned: list[PlannedStage] = []
    produced: dict[str, str] = {}  # output path -> stage
    for sname, sdoc in doc["stages"].items():
        scope["__later__"].discard(sname)
        s = _plan_stage(str(sname), sdoc, scope, produced, rd)
        planned.append(s)
        scope["__stages__"].add(s.name)
        for k, p in s.outputs.items():
            scope[f"{s.name}.{k}"] = str(p)
            produced[str(p)] = s.name
    resolved = {
        "name": name,
        "run_dir": str(rd),
        "vars": {k: scope[f"vars.{k}"] for k in vars_},
        "stages": {
            s.name: {
                "type": s.type_name,
                "params": to_dict(s.params) if s.params is not None else {},
                "inputs": s.inputs,
                "outputs": {k: str(v) for k, v in s.outputs.items()},
            }
            for s in planned
        },
    }
    return Pipeline(name, Path(path) if path else None, rd, resolved["vars"], planned, resolved)


def _read_pipeline_doc(path: str | Path | None, overrides: list[str] | None, doc: dict | None) -> tuple[dict, str]:
    """The pipeline document with the overrides applied, and how to name it in messages."""
    if doc is None:
        if path is None:
            raise ValueError("load_pipeline needs a path or a doc")
        doc = load_yaml(path)
    doc = copy.deepcopy(doc)
    src = str(path) if path else "pipeline"
    stages_doc = doc.get("stages")
    if not isinstance(stages_doc, dict) or not stages_doc:
        raise PipelineError(f"{src}: 'stages' must be a non-empty mapping of stage name -> stage")
    # Shorthand overrides: 'world.params.n_train=10' means 'stages.world.params.n_train=10'.
    full = []
    for o in overrides or []:
        head = o.split("=", 1)[0].split(".")[0]
        full.append(f"stages.{o}" if head in stages_doc else o)
    apply_overrides(doc, full)
    unknown_top = sorted(set(doc) - {"name", "run_dir", "vars", "stages", "description"})
    if unknown_top:
        raise PipelineError(f"{src}: unknown top-level field(s) {unknown_top}")
    return doc, src


def _initial_scope(name: str, rd: Path, base: Path, vars_: dict, doc: dict) -> dict[str, Any]:
    """What ``${...}`` can refer to before any stage: name, run_dir, project_dir and the vars."""
    scope: dict[str, Any] = {"name": name, "run_dir": str(rd), "project_dir": str(base)}
    scope["__stages__"] = set()
    scope["__later__"] = set(doc["stages"])
    for k, v in vars_.items():
        scope[f"vars.{k}"] = v
    # vars may refer to run_dir / other vars defined before them
    for k, v in vars_.items():
        scope[f"vars.{k}"] = _interpolate(v, scope, f"vars.{k}", set())
    return scope


def _plan_stage(sname: str, sdoc: Any, scope: dict[str, Any], produced: dict[str, str], rd: Path) -> PlannedStage:
    """One stage, validated: its type, typed params, inputs (declared, existing) and outputs."""
    where = f"stage {sname!r}"
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", sname):
        raise PipelineError(f"{where}: stage names may use letters, digits, '-' and '_'")
    if not isinstance(sdoc, dict) or "type" not in sdoc:
        raise PipelineError(f"{where}: needs a 'type'")
    bad = sorted(set(sdoc) - {"type", "params", "inputs", "outputs", "description"})
    if bad:
        raise PipelineError(f"{where}: unknown field(s) {bad}; a stage has type, params, inputs, outputs")
    cls = load_stage_type(sdoc["type"], where)
    deps: set[str] = set()
    raw_params = _interpolate(sdoc.get("params") or {}, scope, f"{where} params", deps)
    params = from_dict(cls.Params, raw_params, f"{where} params") if dataclasses.is_dataclass(cls.Params) else None
    raw_inputs = _interpolate(sdoc.get("inputs") or {}, scope, f"{where} inputs", deps)
    _check_inputs(cls, sdoc["type"], raw_inputs, produced, where)
    raw_outputs = _interpolate(sdoc.get("outputs") or {}, scope, f"{where} outputs", set())
    for k in raw_outputs:
        if k not in cls.outputs:
            raise PipelineError(
                f"{where} outputs.{k}: stage type {sdoc['type']!r} has no output {k!r}; outputs: {sorted(cls.outputs)}"
            )
    work = rd / sname
    outputs = {k: Path(raw_outputs.get(k) or work / k).resolve() for k in cls.outputs}
    return PlannedStage(sname, sdoc["type"], cls, params, raw_inputs, outputs, work, sorted(deps))


def _check_inputs(cls: type[Stage], type_name: str, raw_inputs: Any, produced: dict[str, str], where: str) -> None:
    if not isinstance(raw_inputs, dict):
        raise PipelineError(f"{where} inputs: must be a mapping")
    declared = {k.rstrip("?"): k.endswith("?") for k in cls.inputs}
    for k in raw_inputs:
        if k not in declared:
            raise PipelineError(
                f"{where} inputs.{k}: stage type {type_name!r} has no input {k!r}; inputs: {sorted(declared)}"
            )
    for k, optional in declared.items():
        if k not in raw_inputs and not optional:
            raise PipelineError(f"{where} inputs.{k}: required input is missing")
    for k, v in raw_inputs.items():
        if isinstance(v, str) and producer(v, produced) is None and not Path(v).exists() and not _looks_remote(v):
            raise PipelineError(f"{where} inputs.{k}: {v} does not exist and no earlier stage produces it")


def producer(path: str, produced: dict[str, str]) -> tuple[str, str] | None:
    """(stage, path relative to its output) of the earlier stage whose output ``path`` is or
    lies in (e.g. ``${d2s.run}/bundle-raw``: a file inside a run dir); None: no stage's."""
    if path in produced:
        return produced[path], "."
    p = Path(path)
    inside = [out for out in produced if p.is_relative_to(out)]
    if not inside:
        return None
    out = max(inside, key=len)  # the innermost output
    return produced[out], str(p.relative_to(out))


def _looks_remote(v: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*://", v)) or v.startswith("hf:")


def fingerprint_path(p: Path) -> str:
    """Cheap identity of an input that no stage produced: names, sizes and mtimes."""
    h = hashlib.sha256()
    if p.is_file():
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    elif p.is_dir():
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for f in sorted(files):
                fp = Path(root) / f
                st = fp.stat()
                h.update(f"{fp.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    else:
        h.update(str(p).encode())
    return h.hexdigest()


class Runner:
    """Runs a validated pipeline: cached stages are skipped, others run in order."""

    def __init__(self, pipeline: Pipeline):
        self.p = pipeline
        self.hashes: dict[str, str] = {}

    def marker_path(self, s: PlannedStage) -> Path:
        return s.work_dir / "stage.json"

    def read_marker(self, s: PlannedStage) -> dict | None:
        mp = self.marker_path(s)
        if not mp.exists():
            return None
        try:
            return json.loads(mp.read_text())
        except json.JSONDecodeError:
            return None

    def stage_hash(self, s: PlannedStage) -> str:
        produced = {str(p): st.name for st in self.p.stages for p in st.outputs.values()}
        inputs = {}
        for k, v in sorted(s.inputs.items()):
            made_by = producer(v, produced) if isinstance(v, str) else None
            if made_by is not None:
                stage, inside = made_by
                inputs[k] = {"stage": stage, "hash": self.hashes.get(stage, "missing")}
                if inside != ".":
                    inputs[k]["inside"] = inside
            elif isinstance(v, str) and Path(v).exists():
                inputs[k] = {"path": v, "fingerprint": fingerprint_path(Path(v))}
            else:
                inputs[k] = v
        params = to_dict(s.params) if s.params is not None else {}
        # stages that params (not inputs) refer to, e.g. a scorer's bundle path: their outputs
        # decide this stage's result as much as its inputs do
        via_inputs = {x["stage"] for x in inputs.values() if isinstance(x, dict) and "stage" in x}
        param_deps = {d: self.hashes.get(d, "missing") for d in s.upstream if d not in via_inputs and d in self.hashes}
        key = {
            "type": s.type_name,
            "version": s.cls.version,
            "params": s.cls.cache_params(params),
            "inputs": inputs,
            "outputs": {k: str(v) for k, v in s.outputs.items()},
            **({"param_deps": param_deps} if param_deps else {}),
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def status(self, s: PlannedStage) -> str:
        h = self.hashes[s.name]
        m = self.read_marker(s)
        if m is None:
            return "new"
        if m.get("hash") != h:
            return "changed"
        if m.get("state") == "running":
            return "interrupted"
        if not all(p.exists() for p in s.outputs.values()):
            return "outputs missing"
        return "cached"

    def run(
        self,
        *,
        from_stage: str | None = None,
        until: str | None = None,
        dry_run: bool = False,
        force: bool = False,
        jobs: int = 1,
    ) -> list[dict[str, Any]]:
        """Run the stages from ``from_stage`` to ``until`` that are not cached; ``jobs`` > 1 runs up
        to that many at once, each in a process of its own, a stage starting as soon as the stages
        it depends on have finished (:mod:`d2s.stage_pool`)."""
        if jobs < 1:
            raise PipelineError(f"--jobs must be >= 1, got {jobs}")
        names = [s.name for s in self.p.stages]
        for flag, val in (("--from", from_stage), ("--until", until)):
            if val is not None and val not in names:
                raise PipelineError(f"{flag} {val!r}: no such stage; stages: {names}")
        start = names.index(from_stage) if from_stage else 0
        stop = names.index(until) if until else len(names) - 1
        if start > stop:
            raise PipelineError(f"--from {from_stage!r} comes after --until {until!r}")
        report = []
        todo: list[tuple[PlannedStage, dict]] = []
        for i, s in enumerate(self.p.stages):
            if i < start:
                # Earlier stages are taken as they are on disk.
                m = self.read_marker(s)
                if m is None and any(s.name in t.upstream for t in self.p.stages[start : stop + 1]):
                    raise PipelineError(f"--from {from_stage!r}: upstream stage {s.name!r} has never completed")
                self.hashes[s.name] = (m or {}).get("hash", "missing")
                report.append({"stage": s.name, "status": "before --from"})
                continue
            if i > stop:
                break
            self.hashes[s.name] = self.stage_hash(s)
            status = self.status(s)
            must_run = force or (from_stage == s.name) or status != "cached"
            entry = {"stage": s.name, "type": s.type_name, "hash": self.hashes[s.name], "status": status}
            if dry_run:
                entry["action"] = "run" if must_run else "skip"
                log.info("[dry-run] %-12s %-18s %-16s -> %s", s.name, s.type_name, status, entry["action"])
                report.append(entry)
                continue
            if not must_run:
                log.info("stage %s: cached (%s), skipping", s.name, self.hashes[s.name])
                entry["action"] = "skip"
                report.append(entry)
                continue
            entry["action"] = "run"
            report.append(entry)
            todo.append((s, entry))
        if jobs == 1 or len(todo) < 2:
            for s, entry in todo:
                self._run_stage(s, entry)
        else:
            from .stage_pool import run_at_once

            run_at_once(
                todo,
                jobs,
                run_dir=self.p.run_dir,
                depends_on=self.depends_on,
                begin=self.begin_stage,
                body=run_stage_body,
                finish=self.finish_stage,
            )
        return report

    def depends_on(self, s: PlannedStage) -> set[str]:
        """The stages whose outputs ``s`` reads: named in its params or inputs, or holding a path
        that it takes as an input."""
        produced = {str(p): st.name for st in self.p.stages for p in st.outputs.values()}
        deps = set(s.upstream)
        for v in s.inputs.values():
            made_by = producer(v, produced) if isinstance(v, str) else None
            if made_by is not None:
                deps.add(made_by[0])
        deps.discard(s.name)
        return deps

    def _run_stage(self, s: PlannedStage, entry: dict) -> dict:
        self.begin_stage(s)
        return self.finish_stage(s, entry, *run_stage_body(s, self.p.run_dir))

    def begin_stage(self, s: PlannedStage) -> None:
        """Before a stage runs: clear another configuration's outputs, mark it running."""
        mp = self.marker_path(s)
        mp.parent.mkdir(parents=True, exist_ok=True)
        old = self.read_marker(s)
        if old is not None and old.get("hash") != self.hashes[s.name]:
            # Outputs of another configuration: never let the stage resume on top of them.
            self._clear_outputs(s, old.get("hash", "unknown"))
        # While it runs, the marker says so (with the hash): an interrupted run is never
        # taken as finished, and a rerun with the same configuration resumes on its outputs.
        atomic_write_json(mp, {"hash": self.hashes[s.name], "state": "running", "type": s.type_name})
        for p in s.outputs.values():
            p.parent.mkdir(parents=True, exist_ok=True)
        log.info("stage %s (%s): running", s.name, s.type_name)

    def finish_stage(self, s: PlannedStage, entry: dict, summary: dict, seconds: float) -> dict:
        """After a stage's ``run`` returned: check its outputs, mark it done."""
        mp = self.marker_path(s)
        missing = [k for k, p in s.outputs.items() if not p.exists()]
        if missing:
            raise PipelineError(f"stage {s.name!r} finished without writing output(s) {missing}")
        atomic_write_json(
            mp,
            {
                "hash": self.hashes[s.name],
                "state": "done",
                "type": s.type_name,
                "params": to_dict(s.params) if s.params is not None else {},
                "inputs": s.inputs,
                "outputs": {k: str(v) for k, v in s.outputs.items()},
                "seconds": seconds,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "summary": summary,
            },
        )
        log.info("stage %s: done in %.1fs", s.name, seconds)
        entry.update(seconds=seconds, summary=summary)
        return entry

    def _clear_outputs(self, s: PlannedStage, old_hash: str) -> None:
        """Remove a changed stage's old outputs: inside the run folder they are deleted;
        elsewhere (user-chosen paths) they are moved aside to ``<name>.stale-<old hash>``."""
        import shutil

        for p in s.outputs.values():
            if not p.exists():
                continue
            if p.resolve().is_relative_to(self.p.run_dir.resolve()):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                log.info("stage %s: configuration changed, removed old output %s", s.name, p)
            else:
                aside = p.with_name(f"{p.name}.stale-{old_hash}")
                p.rename(aside)
                log.warning("stage %s: configuration changed, moved old output %s to %s", s.name, p, aside)


def run_stage_body(s: PlannedStage, run_dir: Path) -> tuple[dict, float]:
    """A stage's own work: its ``run`` with its context (in the runner's process, or in a stage
    process of :mod:`d2s.stage_pool`); its summary and the seconds it took."""
    ctx = StageContext(
        name=s.name,
        run_dir=run_dir,
        work_dir=s.work_dir,
        params=s.params,
        inputs=s.inputs,
        outputs=s.outputs,
        log=logging.getLogger(f"d2s.stage.{s.name}"),
    )
    t0 = time.time()
    summary = s.cls().run(ctx) or {}
    return summary, round(time.time() - t0, 2)


def write_run_record(p: Pipeline) -> Path:
    """Write the resolved config into the run folder (latest + timestamped copy)."""
    p.run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(p.resolved, sort_keys=False)
    (p.run_dir / "resolved.yaml").write_text(text)
    logs = p.run_dir / "logs"
    logs.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (logs / f"{stamp}.resolved.yaml").write_text(text)
    return logs / f"{stamp}.log"
