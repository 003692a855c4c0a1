"""Multi-label losses (a registry) and class-imbalance helpers.

Every loss maps (logits (B, C), targets (B, C) float 0/1) -> scalar. Build one with
``create_loss(name, pos_weight=..., **kw)``; ``kw`` go to the loss's constructor (e.g. ASL's gammas).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .errors import MlcError
from .registries import Registry, load_plugins

# name -> factory(pos_weight=None, **kw); each describes itself (pipeline/registries.py): --loss's help comes from it
LOSSES: Registry[Callable[..., nn.Module]] = Registry("loss", load=load_plugins)


class AsymmetricLoss(nn.Module):
    """Asymmetric Loss (Ridnik et al., ICCV 2021, "Asymmetric Loss For Multi-Label Classification").

    With p = sigmoid(logit) and the shifted probability p_m = max(p - clip, 0):
        L+ = (1 - p)^gamma_pos * log(p)              for positives
        L- = p_m^gamma_neg * log(1 - p_m)            for negatives
        loss = -sum over classes of (y L+ + (1 - y) L-)
    The large ``gamma_neg`` down-weights easy negatives (most of the C labels of an image), and the
    probability shift ``clip`` discards very easy negatives entirely (p < clip gives zero loss) and
    softens the push on possibly mislabelled ones. As in the authors' reference implementation
    (Alibaba-MIIL/ASL, src/loss_functions/losses.py), log arguments are clamped at ``eps`` and
    gradients flow through the focusing weights.

    ``reduction="mean"`` (default) sums over classes and averages over the batch, so the value does
    not grow with batch size; ``"sum"`` sums over everything like the reference code.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 1.0, clip: float = 0.05,
                 eps: float = 1e-8, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x, y = logits.float(), targets.float()  # float32: the log/pow terms are unstable in float16
        p = torch.sigmoid(x)  # (B, C)
        q = 1.0 - p  # (B, C) probability of "negative"
        if self.clip and self.clip > 0:
            q = (q + self.clip).clamp(max=1.0)  # = 1 - max(p - clip, 0): the probability shift
        loss = y * torch.log(p.clamp(min=self.eps)) + (1 - y) * torch.log(q.clamp(min=self.eps))
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            pt = y * p + (1 - y) * q  # probability of the correct answer (shifted for negatives)
            gamma = self.gamma_pos * y + self.gamma_neg * (1 - y)  # (B, C) one-sided focusing
            loss = loss * torch.pow(1.0 - pt, gamma)
        total = -loss.sum()
        return total / x.shape[0] if self.reduction == "mean" and x.shape[0] else total


@LOSSES.register("bce", grid=True, options={"pos_weight": (False, "weight positives by negatives/positives "
                                                                   "per class (--pos-weight)")})
def _bce(pos_weight: torch.Tensor | None = None, **kw: object) -> nn.Module:
    """Binary cross-entropy on each label."""
    # BCEWithLogitsLoss registers pos_weight as a buffer, so .to(device) moves it with the loss.
    return nn.BCEWithLogitsLoss(pos_weight=pos_weight, **kw)


@LOSSES.register("soft-margin")
def _soft_margin(pos_weight: torch.Tensor | None = None, **kw: object) -> nn.Module:
    """torch's multi-label soft margin loss."""
    if pos_weight is not None:
        raise MlcError("loss 'soft-margin' takes no pos_weight; use 'bce', which does")
    return nn.MultiLabelSoftMarginLoss(**kw)


@LOSSES.register("asl", grid=True, options={"gamma_neg": (4.0, "focusing on negatives"),
                                            "gamma_pos": (1.0, "focusing on positives"),
                                            "clip": (0.05, "probability shift of negatives")})
def _asl(pos_weight: torch.Tensor | None = None, **kw: object) -> nn.Module:
    """Asymmetric loss (Ridnik et al. 2021): easy negatives down-weighted."""
    if pos_weight is not None:
        raise MlcError("loss 'asl' takes no pos_weight (its asymmetric focusing handles imbalance); "
                       "use 'bce' for pos_weight")
    return AsymmetricLoss(**kw)


def create_loss(name: str, *, pos_weight: torch.Tensor | None = None, **kw: object) -> nn.Module:
    """Build the loss registered as ``name`` (bce, soft-margin, asl); ``pos_weight`` (C,) is bce-only."""
    return LOSSES.get_entry(name)(pos_weight=pos_weight, **kw)


def pos_weight_from_labels(y: np.ndarray, cap: float = 10.0) -> torch.Tensor:
    """(N, C) 0/1 labels -> (C,) float32 BCE pos_weight = #negatives / #positives, clipped to [1/cap, cap].

    The upper clip stops a rare class from dominating the loss (a class with no positives gets
    ``cap``); the lower clip keeps a near-universal class's positives from being weighted to ~0.
    """
    y = np.asarray(y) > 0.5
    if y.ndim != 2:
        raise ValueError(f"labels must be a 2-D (N, C) matrix, got shape {y.shape}")
    if cap < 1:
        raise ValueError("cap must be >= 1")
    n_pos = y.sum(0).astype(np.float64)  # (C,)
    with np.errstate(divide="ignore"):
        w = np.where(n_pos > 0, (y.shape[0] - n_pos) / np.maximum(n_pos, 1.0), cap)
    return torch.from_numpy(np.clip(w, 1.0 / cap, cap).astype(np.float32))


def inverse_frequency_weights(y: np.ndarray, reduce: str = "max") -> np.ndarray:
    """(N, C) 0/1 labels -> (N,) float64 sampling weights for a WeightedRandomSampler, mean 1.

    A label's weight is 1 / its frequency; a sample's weight is the ``max`` (default) or ``mean``
    over its labels. ``max`` is the default because nearly every image also carries a very common
    label (person): with ``mean`` that label would dilute the boost of the rare label it co-occurs
    with, while ``max`` makes an image as likely to be drawn as its rarest label warrants. Samples
    with no label get the smallest weight any labelled sample could get.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    y = np.asarray(y) > 0.5
    if y.ndim != 2:
        raise ValueError(f"labels must be a 2-D (N, C) matrix, got shape {y.shape}")
    n = y.shape[0]
    if n == 0:
        return np.zeros(0)
    count = y.sum(0).astype(np.float64)  # (C,)
    inv = np.where(count > 0, n / np.maximum(count, 1.0), 0.0)  # (C,) 1 / frequency
    per_label = y * inv[None, :]  # (N, C), 0 where the label is absent
    n_labels = y.sum(1)  # (N,)
    if reduce == "max":
        w = per_label.max(1)
    else:
        w = per_label.sum(1) / np.maximum(n_labels, 1)
    floor = inv[count > 0].min() if (count > 0).any() else 1.0
    w = np.where(n_labels > 0, w, floor)
    return w / w.mean()
