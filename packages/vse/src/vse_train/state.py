"""The resumable training state: written and read with safetensors and JSON only, never pickle.

Layout under ``<run>/state/``::

    latest.json                 pointer {"format", "dir", "step"}, replaced atomically (os.replace)
    step-00000300/              one complete state per save
        model.safetensors       the (unwrapped) objective's state dict: model + learnable loss parameters
        optimizer.safetensors   optimizer tensors (exp_avg, exp_avg_sq, step, ...), keys "<param index>/<name>"
        optimizer.json          param groups and any non-tensor optimizer state
        scheduler.json          the LR scheduler's state dict (its lambdas left out: code, rebuilt from the config)
        scaler.json             the fp16 loss scaler's state (only with a scaler)
        counters.json           the run's Counters (step, data position, best val, skipped samples), accelerator step
        rng-<rank>.safetensors  torch CPU (and CUDA) generator states of process <rank>, uint8
        rng-<rank>.json         numpy and python ``random`` states of process <rank>
        complete.json           written last: the marker, with every file's size

A save writes a new ``step-N/`` (``step-N.1/`` when a complete ``step-N/`` exists: a finished
run started again), its marker last, then moves the pointer, and only then deletes older
states; a kill at any point leaves the previous complete state (or the new one) to resume from. :func:`find_state` picks the pointer's state, else the newest complete
one; a state that exists but cannot be read raises :class:`StateError` naming the file, so a
run never silently starts again at step 0. Loading uses ``safetensors`` and ``json`` only,
so a tampered run folder can make a resume fail but cannot run code.

Only the main process writes the shared files; each process writes its own RNG files.
The failpoint ``VSE_TEST_KILL_AT`` (tests only) can kill the process at each point of a save
(:mod:`vse_train.failpoints`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .failpoints import kill_point

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT = "vse-train-state"
VERSION = 3  # 2: counters.json (was progress.json); 3: the best val per evaluation composition
POINTER = "latest.json"
MARKER = "complete.json"
COUNTERS = "counters.json"
_STEP_DIR = re.compile(r"^step-(\d+)(?:\.(\d+))?$")


class StateError(RuntimeError):
    """A resumable state that cannot be written or read; the message names the file."""


@dataclass
class Counters:
    """What changes while a run trains and is saved with its state (``counters.json``)."""

    step: int = 0  # optimizer steps done
    batches: int = 0  # micro-batches consumed (the data position)
    best_rsum: float = -1.0  # under the model's own evaluation composition (best/)
    best_step: int = -1
    # under each composition of TrainSpec.compositions (best-<c>/): the student head's output
    # added raw or L2-normalised at evaluation
    best_rsum_l2: float = -1.0
    best_step_l2: int = -1
    best_rsum_raw: float = -1.0
    best_step_raw: int = -1
    skipped_samples: int = 0  # training samples dropped as unreadable (on_bad_sample: skip), all processes


def step_dir_name(step: int, again: int = 0) -> str:
    """``step-00000300``; a second complete save of the same step (a finished run started
    again) goes to ``step-00000300.1``, so the state being replaced is never touched."""
    return f"step-{step:08d}" + (f".{again}" if again else "")


def _state_dirs(root: Path) -> list[tuple[tuple[int, int], Path]]:
    """(step, again) and path of every state dir under ``root``, oldest first."""
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return sorted(found)


def _new_dir_name(root: Path, step: int) -> str:
    """Where the save of ``step`` goes: never over a complete state (see :func:`step_dir_name`)."""
    again = 0
    while (root / step_dir_name(step, again) / MARKER).exists():
        again += 1
    return step_dir_name(step, again)  # new, or left incomplete by an interrupted save (replaced)


# ---- JSON with tuples ----------------------------------------------------------------------


def _enc(x: Any, where: str) -> Any:
    """Plain JSON for str/int/float/bool/None, lists and str-keyed dicts; tuples tagged."""
    import numpy as np
    import torch

    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, tuple):
        return {"__tuple__": [_enc(v, where) for v in x]}
    if isinstance(x, list):
        return [_enc(v, where) for v in x]
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise StateError(f"{where}: dict with non-string keys cannot be stored as JSON")
        if "__tuple__" in x:
            raise StateError(f"{where}: reserved key '__tuple__'")
        return {k: _enc(v, f"{where}.{k}") for k, v in x.items()}
    if isinstance(x, torch.Tensor) and x.numel() == 1 and x.dim() == 0:
        return x.item()
    raise StateError(f"{where}: a {type(x).__name__} cannot be stored as JSON")


def _dec(x: Any) -> Any:
    if isinstance(x, list):
        return [_dec(v) for v in x]
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return tuple(_dec(v) for v in x["__tuple__"])
        return {k: _dec(v) for k, v in x.items()}
    return x


def _write_json(path: Path, obj: Any) -> None:
    from d2s.atomic import atomic_write_json

    atomic_write_json(path, _enc(obj, path.name))


def read_json(path: Path) -> Any:
    try:
        return _dec(json.loads(Path(path).read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise StateError(f"{path}: missing from the resumable state") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"{path}: not a valid JSON state file ({exc}); refusing to resume from it") from None


def read_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise StateError(f"{path}: missing from the resumable state")
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises SafetensorError / OSError on anything that is not one
        raise StateError(f"{path}: not a valid safetensors state file ({exc}); refusing to resume from it") from None


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- pieces ------------------------------------------------------------------------------


def optimizer_parts(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torch optimizer state dict -> (tensors, JSON-able rest)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        rest = {}
        for name, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{int(pid)}/{name}"] = v
            else:
                rest[name] = v
        state[str(int(pid))] = rest
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: Path) -> dict[str, Any]:
    try:
        state: dict[int, dict[str, Any]] = {int(pid): dict(rest) for pid, rest in meta["state"].items()}
        for key, v in tensors.items():
            pid, name = key.rsplit("/", 1)
            state.setdefault(int(pid), {})[name] = v
        return {"state": state, "param_groups": meta["param_groups"]}
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise StateError(f"{where}: malformed optimizer state ({exc!r})") from None


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import numpy as np
    import torch

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    doc = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "name": name,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    return tensors, doc


def set_rng_state(tensors: dict[str, torch.Tensor], doc: dict[str, Any], where: Path) -> None:
    import numpy as np
    import torch

    try:
        torch.set_rng_state(tensors["torch_cpu"].cpu().to(torch.uint8))
        cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[k].cpu().to(torch.uint8) for k in cuda])
        py = doc["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss_next"]))
        n = doc["numpy"]
        np.random.set_state(
            (
                str(n["name"]),
                np.asarray(n["keys"], dtype=np.uint32),
                int(n["pos"]),
                int(n["has_gauss"]),
                float(n["cached_gaussian"]),
            )
        )
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise StateError(f"{where}: malformed RNG state ({exc!r})") from None


# ---- save --------------------------------------------------------------------------------


def save_state(
    root: str | os.PathLike,
    step: int,
    *,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    counters: Counters,
) -> Path:
    """Write the state of ``step`` under ``root`` (every process calls this; see module doc)."""
    root = Path(root)
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    target = root / _new_dir_name(root, step)  # every process reads the same listing, before anything changes
    accelerator.wait_for_everyone()
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if target.exists():  # left by a save of this step that did not complete
            shutil.rmtree(target)
        target.mkdir()
        kill_point("begin", step)
    accelerator.wait_for_everyone()
    if main:
        _write_training_state(target, step, accelerator, model, optimizer, scheduler, counters)
    rank = accelerator.process_index
    tensors, doc = rng_state()
    _write_tensors(target / f"rng-{rank}.safetensors", tensors)
    _write_json(target / f"rng-{rank}.json", doc)
    kill_point("rng", step)
    accelerator.wait_for_everyone()
    if main:
        _commit(root, target, step, accelerator.num_processes)
    accelerator.wait_for_everyone()
    return target


def _write_training_state(
    target: Path,
    step: int,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    counters: Counters,
) -> None:
    """The main process's files: model, optimizer, scheduler, loss scaler, counters."""
    from safetensors.torch import save_model

    save_model(model, str(target / "model.safetensors"))
    _fsync(target / "model.safetensors")
    kill_point("model", step)
    tensors, meta = optimizer_parts(optimizer.state_dict())
    _write_tensors(target / "optimizer.safetensors", tensors)
    _write_json(target / "optimizer.json", meta)
    kill_point("optimizer", step)
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    _write_json(target / "scheduler.json", sched)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        _write_json(target / "scaler.json", scaler.state_dict())
    _write_json(target / COUNTERS, {**asdict(counters), "accelerator_step": int(getattr(accelerator, "step", 0))})
    kill_point("scheduler", step)


