"""Fusion heads: small ``nn.Module``s from cached image/text features to (B, C) logits, in a registry.

Every head has ``forward(image_feat, text_feat)`` with ``image_feat`` (B, Di) or None and
``text_feat`` (B, Dt) or None, a class attribute ``modalities`` naming the inputs it reads, and
``config()`` returning the keyword arguments that rebuild it: ``create_head(**head.config())``.
Features may arrive as float16 from the cache; heads cast them to their own parameter dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .config import Config, opt, require
from .errors import MlcError


class FusionHead(nn.Module):
    """Base class: stores the constructor arguments and checks/casts inputs."""

    name: ClassVar[str]
    modalities: ClassVar[tuple[str, ...]]

    def __init__(self, *, image_dim: int, text_dim: int, num_classes: int, hidden: int = 512,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.image_dim, self.text_dim, self.num_classes = int(image_dim), int(text_dim), int(num_classes)
        self.hidden, self.dropout_p = int(hidden), float(dropout)
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
        }

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


class SumHead(FusionHead):
    """The seed report's fusion: project each modality to ``hidden`` linearly, add, ReLU, dropout, Linear.

    Kept faithful to the seed (no normalisation layer), so its numbers are a like-for-like baseline.
    """

    name = "sum"
    modalities = ("image", "text")

    def _build(self, image_dim: int, text_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        self.image_proj = nn.Linear(image_dim, hidden)
        self.text_proj = nn.Linear(text_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, image_feat: torch.Tensor | None, text_feat: torch.Tensor | None) -> torch.Tensor:
        zi = self.image_proj(self._input(image_feat, "image", self.image_dim))  # (B, H)
        zt = self.text_proj(self._input(text_feat, "text", self.text_dim))  # (B, H)
        return self.classifier(self.dropout(torch.relu(zi + zt)))  # (B, C)


class ConcatHead(FusionHead):
    """Concatenate both feature vectors, then an MLP with one hidden layer."""

    name = "concat"
    modalities = ("image", "text")

    def _build(self, image_dim: int, text_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        self.mlp = _mlp(image_dim + text_dim, hidden, num_classes, dropout)

    def forward(self, image_feat: torch.Tensor | None, text_feat: torch.Tensor | None) -> torch.Tensor:
        x = torch.cat([self._input(image_feat, "image", self.image_dim),
                       self._input(text_feat, "text", self.text_dim)], dim=1)  # (B, Di + Dt)
        return self.mlp(x)  # (B, C)


class GatedHead(FusionHead):
    """Gated fusion (after Arevalo et al. 2017's gated multimodal unit).

    zi = tanh(Wi x_img), zt = tanh(Wt x_txt), both (B, H); g = sigmoid(Wg [zi; zt]) is a per-sample,
    per-dimension gate, so the head can lean on the caption for some concepts and on the image for
    others; z = g * zi + (1 - g) * zt, then dropout and a Linear classifier. tanh keeps the two
    projections on one scale so the gate, not a magnitude difference, decides the mix.
    """

    name = "gated"
    modalities = ("image", "text")

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


class ImageHead(_SingleModalityHead):
    """Image-only ablation."""

    name = "image"
    modalities = ("image",)
    modality = "image"


class TextHead(_SingleModalityHead):
    """Caption-only ablation."""

    name = "text"
    modalities = ("text",)
    modality = "text"


@torch.inference_mode()
def predict_proba(head: nn.Module, image: torch.Tensor, text: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    """image (N, V, Di), text (N, Dt) -> probabilities (N, C), averaged over the V cached image views
    (test-time augmentation). Inputs may be float16 (a cache); rows go through in batches."""
    head.eval()
    out = []
    for s in range(0, len(text), batch):
        img, txt = image[s:s + batch], text[s:s + batch]
        out.append(sum(torch.sigmoid(head(img[:, v], txt)) for v in range(img.shape[1])) / img.shape[1])
    return torch.cat(out)


def ensemble_proba(heads: Sequence[nn.Module], image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """image (N, V, Di), text (N, Dt) numpy -> (N, C): the heads' (a run's fold heads') mean probability."""
    img, txt = torch.from_numpy(image), torch.from_numpy(text)
    return (sum(predict_proba(h, img, txt) for h in heads) / len(heads)).numpy()


HEADS: dict[str, type[FusionHead]] = {
    cls.name: cls for cls in (SumHead, ConcatHead, GatedHead, ImageHead, TextHead)
}


@dataclass(frozen=True, kw_only=True)
class HeadOptions(Config):
    """Which fusion head, how wide: shared by ``fit-head`` and ``finetune``."""

    PANEL: ClassVar[str] = "Head"

    head: str = opt("concat", "Fusion head: sum (the seed report's), concat, gated, image or text "
                    "(single-modality ablations).")
    hidden: int = opt(512, "Hidden width of the head.")
    dropout: float = opt(0.5, "Dropout in the head.")

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.head in HEADS, f"--head must be one of {sorted(HEADS)}"),
                 (self.hidden >= 1, "--hidden must be at least 1"),
                 (0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)")])

    def create_head(self, image_dim: int, text_dim: int, num_classes: int) -> FusionHead:
        return create_head(self.head, image_dim=image_dim, text_dim=text_dim, num_classes=num_classes,
                           hidden=self.hidden, dropout=self.dropout)


def create_head(
    name: str,
    *,
    image_dim: int,
    text_dim: int,
    num_classes: int,
    hidden: int = 512,
    dropout: float = 0.2,
) -> FusionHead:
    """Build the head registered as ``name``; raises MlcError for an unknown name."""
    if name not in HEADS:
        raise MlcError(f"unknown head {name!r}; choose from {', '.join(sorted(HEADS))}")
    dims = {"image": image_dim, "text": text_dim}
    if min(num_classes, hidden, *(dims[m] for m in HEADS[name].modalities)) < 1 or min(dims.values()) < 0 \
            or not 0.0 <= dropout < 1.0:
        raise ValueError(f"head {name!r} needs {' and '.join(HEADS[name].modalities)} features, num_classes and "
                         f"hidden >= 1 and dropout in [0, 1) (got dims {dims})")
    return HEADS[name](image_dim=image_dim, text_dim=text_dim, num_classes=num_classes, hidden=hidden,
                       dropout=dropout)
