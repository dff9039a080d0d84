"""Model configs (JSON data behind a registry) and the VSE encoders.

Architecture, as in VSE-infinity / D2S-VSE::

    image -> HF vision backbone -> tokens ([CLS] kept) -> Linear -> GPO -> L2 norm
    text  -> HF text backbone -> Dropout 0.2 -> Linear + residual MLP -> GPO -> LayerNorm -> L2 norm
                                    [+ stage-2 student head: N learnable tokens after the words,
                                       K transformer blocks, LayerNorm, mean of the N outputs,
                                       added to the caption embedding before the L2 norm: raw in
                                       training, L2-normalised first at evaluation, as the
                                       authors' code does (docs/fidelity.md)]

A model config is a JSON file in ``vse/configs/models/``; ``list_models()`` lists them and
``create_model(name, **overrides)`` builds one. Backbones come from ``from_pretrained``:
a hub name or local folder (``backbone.pretrained``), or, for the CPU configs, a tiny
randomly initialised model described by ``backbone.build`` (HF config kwargs) that
``vse build-assets`` saved with ``save_pretrained`` into an assets folder.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from d2s.config import ConfigError, from_dict, to_dict
from d2s.registry import Registry

log = logging.getLogger(__name__)


# ---- configuration ----------------------------------------------------------------------


@dataclass
class BackboneConfig:
    pretrained: str | None = None  # hub name or local folder for from_pretrained
    build: dict[str, Any] | None = None  # HF config kwargs (with model_type) of a tiny random model
    forward_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. interpolate_pos_encoding

    def __post_init__(self) -> None:
        if (self.pretrained is None) == (self.build is None):
            raise ValueError("exactly one of 'pretrained' and 'build' must be set")
        if self.build is not None and "model_type" not in self.build:
            raise ValueError("build: needs a 'model_type' (e.g. 'vit', 'resnet', 'bert')")


@dataclass
class ImageConfig:
    backbone: BackboneConfig
    image_size: int = 224
    processor: str | None = None  # hub name / folder of the HF image processor (mean, std)
    skip_tokens: int = 0  # leading tokens to drop (the reference keeps ViT's [CLS]: 0)
    grid_position_embedding: bool = False  # learned position per grid cell (CNN features have none)
    # Training "size augmentation" of VSE-infinity / the reference: with probability 1 - p an image
    # draws u ~ U(0, 1) and, when u > p, drops each token with probability p * u (about 10% of the
    # tokens on average for p = 0.2); 0 turns it off.
    patch_drop: float = 0.2
    # Training crop + flip of the reference: a crop whose sides are a fraction r ~ U(lo, hi) of the
    # image's, at a random position, resized to image_size; then a horizontal flip with probability
    # hflip. null / 0: off.
    random_crop: list[float] | None = field(default_factory=lambda: [0.6, 1.0])
    hflip: float = 0.5
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self) -> None:
        if not 0.0 <= self.patch_drop < 1.0:
            raise ValueError("patch_drop must be in [0, 1)")
        if self.image_size < 8:
            raise ValueError("image_size must be >= 8")
        if self.random_crop is not None:
            lo_hi = list(self.random_crop)
            if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] <= 1.0:
                raise ValueError(f"random_crop must be [lo, hi] with 0 < lo <= hi <= 1, got {self.random_crop}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError("hflip must be in [0, 1]")


@dataclass
class TokenAugConfig:
    """Caption augmentation of VSE-infinity: each word (``unit: word``, the reference: every word
    piece of the word shares its fate) or each word piece (``unit: token``) altered with
    probability ``prob``."""

    prob: float = 0.2
    mask: float = 0.5  # share of altered words replaced by [MASK] (one per word piece)
    random: float = 0.1  # share replaced by random tokens (one per word piece)
    # the rest (0.4 by default) is deleted
    unit: Literal["word", "token"] = "word"

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0 or self.mask < 0 or self.random < 0 or self.mask + self.random > 1.0:
            raise ValueError("need 0 <= prob <= 1, mask >= 0, random >= 0, mask + random <= 1")


@dataclass
class TextConfig:
    backbone: BackboneConfig
    max_length: int = 32  # sparse captions
    dense_max_length: int = 128  # dense texts (the reference truncates none: set it to the backbone's limit)
    mlp_layers: int = 2  # residual MLP after the linear projection (0: none)
    feature_dropout: float = 0.2  # Dropout on the backbone's token features (the reference: 0.2)
    # "layernorm": the pooled caption feature ends in a LayerNorm (the reference); "none": no norm
    # before the final L2 normalisation.
    final_norm: Literal["layernorm", "none"] = "layernorm"
    token_aug: TokenAugConfig = field(default_factory=TokenAugConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError("feature_dropout must be in [0, 1)")


@dataclass
class TokenizerConfig:
    pretrained: str | None = None
    build: str | None = None  # "wordlevel": a BertTokenizerFast over the training texts' words
    lowercase: bool = True

    def __post_init__(self) -> None:
        if (self.pretrained is None) == (self.build is None):
            raise ValueError("exactly one of 'pretrained' and 'build' must be set")
        if self.build not in (None, "wordlevel"):
            raise ValueError(f"build: unknown tokenizer builder {self.build!r}; known: ['wordlevel']")


@dataclass
class GPOConfig:
    d_pe: int = 32
    d_hidden: int = 32
    temperature: float = 0.1
    # CPU speed-ups that change the numbers (off: the reference's computation, bit for bit): the
    # GRU over the rank encodings as two plain GRU calls instead of one over a packed batch
    # (equal up to float rounding), and ties among a feature's values ranked by numpy's argsort
    # instead of torch.sort (another valid order). docs/fidelity.md says what they cost.
    fast: bool = False


@dataclass
class StudentConfig:
    num_tokens: int = 100
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    token_init_std: float = 1.0  # the reference draws the learnable tokens from N(0, 1)
    # Deviation kept on purpose (docs/fidelity.md): the reference lets the tokens attend to padding
    # positions too, so a caption's embedding depends on the longest caption in its batch.
    mask_padding: bool = True
    # How the head's output h is added to the caption embedding c before the L2 norm, in training
    # and at evaluation: "raw" c + h, "l2" c + h / |h|. The reference: raw in training, l2 at eval.
    combine_train: Literal["raw", "l2"] = "raw"
    combine_eval: Literal["raw", "l2"] = "l2"

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or self.layers < 1 or self.heads < 1:
            raise ValueError("num_tokens, layers and heads must be >= 1")
        if self.token_init_std <= 0:
            raise ValueError("token_init_std must be > 0")


@dataclass
class ModelConfig:
    image: ImageConfig
    text: TextConfig
    tokenizer: TokenizerConfig
    name: str = "custom"
    description: str = ""
    embed_dim: int = 512
    gpo: GPOConfig = field(default_factory=GPOConfig)
    student: StudentConfig = field(default_factory=StudentConfig)

    def __post_init__(self) -> None:
        if self.embed_dim % self.student.heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by student.heads ({self.student.heads})")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# The model configs: JSON files in vse/configs/models, in folders named by $VSE_MODEL_PATH
# (os.pathsep-separated), or advertised by a package through the entry-point group vse.models.
MODELS: Registry[dict] = Registry(
    "model config", "vse.models", name_attr=None, json_package=("vse", "configs/models"), json_env="VSE_MODEL_PATH"
)


def list_models() -> list[str]:
    """Names of the registered model configs."""
    return MODELS.names()


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _dotted_to_nested(overrides: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        cur = nested
        parts = key.replace("__", ".").split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
    return nested


def get_model_config(name: str | Path | dict, **overrides: Any) -> ModelConfig:
    """A registered config (by name), a JSON file, or a dict, with overrides (``text.max_length=16``
    or nested dicts); errors name the field."""
    if isinstance(name, dict):
        doc, where = dict(name), "model config"
    elif Path(str(name)).suffix == ".json" and Path(str(name)).exists():
        doc, where = json.loads(Path(str(name)).read_text()), str(name)
        doc.setdefault("name", Path(str(name)).stem)
    else:
        try:
            doc = copy.deepcopy(MODELS.get(str(name)))  # the registry caches the parsed file
        except ConfigError as exc:
            raise ConfigError(f"model: {exc}") from None
        doc["name"], where = str(name), f"model config {name!r}"
    doc = _merge(doc, _dotted_to_nested(overrides))
    return from_dict(ModelConfig, doc, where)


# ---- building blocks ----------------------------------------------------------------------


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def sort_descending(x: torch.Tensor, dim: int, any_tie_order: bool = False) -> torch.Tensor:
    """``x.sort(dim, descending=True).values``, with the same values, and the same gradient
    unless ``any_tie_order``.

    On CPU, without gradient (the frozen teacher, evaluation), numpy's vectorised sort gives the
    same values 4-5x faster for GPO's text features ([128, 148, 128]): values do not depend on
    the order of ties. With gradient, the order of exactly equal elements decides which of them
    gets which rank's gradient, and float32 features have ties in most batches; ``torch.sort``
    breaks them its own way, so it stays, unless ``any_tie_order`` lets numpy's argsort break
    them (2x faster; ``GPOConfig.fast``)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return x.sort(dim=dim, descending=True).values
    grad = torch.is_grad_enabled() and x.requires_grad
    if grad and not any_tie_order:
        return x.sort(dim=dim, descending=True).values
    last = x.movedim(dim, -1).contiguous()
    if not grad:
        values = np.sort(-last.detach().numpy(), axis=-1)  # ascending of -x: negation is exact
        return torch.from_numpy(values).neg_().movedim(-1, dim).contiguous()
    order = torch.from_numpy(np.argsort(-last.detach().numpy(), axis=-1))
    return torch.gather(last, -1, order).movedim(-1, dim).contiguous()


