"""Fusion heads: small ``nn.Module``s from cached image/text features to (B, C) logits, in a registry.

Every head has ``forward(image_feat, text_feat)`` with ``image_feat`` (B, Di) or None and
``text_feat`` (B, Dt) or None, a class attribute ``modalities`` naming the inputs it reads, and
``config()`` returning the keyword arguments that rebuild it: ``create_head(**head.config())``.
Features may arrive as float16 from the cache; heads cast them to their own parameter dtype.

A head registers itself (``@HEADS.register()``) and describes itself (pipeline/registries.py): its docstring's
first line, ``options`` (default and meaning), ``recipe`` (how ``mlc run`` trains it) and ``grid`` (tried by
``fit-head --grid``). ``--head``'s help, the grid and docs/heads.md come from there: a new head is one class in
a module that registers it, and nothing else.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .config import Config, opt, require
from .errors import MlcError
from .registries import Registry, load_plugins

HEADS: Registry[type[FusionHead]] = Registry("head", load=load_plugins)  # $MLC_PLUGINS may register heads


class FusionHead(nn.Module):
    """Base class: stores the constructor arguments and checks/casts inputs."""

    name: ClassVar[str]
    modalities: ClassVar[tuple[str, ...]]

    tokens: ClassVar[bool | None] = False  # reads image token maps (--image-pooling tokens); None: either
    # its options (default, meaning): the defaults of --hidden and --dropout, and of create_head
    options: ClassVar[dict[str, tuple[Any, str]]] = {"hidden": (512, "Hidden width of the head."),
                                                     "dropout": (0.5, "Dropout in the head.")}
    recipe: ClassVar[dict[str, Any]] = {}  # the training options `mlc run --head NAME` sets (none: the defaults)
    grid: ClassVar[bool] = False  # tried by `fit-head --grid`

    def __init__(self, *, image_dim: int, text_dim: int, num_classes: int, hidden: int = 512,
                 dropout: float = 0.5, token_dim: int = 0) -> None:
        super().__init__()
        self.image_dim, self.text_dim, self.num_classes = int(image_dim), int(text_dim), int(num_classes)
        self.hidden, self.dropout_p, self.token_dim = int(hidden), float(dropout), int(token_dim)
        self._build(self.image_dim, self.text_dim, self.num_classes, self.hidden, self.dropout_p)

    def _build(self, image_dim: int, text_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        """Create the head's layers (each subclass)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) such that ``create_head(**config())`` rebuilds this head."""
        return {
            "name": self.name,
            "image_dim": self.image_dim,
            "text_dim": self.text_dim,
            "num_classes": self.num_classes,
            "hidden": self.hidden,
            "dropout": self.dropout_p,
        } | ({"token_dim": self.token_dim} if self.token_dim else {})

    def _input(self, x: torch.Tensor | None, modality: str, dim: int) -> torch.Tensor:
        """Check one modality's (B, D) features and cast them (e.g. float16 cache) to the head's dtype."""
        if x is None:
            raise ValueError(f"head {self.name!r} needs {modality} features, got None")
        if x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"head {self.name!r} expects {modality} features (B, {dim}), got {tuple(x.shape)}")
        return x.to(dtype=next(self.parameters()).dtype)

    def forward(self, image_feat: torch.Tensor | None, text_feat: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    """One hidden layer: Linear -> ReLU -> Dropout -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


@HEADS.register()
class SumHead(FusionHead):
    """The seed report's fusion: project each modality to ``hidden`` linearly, add, ReLU, dropout, Linear.

    Kept faithful to the seed (no normalisation layer), so its numbers are a like-for-like baseline.
    """

    name = "sum"
    modalities = ("image", "text")
    grid = True

    def _build(self, image_dim: int, text_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        self.image_proj = nn.Linear(image_dim, hidden)
        self.text_proj = nn.Linear(text_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, image_feat: torch.Tensor | None, text_feat: torch.Tensor | None) -> torch.Tensor:
        zi = self.image_proj(self._input(image_feat, "image", self.image_dim))  # (B, H)
        zt = self.text_proj(self._input(text_feat, "text", self.text_dim))  # (B, H)
        return self.classifier(self.dropout(torch.relu(zi + zt)))  # (B, C)


@HEADS.register()
class ConcatHead(FusionHead):
    """Concatenate both feature vectors, then an MLP with one hidden layer."""

    name = "concat"
    modalities = ("image", "text")
    grid = True

    def _build(self, image_dim: int, text_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        self.mlp = _mlp(image_dim + text_dim, hidden, num_classes, dropout)

    def forward(self, image_feat: torch.Tensor | None, text_feat: torch.Tensor | None) -> torch.Tensor:
        x = torch.cat([self._input(image_feat, "image", self.image_dim),
                       self._input(text_feat, "text", self.text_dim)], dim=1)  # (B, Di + Dt)
        return self.mlp(x)  # (B, C)


@HEADS.register()
class GatedHead(FusionHead):
    """Gated fusion (after Arevalo et al. 2017's gated multimodal unit).

    zi = tanh(Wi x_img), zt = tanh(Wt x_txt), both (B, H); g = sigmoid(Wg [zi; zt]) is a per-sample,
    per-dimension gate, so the head can lean on the caption for some concepts and on the image for
    others; z = g * zi + (1 - g) * zt, then dropout and a Linear classifier. tanh keeps the two
    projections on one scale so the gate, not a magnitude difference, decides the mix.
    """

    name = "gated"
    modalities = ("image", "text")
    grid = True

    def _build(self, image_dim: int, text_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        self.image_proj = nn.Linear(image_dim, hidden)
        self.text_proj = nn.Linear(text_dim, hidden)
        self.gate = nn.Linear(2 * hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, image_feat: torch.Tensor | None, text_feat: torch.Tensor | None) -> torch.Tensor:
        zi = torch.tanh(self.image_proj(self._input(image_feat, "image", self.image_dim)))  # (B, H)
        zt = torch.tanh(self.text_proj(self._input(text_feat, "text", self.text_dim)))  # (B, H)
        g = torch.sigmoid(self.gate(torch.cat([zi, zt], dim=1)))  # (B, H) in (0, 1)
        z = g * zi + (1.0 - g) * zt  # (B, H)
        return self.classifier(self.dropout(z))  # (B, C)


class _SingleModalityHead(FusionHead):
    """An MLP over one modality's features; the other input is ignored (may be None)."""

    modality: ClassVar[str]

    def _build(self, image_dim: int, text_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        self.mlp = _mlp(image_dim if self.modality == "image" else text_dim, hidden, num_classes, dropout)

    def forward(self, image_feat: torch.Tensor | None, text_feat: torch.Tensor | None) -> torch.Tensor:
        if self.modality == "image":
            return self.mlp(self._input(image_feat, "image", self.image_dim))  # (B, C)
        return self.mlp(self._input(text_feat, "text", self.text_dim))  # (B, C)


@HEADS.register()
class ImageHead(_SingleModalityHead):
    """Image-only ablation."""

    name = "image"
    modalities = ("image",)
    modality = "image"


@HEADS.register()
class TextHead(_SingleModalityHead):
    """Caption-only ablation."""

    name = "text"
    modalities = ("text",)
    modality = "text"


@HEADS.register()
class AttentionHead(FusionHead):
    """Label queries attending over the image's token map and the caption (Query2Label / ML-Decoder style).

    The image features are an encoder's last map flattened, (B, L * token_dim) with L = h * w positions
    (``--image-pooling tokens``). Keys and values: the L positions projected to ``hidden`` plus a learned
    position embedding, the map's mean (the pooled vector the other heads see) and the caption vector,
    each with a type embedding. One pre-norm decoder layer: the C label queries attend to each other
    (label co-occurrence), then to the keys, then an MLP; each query's output gives its label's logit
    through its own linear map (ML-Decoder's group FC). ``dropout`` acts before that map; inside the
    layer a fixed 0.1, as in Query2Label.
    """

    name = "attention"
    summary = ("label queries over image token maps: needs a cache extracted with --image-pooling tokens (mlc run "
               "--head attention does that, with a batch of rows/16 within 16-256)")
    modalities = ("image",)  # the caption is optional: text_dim 0 leaves it out
    tokens = True
    # the pooled heads' defaults (lr 3e-3, dropout 0.5, 40 constant epochs) overfit a transformer layer within 3
    # epochs; these were measured on ids 0-9999 (docs/recipes.md)
    recipe = {"lr": 3e-4, "schedule": "cosine", "warmup": 0.05, "weight_decay": 1e-2, "epochs": 12, "hidden": 256,
              "dropout": 0.2}
    HEADS_PER_LAYER: ClassVar[int] = 8

    def _build(self, image_dim: int, text_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        c, d = self.token_dim, hidden
        if c < 1 or image_dim % c:
            raise ValueError(f"head 'attention' needs image token maps: image_dim {image_dim} is not a whole "
                             f"number of {c}-d tokens")
        if d % self.HEADS_PER_LAYER:
            raise ValueError(f"head 'attention': --hidden must be a multiple of {self.HEADS_PER_LAYER}, got {d}")
        self.num_tokens = image_dim // c
        self.image_proj = nn.Linear(c, d)
        self.text_proj = nn.Linear(text_dim, d) if text_dim else None
        self.position = nn.Parameter(torch.randn(self.num_tokens, d) * 0.02)  # (L, d)
        self.kinds = nn.Parameter(torch.randn(3, d) * 0.02)  # image position, image mean, caption
        self.kv_norm = nn.LayerNorm(d)
        self.queries = nn.Parameter(torch.randn(num_classes, d) * 0.02)  # (C, d)
        self.q_norm1, self.q_norm2, self.q_norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, self.HEADS_PER_LAYER, dropout=0.1, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, self.HEADS_PER_LAYER, dropout=0.1, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * d, d))
        self.inner_dropout = nn.Dropout(0.1)
        self.out_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.group_weight = nn.Parameter(torch.randn(num_classes, d) * 0.02)  # (C, d): one linear map per label
        self.group_bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, image_feat: torch.Tensor | None, text_feat: torch.Tensor | None) -> torch.Tensor:
        x = self._input(image_feat, "image", self.image_dim)
        tokens = x.unflatten(1, (self.num_tokens, self.token_dim))  # (B, L, c)
        keys = [self.image_proj(tokens) + self.position + self.kinds[0],  # (B, L, d)
                self.image_proj(tokens.mean(1, keepdim=True)) + self.kinds[1]]  # (B, 1, d)
        if self.text_proj is not None:
            t = self._input(text_feat, "text", self.text_dim)
            keys.append(self.text_proj(t)[:, None] + self.kinds[2])  # (B, 1, d)
        kv = self.kv_norm(torch.cat(keys, dim=1))  # (B, L + 2, d)
        q = self.queries.expand(x.shape[0], -1, -1)  # (B, C, d)
        h = self.q_norm1(q)
        q = q + self.inner_dropout(self.self_attn(h, h, h, need_weights=False)[0])
        h = self.q_norm2(q)
        q = q + self.inner_dropout(self.cross_attn(h, kv, kv, need_weights=False)[0])
        q = q + self.inner_dropout(self.mlp(self.q_norm3(q)))
        return (self.dropout(self.out_norm(q)) * self.group_weight).sum(-1) + self.group_bias  # (B, C)


@torch.inference_mode()
def predict_proba(head: nn.Module, image: torch.Tensor, text: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """image (N, V, Di), text (N, Dt) -> probabilities (N, C), averaged over the V cached image views
    (test-time augmentation). Inputs may be float16 (a cache); rows go through in batches."""
    head.eval()
    out = []
    batch = min(batch, 256) if getattr(head, "tokens", False) else batch  # token maps: ~250 KB a row in float32
    for s in range(0, len(text), batch):
        img, txt = image[s:s + batch], text[s:s + batch]
        out.append(sum(torch.sigmoid(head(img[:, v], txt)) for v in range(img.shape[1])) / img.shape[1])
    return torch.cat(out)


def ensemble_proba(heads: Sequence[nn.Module], image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """image (N, V, Di), text (N, Dt) numpy -> (N, C): the heads' (a run's fold heads') mean probability."""
    img, txt = torch.from_numpy(image), torch.from_numpy(text)
    return (sum(predict_proba(h, img, txt) for h in heads) / len(heads)).numpy()


@dataclass(frozen=True, kw_only=True)
class HeadOptions(Config):
    """Which fusion head, how wide: shared by ``fit-head`` and ``finetune``."""

    PANEL: ClassVar[str] = "Head"

    head: str = opt("concat", HEADS.help("Fusion head (docs/heads.md):"))
    hidden: int = opt(*FusionHead.options["hidden"])
    dropout: float = opt(*FusionHead.options["dropout"])

    def __post_init__(self) -> None:
        super().__post_init__()
        inner = self.head in HEADS and self.head not in HEADS.choices()  # mlc's own (blend): never a choice
        require([(self.head in HEADS.choices(), f"--head must be one of {sorted(HEADS.choices())}"
                  + (f" ({self.head}: {HEADS.about[self.head].summary})" if inner else "")),
                 (self.hidden >= 1, "--hidden must be at least 1"),
                 (0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)")])

    def create_head(self, image_dim: int, text_dim: int, num_classes: int, token_dim: int = 0) -> FusionHead:
        return create_head(self.head, image_dim=image_dim, text_dim=text_dim, num_classes=num_classes,
                           hidden=self.hidden, dropout=self.dropout, token_dim=token_dim)


def create_head(
    name: str,
    *,
    image_dim: int,
    text_dim: int,
    num_classes: int,
    hidden: int = FusionHead.options["hidden"][0],
    dropout: float = FusionHead.options["dropout"][0],
    token_dim: int = 0,
    **extra: Any,
) -> FusionHead:
    """Build the head registered as ``name``; raises MlcError for an unknown name. ``token_dim``: the width of
    each image token when the image features are a token map (0: pooled vectors). ``extra``: a head's own
    arguments, as its ``config()`` records them (``blend``: its ``members``)."""
    HEADS.get_entry(name)
    if HEADS[name].tokens is not None and HEADS[name].tokens != (token_dim > 0):  # None: either (blend)
        raise MlcError(f"head {name!r} reads {'image token maps' if HEADS[name].tokens else 'pooled image vectors'}"
                       f", these features are {'token maps' if token_dim else 'pooled vectors'}: "
                       + ("extract with --image-pooling tokens" if HEADS[name].tokens
                          else "use --head attention, or extract with --image-pooling avg"))
    dims = {"image": image_dim, "text": text_dim}
    if min(num_classes, hidden, *(dims[m] for m in HEADS[name].modalities)) < 1 or min(dims.values()) < 0 \
            or not 0.0 <= dropout < 1.0:
        raise ValueError(f"head {name!r} needs {' and '.join(HEADS[name].modalities)} features, num_classes and "
                         f"hidden >= 1 and dropout in [0, 1) (got dims {dims})")
    return HEADS[name](image_dim=image_dim, text_dim=text_dim, num_classes=num_classes, hidden=hidden,
                       dropout=dropout, token_dim=token_dim, **extra)


def _import_head_modules() -> None:
    """A head of its own module, ``pipeline/head_<name>.py``, registers itself when imported: import them all, so
    adding one is that one file."""
    for path in sorted(Path(__file__).parent.glob("head_*.py")):
        importlib.import_module(f"{__package__}.{path.stem}")


_import_head_modules()  # last: those modules import FusionHead and HEADS from here
