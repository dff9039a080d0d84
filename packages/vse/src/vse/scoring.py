"""Sentence scorers backed by a model (``d2s.grounding.SentenceScorer``), found by name.

Two scorers, advertised through the entry-point group ``d2s.scorers`` (this package's
``pyproject.toml``), so densecap, which never imports vse, gets them from
``d2s.grounding.SCORERS``:

- ``vse-bundle`` (:class:`BundleScorer`): a bundle (or checkpoint) of this project;
- ``hf-dual-encoder`` (:class:`HFDualEncoderScorer`): any Hugging Face dual encoder with
  ``get_image_features`` / ``get_text_features`` (CLIPModel, SiglipModel, ...), by hub name
  or local folder.

A scorer only embeds: both methods return L2-normalised float32 CPU tensors, one row per
input, in batches of ``batch_size`` on ``device``, with a progress bar when there is more
than one batch. Calibration and sentence splitting are ``d2s.grounding``'s. An image that
cannot be decoded raises ``d2s.schema.SampleError`` naming its key; a model that cannot be
loaded or used raises ``d2s.grounding.ScorerError`` naming the path or model.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from d2s.config import from_dict
from d2s.grounding import ScorerError, SentenceScorer
from d2s.schema import SampleError

log = logging.getLogger(__name__)


# ---- shared ---------------------------------------------------------------------------------


def _parse(cls: type[SentenceScorer], params: Any) -> Any:
    """A Params instance as given, or built from a plain mapping (errors name the field)."""
    P = cls.Params
    if isinstance(params, P):
        return params
    return from_dict(P, params, f"scorer {cls.name!r} params")


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ScorerError(f"device: {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ScorerError(f"device: {device!r} asked for, but CUDA is not available here")
    return dev


def _chunks(n: int, batch_size: int, progress: bool, desc: str) -> Iterator[int]:
    """Start indices of the batches; a tqdm bar when asked for and there is more than one."""
    starts = range(0, n, batch_size)
    if not progress or len(starts) <= 1:
        yield from starts
        return
    from tqdm.auto import tqdm

    yield from tqdm(starts, desc=desc, unit="batch", leave=False)


def _sha256_files(files: Sequence[Path], root: Path) -> str:
    """sha256 over the files' names (relative to ``root``) and contents, in the given order."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def _with_id(scorer: SentenceScorer, doc: dict[str, Any]) -> str:
    return f"{scorer.name}:{json.dumps(doc, sort_keys=True, default=str)}"


# ---- vse-bundle -----------------------------------------------------------------------------


@dataclass
class BundleScorerParams:
    path: str  # the bundle directory (`vse export`, or a training run's bundle/)
    text_path: Literal["dense", "sparse"] = "dense"
    batch_size: int = 64
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: required (the bundle directory)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")


class BundleScorer(SentenceScorer):
    """A bundle of this project (``vse.bundle.load_bundle``): its image embedding against
    each sentence's text embedding.

    Text path. ``dense`` (the default) is the caption encoder *without* the student head
    (``model.embed_texts(ids, mask, use_student=False)``); ``sparse`` goes through the head,
    as ``Bundle.embed_texts`` does for retrieval. A sentence is one claim to check against
    the image. The student head is trained (stage 2) to predict, from a short caption, the
    rest of the scene's dense description: it adds to a sentence's embedding what usually
    co-occurs with it, which is exactly what must not leak into the check of that one claim
    (a made-up object that often goes with the real ones would be pulled towards the image).
    The dense path embeds only what the sentence says, and it exists in every model: stage-1
    models have no head at all. Texts are tokenised up to the model's dense-text length
    (``text.dense_max_length``).

    Identity: the model config's name, the text path, and a sha256 (first 16 hex digits) of
    what decides its embeddings (weights, model config and head, tokenizer, image processor;
    not the run's paths or metrics in ``vse_config.json``), computed once when the scorer is
    built. It changes when the weights do, and not when the bundle is copied elsewhere.
    """

    name = "vse-bundle"
    Params = BundleScorerParams

    @classmethod
    def check(cls, params: BundleScorerParams) -> None:
        root = Path(params.path)
        if not root.is_dir():
            raise ScorerError(f"path: {params.path}: no such bundle directory")
        if not (root / "vse_config.json").is_file():
            raise ScorerError(f"path: {params.path}: not a vse bundle (no vse_config.json)")

    def __init__(self, params: BundleScorerParams | dict | None = None):
        super().__init__(_parse(type(self), params))
        p = self.params
        device = _check_device(p.device)
        root = Path(p.path)
        if not root.is_dir():
            raise ScorerError(f"path: {p.path}: no such bundle directory")
        from .bundle import load_bundle

        try:
            self.bundle = load_bundle(root, device=str(device))
        except (OSError, ValueError, KeyError) as exc:
            raise ScorerError(f"path: {p.path}: not a loadable vse bundle ({type(exc).__name__}: {exc})") from None
        self.use_student = p.text_path == "sparse"
        if self.use_student and self.bundle.model.student is None:
            raise ScorerError(f"text_path: 'sparse' needs a student head, and the model in {p.path} has none")
        self._sha = _bundle_sha(root, self.bundle.config)

    @property
    def identity(self) -> str:
        doc = {"model": self.bundle.model.cfg.name, "sha256": self._sha, "text_path": self.params.text_path}
        return _with_id(self, doc)

    def embed_images(self, images: Sequence[bytes], keys: Sequence[str]) -> torch.Tensor:
        p, images, keys = self.params, list(images), list(keys)
        if len(keys) != len(images):
            raise ScorerError(f"{self.name}: {len(keys)} keys for {len(images)} images")
        out = [
            self.bundle.embed_images(images[i : i + p.batch_size], p.batch_size, keys=keys[i : i + p.batch_size])
            for i in _chunks(len(images), p.batch_size, p.progress, f"{self.name}: images")
        ]
        return torch.cat(out) if out else torch.zeros(0, self.bundle.model.cfg.embed_dim)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        p, texts = self.params, list(texts)
        out = [
            self.bundle.embed_texts(texts[i : i + p.batch_size], p.batch_size, use_student=self.use_student)
            for i in _chunks(len(texts), p.batch_size, p.progress, f"{self.name}: sentences")
        ]
        return torch.cat(out) if out else torch.zeros(0, self.bundle.model.cfg.embed_dim)