def _commit(root: Path, target: Path, step: int, num_processes: int) -> None:
    """Make ``target`` the state (main process, after every process wrote its files): the completion
    marker listing the files, the pointer moved atomically, then the older states removed."""
    files = {p.name: p.stat().st_size for p in sorted(target.iterdir()) if p.is_file() and p.name != MARKER}
    _fsync(target)
    kill_point("files", step)
    marker = {"format": FORMAT, "version": VERSION, "step": step, "num_processes": num_processes, "files": files}
    _write_json(target / MARKER, marker)
    _fsync(target)
    kill_point("marker", step)
    _write_json(root / POINTER, {"format": FORMAT, "dir": target.name, "step": step})
    _fsync(root)
    kill_point("pointer", step)
    for old in sorted(root.iterdir()):
        if old != target and old.is_dir() and _STEP_DIR.match(old.name):
            shutil.rmtree(old)
            kill_point("cleanup", step)
    kill_point("end", step)


# ---- find and load -----------------------------------------------------------------------


def _complete(d: Path) -> dict[str, Any] | None:
    """The marker of a complete state dir, None when the dir has no marker (an interrupted save).
    A marker whose files do not match raises StateError."""
    marker = d / MARKER
    if not marker.exists():
        return None
    doc = read_json(marker)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
        raise StateError(f"{marker}: not a {FORMAT} marker")
    if doc.get("version") != VERSION:
        raise StateError(f"{marker}: state version {doc.get('version')!r}, this code reads version {VERSION}")
    for name, size in doc["files"].items():
        p = d / name
        if "/" in name or not p.is_file():
            raise StateError(f"{p}: listed in {marker} but missing; the state is damaged, refusing to resume from it")
        if p.stat().st_size != size:
            raise StateError(
                f"{p}: {p.stat().st_size} bytes, {marker} says {size}; the state is damaged, refusing to resume from it"
            )
    return doc