class GPO(nn.Module):
    """Generalized pooling operator (VSE-infinity).

    Features are sorted per dimension (descending) along the set; a weight per rank comes
    from a bidirectional GRU over sinusoidal encodings of the rank, softmax-normalised over
    the set's valid positions. The weights depend on the set size only, so they are
    computed once per distinct length in the batch.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = 0.1, fast: bool = False):
        super().__init__()
        self.d_pe = d_pe
        self.fast = fast
        self.temperature = temperature
        self.gru = nn.GRU(d_pe, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.score = nn.Linear(d_hidden, 1, bias=False)

    def positional_encoding(self, n: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
        freq = torch.exp(
            torch.arange(0, self.d_pe, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / self.d_pe)
        )
        pe = torch.zeros(n, self.d_pe, device=device)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq)
        return pe

    def pool_weights(self, lengths: torch.Tensor) -> torch.Tensor:
        """[B] lengths -> [B, max_len] weights (zero beyond each length, summing to 1)."""
        uniq, inverse = torch.unique(lengths, return_inverse=True)
        max_len = int(uniq.max())
        mask = length_mask(uniq, max_len)
        out = self.split_gru(uniq, mask) if self.fast else self.packed_gru(uniq, mask)
        scores = self.score(out).squeeze(-1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores / self.temperature, dim=1)
        return weights[inverse]

    def packed_gru(self, uniq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[U, max_len, d_hidden]: the GRU's two directions averaged, over the packed encodings of each length."""
        max_len = mask.shape[1]
        pe = self.positional_encoding(max_len, uniq.device)[None].expand(len(uniq), -1, -1)
        pe = pe.masked_fill(~mask[..., None], 0.0)
        packed = pack_padded_sequence(pe, uniq.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)
        half = out.shape[-1] // 2
        return (out[..., :half] + out[..., half:]) / 2

    def split_gru(self, uniq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What :meth:`packed_gru` computes, as two plain GRU calls (``fast``): the forward
        direction reads the same encodings from position 0 whatever the length, so it runs once
        over the longest; the backward direction runs over each length's encodings reversed
        (right-padded, so the padding comes after each sequence's last valid step). Equal up to
        float rounding (the input projections of all steps are one matrix product here, one per
        step there), which training amplifies: docs/fidelity.md."""
        max_len = mask.shape[1]
        pe = self.positional_encoding(max_len, uniq.device)
        gru, h = self.gru, self.gru.hidden_size
        forward_params = [gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0]
        backward_params = [gru.weight_ih_l0_reverse, gru.weight_hh_l0_reverse]
        backward_params += [gru.bias_ih_l0_reverse, gru.bias_hh_l0_reverse]
        fwd, _ = torch._VF.gru(
            pe[None], pe.new_zeros(1, 1, h), forward_params, True, 1, 0.0, self.training, False, True
        )
        # reversed[i, j] = position L_i - 1 - j of length L_i (clamped to 0 in the padding)
        reversed_pos = (uniq[:, None] - 1 - torch.arange(max_len, device=uniq.device)[None, :]).clamp(min=0)
        bwd_in = pe[reversed_pos].masked_fill(~mask[..., None], 0.0)
        h0 = pe.new_zeros(1, len(uniq), h)
        bwd, _ = torch._VF.gru(bwd_in, h0, backward_params, True, 1, 0.0, self.training, False, True)
        bwd = torch.gather(bwd, 1, reversed_pos[..., None].expand(-1, -1, h))  # back to positions
        return (fwd + bwd) / 2

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        weights = self.pool_weights(lengths)
        max_len = weights.shape[1]
        feats = features[:, :max_len]
        mask = length_mask(lengths, max_len)[..., None]
        low = torch.finfo(feats.dtype).min
        ranked = sort_descending(feats.masked_fill(~mask, low), 1, self.fast).masked_fill(~mask, 0.0)
        return (ranked * weights[..., None].to(ranked.dtype)).sum(1)


class MLP(nn.Module):
    """Linear-BN-ReLU blocks then a Linear (the text head's residual branch)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, layers: int):
        super().__init__()
        dims = [d_in] + [d_hidden] * (layers - 1) + [d_out]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(d) for d in dims[1:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        for i, lin in enumerate(self.linears):
            x = lin(x)
            if i < len(self.norms):
                x = F.relu(self.norms[i](x))
        return x.reshape(*shape[:-1], -1)


def backbone_dim(hf_config: Any) -> int:
    for attr in ("hidden_size", "num_features"):
        v = getattr(hf_config, attr, None)
        if isinstance(v, int):
            return v
    sizes = getattr(hf_config, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    raise ConfigError(f"cannot tell the feature size of backbone config {type(hf_config).__name__}")


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ImageConfig, backbone: nn.Module, embed_dim: int, gpo: GPOConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        d = backbone_dim(backbone.config)
        self.fc = nn.Linear(d, embed_dim)
        self.pos = None
        if cfg.grid_position_embedding:
            with torch.no_grad():
                n = self._features(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).shape[1]
            self.pos = nn.Parameter(torch.zeros(n, embed_dim))
            nn.init.normal_(self.pos, std=0.02)
        self.gpo = GPO(gpo.d_pe, gpo.d_hidden, gpo.temperature, gpo.fast)
        self.token_counts: dict[tuple[int, ...], int] = {}  # image shape -> backbone tokens

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.backbone(pixel_values=pixels, **self.cfg.backbone.forward_kwargs)
        h = out.last_hidden_state
        if h.dim() == 4:  # CNN grid [B, C, H, W] -> [B, HW, C]
            h = h.flatten(2).transpose(1, 2)
        return h[:, self.cfg.skip_tokens :]

    def draw_keep(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """The size augmentation's token mask ``forward(pixels)`` would draw (the same random
        numbers), drawn now, for a forward elsewhere (``vse_train.image_thread``); None when
        the forward draws none, or its token count is not known yet (no forward of this image
        size so far)."""
        n = self.token_counts.get(tuple(pixels.shape[1:]))
        if not (self.training and self.cfg.patch_drop > 0) or n is None:
            return None
        return size_augment_keep(pixels.shape[0], n, self.cfg.patch_drop, pixels.device)

    def forward(self, pixels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Unit embeddings; ``keep``: the size augmentation's mask from :meth:`draw_keep` (else
        drawn here, in training)."""
        x = self.fc(self._features(pixels))
        if self.pos is not None:
            x = x + self.pos.to(x.dtype)
        b, n, _ = x.shape
        self.token_counts[tuple(pixels.shape[1:])] = n
        if self.training and self.cfg.patch_drop > 0:
            if keep is None:
                keep = size_augment_keep(b, n, self.cfg.patch_drop, x.device)
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
            x = torch.gather(x, 1, order[..., None].expand_as(x))
            lengths = keep.sum(1)
        else:
            lengths = torch.full((b,), n, device=x.device, dtype=torch.long)
        return l2norm(self.gpo(x, lengths).float())


def size_augment_keep(b: int, n: int, p: float, device) -> torch.Tensor:
    """[b, n] mask of the tokens an image keeps under the reference's size augmentation.

    Per image u ~ U(0, 1); when u > p each token is dropped with probability p * u, else none is.
    At least one token is always kept.
    """
    u = torch.rand(b, device=device)
    rate = torch.where(u > p, p * u, torch.zeros_like(u))
    keep = torch.rand(b, n, device=device) >= rate[:, None]
    keep[:, 0] |= ~keep.any(1)
    return keep


class StudentHead(nn.Module):
    """Learnable tokens read the caption's word features through a few transformer blocks.

    Pre-norm blocks (LayerNorm, attention, LayerNorm, GELU MLP), a final LayerNorm, the mean of
    the tokens' outputs. Returns that mean unnormalised; how it joins the caption embedding is
    :meth:`TextEncoder.forward`'s business.
    """

    def __init__(self, cfg: StudentConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Parameter(torch.randn(cfg.num_tokens, dim) * cfg.token_init_std)
        layer = nn.TransformerEncoderLayer(
            dim, cfg.heads, int(dim * cfg.mlp_ratio), cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        b = words.shape[0]
        n = self.tokens.shape[0]
        x = torch.cat([words, self.tokens[None].expand(b, -1, -1).to(words.dtype)], dim=1)
        pad = None
        if self.cfg.mask_padding:
            pad = torch.cat([~word_mask, torch.zeros(b, n, dtype=torch.bool, device=words.device)], dim=1)
        x = self.norm(self.blocks(x, src_key_padding_mask=pad))
        return x[:, -n:].mean(1).float()


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, backbone: nn.Module, embed_dim: int, gpo: GPOConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        d = backbone_dim(backbone.config)
        self.dropout = nn.Dropout(cfg.feature_dropout)
        self.fc = nn.Linear(d, embed_dim)
        self.mlp = MLP(d, embed_dim // 2, embed_dim, cfg.mlp_layers) if cfg.mlp_layers > 0 else None
        self.gpo = GPO(gpo.d_pe, gpo.d_hidden, gpo.temperature, gpo.fast)
        self.norm = nn.LayerNorm(embed_dim) if cfg.final_norm == "layernorm" else nn.Identity()

    def word_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state)
        x = self.fc(h)
        if self.mlp is not None:
            x = x + self.mlp(h)
        return x

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, student: StudentHead | None = None, *, normalize: bool = True
    ) -> torch.Tensor:
        """Caption embeddings; ``normalize=False`` returns them before the final L2 norm (what the
        reference's losses see: its similarity and cosine normalise, its MSE does not)."""
        mask = mask.bool()
        words = self.word_features(ids, mask)
        emb = self.norm(self.gpo(words, mask.sum(1)).float())
        if student is not None:
            head = student(words, mask)
            combine = student.cfg.combine_train if self.training else student.cfg.combine_eval
            emb = emb + (head if combine == "raw" else l2norm(head))
        return l2norm(emb) if normalize else emb


class VSEModel(nn.Module):
    """The two encoders (and the optional student head) of one model config.

    Parameter groups used by recipes (freeze / lr multipliers): ``image_backbone``,
    ``image_head``, ``text_backbone``, ``text_head``, ``student``.
    """

    def __init__(self, cfg: ModelConfig, image_backbone: nn.Module, text_backbone: nn.Module, student_head: bool):
        super().__init__()
        self.cfg = cfg
        self.image = ImageEncoder(cfg.image, image_backbone, cfg.embed_dim, cfg.gpo)
        self.text = TextEncoder(cfg.text, text_backbone, cfg.embed_dim, cfg.gpo)
        self.student = StudentHead(cfg.student, cfg.embed_dim) if student_head else None

    def embed_images(self, pixels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.image(pixels, keep)

    def embed_texts(
        self, ids: torch.Tensor, mask: torch.Tensor, *, use_student: bool = True, normalize: bool = True
    ) -> torch.Tensor:
        return self.text(ids, mask, self.student if use_student else None, normalize=normalize)

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, p in self.named_parameters():
            if name.startswith("image.backbone."):
                g = "image_backbone"
            elif name.startswith("image."):
                g = "image_head"
            elif name.startswith("text.backbone."):
                g = "text_backbone"
            elif name.startswith("text."):
                g = "text_head"
            else:
                g = "student"
            groups.setdefault(g, []).append((name, p))
        return groups


GROUPS = ("image_backbone", "image_head", "text_backbone", "text_head", "student")


# ---- construction ---------------------------------------------------------------------------


def asset_paths(assets_dir: str | Path, model_name: str) -> dict[str, Path]:
    root = Path(assets_dir)
    return {
        "image": root / model_name / "image",
        "text": root / model_name / "text",
        "processor": root / model_name / "processor",
        "tokenizer": root / "tokenizer",
    }


def _backbone_source(cfg: BackboneConfig, built: Path | None, what: str) -> str:
    if cfg.pretrained is not None:
        return cfg.pretrained
    if built is None:
        raise ConfigError(
            f"{what}.backbone.build: this config builds a tiny random backbone locally; pass an assets dir "
            "(vse build-assets --shards DIR --out ASSETS, then --assets ASSETS)"
        )
    if not (built / "config.json").exists():
        raise FileNotFoundError(f"{built}: no backbone here; run `vse build-assets` to create it")
    saved = json.loads((built / "config.json").read_text())
    for k, v in cfg.build.items():
        if k in saved and saved[k] != v and not (isinstance(v, list) and saved[k] == list(v)):
            raise ConfigError(
                f"{what}.backbone.build.{k}: config says {v!r} but the assets in {built} have {saved[k]!r}; rebuild the assets"
            )
    return str(built)


def load_backbone(source: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(source)
    kwargs = {"add_pooling_layer": False} if config.model_type in ("vit", "bert", "swin") else {}
    return AutoModel.from_pretrained(source, **kwargs)


def backbone_from_config(config_dir: str | Path) -> nn.Module:
    """An empty backbone with the architecture saved in ``config_dir`` (weights loaded later)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(config_dir))
    kwargs = {"add_pooling_layer": False} if config.model_type in ("vit", "bert", "swin") else {}
    return AutoModel.from_config(config, **kwargs)


def create_model(
    name: str | Path | dict | ModelConfig,
    *,
    assets_dir: str | Path | None = None,
    student_head: bool = False,
    **overrides: Any,
) -> VSEModel:
    """Build a registered model with its (pretrained or locally built) backbones."""
    cfg = name if isinstance(name, ModelConfig) else get_model_config(name, **overrides)
    paths = asset_paths(assets_dir, cfg.name) if assets_dir is not None else None
    image_src = _backbone_source(cfg.image.backbone, paths["image"] if paths else None, "image")
    text_src = _backbone_source(cfg.text.backbone, paths["text"] if paths else None, "text")
    log.info("model %s: image backbone from %s, text backbone from %s", cfg.name, image_src, text_src)
    return VSEModel(cfg, load_backbone(image_src), load_backbone(text_src), student_head)


def tokenizer_source(cfg: ModelConfig, assets_dir: str | Path | None) -> str:
    if cfg.tokenizer.pretrained is not None:
        return cfg.tokenizer.pretrained
    if assets_dir is None:
        raise ConfigError(
            "tokenizer.build: this config builds its tokenizer locally; pass an assets dir (vse build-assets)"
        )
    return str(asset_paths(assets_dir, cfg.name)["tokenizer"])


def processor_source(cfg: ModelConfig, assets_dir: str | Path | None) -> str | None:
    if cfg.image.processor is not None:
        return cfg.image.processor
    if assets_dir is not None and (asset_paths(assets_dir, cfg.name)["processor"]).exists():
        return str(asset_paths(assets_dir, cfg.name)["processor"])
    return None


@contextlib.contextmanager
def evaluation_composition(model: VSEModel, combine: str | None) -> Iterator[VSEModel]:
    """Inside the block, the model's student head joins the caption embedding at evaluation as
    ``combine`` says ("raw": c + h, "l2": c + h / |h|; ``StudentConfig.combine_eval``), and a
    checkpoint saved there records it; None or a model without a head: unchanged."""
    if combine is None or model.student is None:
        yield model
        return
    if combine not in ("raw", "l2"):
        raise ValueError(f"composition must be 'raw' or 'l2', got {combine!r}")
    cfg = model.student.cfg
    before = cfg.combine_eval
    cfg.combine_eval = combine
    try:
        yield model
    finally:
        cfg.combine_eval = before