def _bundle_sha(root: Path, doc: dict[str, Any]) -> str:
    """16 hex digits of a sha256 over what decides a bundle's embeddings: the model config and
    whether it has a head (not the run's paths or metrics), the weights, tokenizer and processor."""
    files = [root / "model.safetensors"]
    for sub in ("tokenizer", "processor"):
        if (root / sub).is_dir():
            files += sorted(f for f in (root / sub).rglob("*") if f.is_file())
    arch = json.dumps({"model": doc.get("model"), "student_head": doc.get("student_head")}, sort_keys=True)
    return hashlib.sha256(arch.encode() + _sha256_files(files, root).encode()).hexdigest()[:16]


# ---- hf-dual-encoder ------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# text towers that pool the last position (padding included), trained on texts padded to their limit
PAD_TO_LIMIT = ("siglip", "siglip2")

# files whose contents decide a local model's scores (weights, configs, tokenizer, processors)
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")


@dataclass
class HFDualEncoderParams:
    model: str  # hub name or local folder
    batch_size: int = 64
    device: str = "cpu"
    max_length: int = 0  # tokens per sentence; 0: the model's own text limit (CLIP 77, SigLIP 64)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # "auto": pad to max_length for towers that pool the last position (SigLIP), else to the longest text
    padding: Literal["auto", "longest", "max_length"] = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: required (a hub name or a local folder)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.max_length < 0:
            raise ValueError(f"max_length: must be >= 0 (0: the model's own limit), got {self.max_length}")