def find_state(root: str | os.PathLike) -> Path | None:
    """The state dir to resume from: the pointer's, else the newest complete one; None when no
    save ever completed. Anything that looks like a state but cannot be used raises StateError."""
    root = Path(root)
    if not root.exists():
        return None
    if not root.is_dir():
        raise StateError(f"{root}: expected the resumable state directory, found a file")
    pointer = root / POINTER
    if pointer.exists():
        doc = read_json(pointer)
        name = doc.get("dir") if isinstance(doc, dict) else None
        if not isinstance(name, str) or not _STEP_DIR.match(name):
            raise StateError(f"{pointer}: malformed pointer {doc!r}")
        if _complete(root / name) is not None:
            return root / name
        log.warning(
            "%s points at %s, which is not a complete state; looking for the newest complete one", pointer, name
        )
    for _, d in reversed(_state_dirs(root)):
        if _complete(d) is not None:
            return d
        log.warning("ignoring %s: a save that did not complete (no %s)", d, MARKER)
    if pointer.exists():
        raise StateError(
            f"{pointer} names a state but no complete state is left under {root}; "
            "refusing to start again from step 0 (move the directory away to start over)"
        )
    return None


def load_state(
    d: str | os.PathLike,
    *,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
) -> Counters:
    """Restore a state written by :func:`save_state` into the given objects; returns its counters."""
    from safetensors.torch import load_model

    d = Path(d)
    marker = _complete(d)
    if marker is None:
        raise StateError(f"{d}: not a complete state (no {MARKER})")
    mpath = d / "model.safetensors"
    try:
        load_model(model, str(mpath), strict=True, device=str(accelerator.device))
    except Exception as exc:  # not a safetensors file, or weights that do not fit
        raise StateError(f"{mpath}: cannot be loaded into the model ({exc}); refusing to resume from it") from None
    opath = d / "optimizer.safetensors"
    sd = optimizer_state(read_tensors(opath), read_json(d / "optimizer.json"), opath)
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise StateError(f"{opath}: does not fit the optimizer ({exc})") from None
    spath = d / "scheduler.json"
    sched = read_json(spath)
    if not isinstance(sched, dict):
        raise StateError(f"{spath}: not a scheduler state")
    if hasattr(scheduler, "lr_lambdas"):
        sched["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(sched)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        if (d / "scaler.json").exists():
            scaler.load_state_dict(read_json(d / "scaler.json"))
        else:
            log.warning("%s: no loss scaler state (saved without fp16); the scaler starts fresh", d)
    counters = _read_counters(d / COUNTERS)
    accelerator_step = int(counters.pop("accelerator_step"))
    if hasattr(accelerator, "step"):
        accelerator.step = accelerator_step
    rank = accelerator.process_index
    rpath = d / f"rng-{rank}.safetensors"
    if rpath.exists():
        set_rng_state(read_tensors(rpath), read_json(d / f"rng-{rank}.json"), rpath)
    else:
        log.warning(
            "%s: no RNG state for process %d (saved by %s processes); its generators are not restored",
            d,
            rank,
            marker.get("num_processes"),
        )
    return Counters(**counters)


def _read_counters(path: Path) -> dict[str, Any]:
    """The fields of :class:`Counters` and ``accelerator_step`` from ``counters.json``."""
    doc = read_json(path)
    want = {f.name for f in fields(Counters)} | {"accelerator_step"}
    if not isinstance(doc, dict) or set(doc) != want or not all(isinstance(v, (int, float)) for v in doc.values()):
        raise StateError(f"{path}: not a counters record (expected the numbers {sorted(want)}, got {doc!r})")
    return doc