class HFDualEncoderScorer(SentenceScorer):
    """Any Hugging Face dual encoder through ``transformers``: ``AutoModel`` with
    ``get_image_features`` and ``get_text_features`` (CLIPModel, SiglipModel, ...), by hub
    name or local folder, with ``AutoProcessor`` (or ``AutoTokenizer`` + ``AutoImageProcessor``
    when the model has no processor).

    Sentences longer than ``max_length`` tokens (0: the model's own limit, e.g. 77 for CLIP,
    64 for SigLIP) are truncated; the scorer counts them (``truncated``) and logs a warning
    the first time. Identity: the model as given, the commit of a hub model (else a sha256 of
    a local folder's weight, config and tokenizer files), the effective ``max_length``,
    ``padding`` and ``dtype``.
    """

    name = "hf-dual-encoder"
    Params = HFDualEncoderParams

    @classmethod
    def check(cls, params: HFDualEncoderParams) -> None:
        looks_local = params.model.startswith(("/", "./", "../", "~")) or Path(params.model).exists()
        if looks_local and not Path(params.model).expanduser().is_dir():
            raise ScorerError(f"model: {params.model}: no such model directory")

    def __init__(self, params: HFDualEncoderParams | dict | None = None):
        super().__init__(_parse(type(self), params))
        p = self.params
        self.device = _check_device(p.device)
        if p.dtype == "float16" and self.device.type == "cpu":
            raise ScorerError("dtype: 'float16' needs a GPU device; use 'float32' or 'bfloat16' on the CPU")
        self.dtype = DTYPES[p.dtype]
        self.model = _load_dual_encoder(p.model, self.dtype).to(self.device).eval()
        self.tokenizer, self.image_processor = _load_processors(p.model)
        self.max_length = _text_limit(self.model, self.tokenizer, p)
        pad_to_limit = p.padding == "max_length" or (
            p.padding == "auto" and getattr(self.model.config, "model_type", "") in PAD_TO_LIMIT
        )
        self.padding = "max_length" if pad_to_limit else "longest"
        self._text_args = _argument_names(self.model.get_text_features)
        self._image_args = _argument_names(self.model.get_image_features)
        self._revision = _revision(p.model, self.model)
        self.dim = self._probe_dim()
        self.truncated = 0  # sentences cut to max_length so far
        self.sentences = 0  # sentences embedded so far

    @property
    def identity(self) -> str:
        p = self.params
        doc = {
            "model": p.model,
            "revision": self._revision,
            "max_length": self.max_length,
            "padding": self.padding,
            "dtype": p.dtype,
        }
        return _with_id(self, doc)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[bytes], keys: Sequence[str]) -> torch.Tensor:
        p, images, keys = self.params, list(images), list(keys)
        if len(keys) != len(images):
            raise ScorerError(f"{self.name}: {len(keys)} keys for {len(images)} images")
        out = []
        for i in _chunks(len(images), p.batch_size, p.progress, f"{self.name}: images"):
            pil = [decode_image(b, k) for b, k in zip(images[i : i + p.batch_size], keys[i : i + p.batch_size])]
            inputs = self.image_processor(images=pil, return_tensors="pt")
            inputs = self._to_device(inputs, self._image_args)
            out.append(self._finish(self.model.get_image_features(**inputs), "get_image_features"))
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        p, texts = self.params, list(texts)
        out, truncated = [], 0
        for i in _chunks(len(texts), p.batch_size, p.progress, f"{self.name}: sentences"):
            chunk = texts[i : i + p.batch_size]
            enc = self.tokenizer(
                chunk, padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            truncated += self._count_truncated(chunk, enc)
            inputs = self._to_device(enc, self._text_args)
            out.append(self._finish(self.model.get_text_features(**inputs), "get_text_features"))
        self._note_truncated(truncated, len(texts))
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def _probe_dim(self) -> int:
        """Embed one blank image and one word: both towers work and meet in one space of this size."""
        from PIL import Image

        pixels = self.image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")
        img = self._finish(
            self.model.get_image_features(**self._to_device(pixels, self._image_args)), "get_image_features"
        )
        enc = self.tokenizer(
            ["a"], padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        txt = self._finish(self.model.get_text_features(**self._to_device(enc, self._text_args)), "get_text_features")
        if img.shape[1] != txt.shape[1]:
            raise ScorerError(
                f"model: {self.params.model!r}: image features ({img.shape[1]}) and text features "
                f"({txt.shape[1]}) differ in size; it is not a dual encoder"
            )
        return int(img.shape[1])

    def _to_device(self, batch: Any, allowed: set[str] | None) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in batch.items():
            if allowed is not None and k not in allowed:
                continue
            v = v.to(self.device)
            out[k] = v.to(self.dtype) if v.is_floating_point() else v
        return out

    def _finish(self, out: Any, method: str) -> torch.Tensor:
        feats = features_of(out)
        if feats is None:
            raise ScorerError(
                f"model {self.params.model!r}: {method} returned {type(out).__name__}, "
                "neither a tensor nor an output with a pooler_output"
            )
        return F.normalize(feats.float(), dim=-1).cpu()

    def _count_truncated(self, chunk: list[str], enc: Any) -> int:
        """How many texts of the batch truncation cut; only rows that reach the limit are looked at."""
        mask = enc.get("attention_mask")
        at_limit = range(len(chunk)) if mask is None else (mask.sum(1) >= self.max_length).nonzero().flatten().tolist()
        if not at_limit:
            return 0
        encodings = getattr(enc, "encodings", None)
        if encodings:  # a fast (Rust) tokenizer keeps what truncation cut off
            return sum(1 for i in at_limit if encodings[i].overflowing)
        ids = self.tokenizer([chunk[i] for i in at_limit], truncation=False)["input_ids"]
        return sum(1 for x in ids if len(x) > self.max_length)

    def _note_truncated(self, truncated: int, n: int) -> None:
        if truncated and not self.truncated:
            log.warning(
                "%s %s: %d of %d sentences are longer than %d tokens and were truncated "
                "(counted in .truncated; logged once)",
                self.name,
                self.params.model,
                truncated,
                n,
                self.max_length,
            )
        self.truncated += truncated
        self.sentences += n


def features_of(out: Any) -> torch.Tensor | None:
    """The embedding a ``get_*_features`` call gives: a tensor (transformers 4.x), or the
    ``pooler_output`` of a model output (5.x returns ``BaseModelOutputWithPooling`` whose
    ``pooler_output`` holds the projected features)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    return pooled if isinstance(pooled, torch.Tensor) else None


def decode_image(data: bytes, key: str):
    """Image bytes -> an RGB PIL image; bytes that are not an image raise ``SampleError`` naming ``key``."""
    from PIL import Image

    from .transforms import DECODE_ERRORS

    try:
        im = Image.open(io.BytesIO(bytes(data)))
        return im.convert("RGB")
    except DECODE_ERRORS as exc:
        raise SampleError(f"cannot decode the image ({type(exc).__name__}: {exc})", key=key) from exc


def _looks_local(model: str) -> bool:
    return Path(model).exists() or model.startswith((".", "/", "~")) or model.count("/") > 1


def _load_dual_encoder(model: str, dtype: torch.dtype):
    from transformers import AutoModel

    if _looks_local(model) and not Path(model).expanduser().is_dir():
        raise ScorerError(f"model: {model}: no such model directory")
    try:
        m = AutoModel.from_pretrained(str(Path(model).expanduser()) if _looks_local(model) else model, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ScorerError(f"model: {model!r}: cannot be loaded with transformers' AutoModel ({exc})") from None
    missing = [f for f in ("get_image_features", "get_text_features") if not callable(getattr(m, f, None))]
    if missing:
        raise ScorerError(
            f"model: {model!r} ({type(m).__name__}) is not a dual encoder: it has no {' and no '.join(missing)}"
        )
    return m


def _load_processors(model: str) -> tuple[Any, Any]:
    """(tokenizer, image processor) from AutoProcessor, else AutoTokenizer + AutoImageProcessor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    src = str(Path(model).expanduser()) if _looks_local(model) else model
    try:
        proc = AutoProcessor.from_pretrained(src)
    except (OSError, ValueError, KeyError, TypeError):
        proc = None
    tokenizer = getattr(proc, "tokenizer", None) or _load_part(AutoTokenizer, src, model, "tokenizer")
    image_processor = getattr(proc, "image_processor", None) or _load_part(
        AutoImageProcessor, src, model, "image processor"
    )
    return tokenizer, image_processor


def _load_part(auto: Any, src: str, model: str, what: str) -> Any:
    try:
        return auto.from_pretrained(src)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ScorerError(f"model: {model!r}: no {what} ({exc})") from None


def _text_limit(model: Any, tokenizer: Any, p: HFDualEncoderParams) -> int:
    """``p.max_length``, or the model's own limit when 0: the text tower's position count,
    or the tokenizer's ``model_max_length`` when that is smaller."""
    text_cfg = getattr(model.config, "text_config", model.config)
    limits = [getattr(text_cfg, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    if not limits:
        raise ScorerError(f"max_length: the text limit of {p.model!r} is unknown; set max_length")
    own = min(limits)
    if p.max_length > own:
        raise ScorerError(f"max_length: {p.max_length} is more than {p.model!r} takes ({own} tokens)")
    return p.max_length or own


def _argument_names(method: Any) -> set[str] | None:
    """The named arguments of a ``get_*_features`` method (None: it takes any keyword)."""
    params = inspect.signature(method).parameters.values()
    named = {q.name for q in params if q.kind in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)}
    return named or None


def _revision(model: str, m: Any) -> str:
    """``sha256:<16 hex>`` of a local folder's files, else the hub commit the weights came from."""
    root = Path(model).expanduser()
    if root.is_dir():
        files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in _MODEL_FILE_SUFFIXES)
        return "sha256:" + _sha256_files(files, root)[:16]
    commit = getattr(m.config, "_commit_hash", None) or _hub_commit(model)  # transformers 4.x kept it on the config
    if commit:
        return str(commit)
    log.warning("hf-dual-encoder %s: no commit hash known; the identity names the model only", model)
    return "unknown"


def _hub_commit(model: str) -> str | None:
    """The commit of the cached snapshot a hub model was just loaded from (cache lookup only)."""
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(model, "config.json", local_files_only=True))
    except Exception:  # noqa: BLE001 - best effort: an unknown commit is reported, not fatal
        return None
    return path.parent.name if path.parent.parent.name == "snapshots" else None
