"""The blend head of ``mlc run --quality best`` (pipeline/best.py): a best run's members and weights as one head.

It registers itself like every head (imported by ``pipeline.heads``), as ``internal``: mlc builds it from a best
run's members, so it is never a ``--head`` choice nor tried by ``fit-head --grid``; a run or an export that names
it rebuilds it from head.json (``create_head(**config())``) like any head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .heads import HEADS, FusionHead, create_head


@HEADS.register()
class BlendHead(FusionHead):
    """A weighted blend of members (``mlc run --quality best``): each member is K fold heads over its own columns of
    the fused features; its probability is their mean, the blend's is the weighted sum of the members'.

    ``members``: [{"name", "head": head.json of the member, "folds": K, "weight": w, "image_ranges": [[start, end],
    ...], "text_ranges": [...], "image_input": "features" | "mean"}], the ranges picking the member's features out of
    the fused ones in the member's own order. Over an image token map (``token_dim`` > 0) an attention member reads
    the map itself ("features") and a pooled member reads its mean over the positions ("mean", its ranges then index
    that token_dim-wide vector): the map's mean is the pooled vector of the same encoder, so one graph with the same
    inputs (token map + caption vectors) computes members of both kinds. It returns logits (logit of the blended
    probability) like every head, so predict_proba, the run's scorer and the ONNX export (one graph, the blend
    inside) treat it as any head.
    """

    name = "blend"
    modalities = ("image", "text")
    summary = "a weighted blend of members' fold heads, built by mlc run --quality best"
    internal: ClassVar[bool] = True
    tokens: ClassVar[bool | None] = None  # either kind of image features (create_head checks no kind)
    options: ClassVar[dict[str, tuple[Any, str]]] = {}

    def __init__(self, *, image_dim: int, text_dim: int, num_classes: int, members: Sequence[dict[str, Any]],
                 hidden: int = 1, dropout: float = 0.0, token_dim: int = 0) -> None:
        self.member_specs = [dict(m) for m in members]
        super().__init__(image_dim=image_dim, text_dim=text_dim, num_classes=num_classes, hidden=hidden,
                         dropout=dropout, token_dim=token_dim)
        self.tokens = self.token_dim > 0  # predict_proba's smaller batches for token maps

    def _build(self, image_dim: int, text_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        if not self.member_specs:
            raise ValueError("head 'blend' needs at least one member")
        self.members = nn.ModuleList()
        for i, m in enumerate(self.member_specs):
            if m["head"].get("name") == "blend" or m["head"]["num_classes"] != num_classes:
                raise ValueError(f"head 'blend': member {i} is no head over {num_classes} labels")
            self.members.append(nn.ModuleList(create_head(**m["head"]) for _ in range(int(m["folds"]))))
            mean = m.get("image_input", "features") == "mean"
            if m.get("image_input", "features") not in ("features", "mean") or (mean and not self.token_dim):
                raise ValueError(f"head 'blend': member {i}'s image_input must be 'features', or 'mean' over a token "
                                 "map")
            for kind, dim in (("image", self.token_dim if mean else image_dim), ("text", text_dim)):
                idx = [j for a, b in m[f"{kind}_ranges"] for j in range(a, b)]
                if any(j < 0 or j >= dim for j in idx) or len(idx) != m["head"][f"{kind}_dim"]:
                    raise ValueError(f"head 'blend': member {i}'s {kind} ranges do not fit its head or the features")
                # not persistent: rebuilt from head.json, never stored beside the weights
                self.register_buffer(f"_{kind}_idx{i}", torch.tensor(idx, dtype=torch.long), persistent=False)
        self.register_buffer("_weights", torch.tensor([float(m["weight"]) for m in self.member_specs]),
                             persistent=False)

    def config(self) -> dict[str, Any]:
        return super().config() | {"members": [dict(m) for m in self.member_specs]}

    def forward(self, image_feat: torch.Tensor | None, text_feat: torch.Tensor | None) -> torch.Tensor:
        img = self._input(image_feat, "image", self.image_dim)
        txt = self._input(text_feat, "text", self.text_dim)
        p = torch.zeros(img.shape[0], self.num_classes, dtype=img.dtype, device=img.device)
        # the token map's mean over its positions: the pooled vector the pooled members were fitted on
        pooled = img.unflatten(1, (-1, self.token_dim)).mean(1) if any(
            m.get("image_input") == "mean" for m in self.member_specs) else None
        for i, folds in enumerate(self.members):
            src = pooled if self.member_specs[i].get("image_input") == "mean" else img
            zi = src.index_select(1, getattr(self, f"_image_idx{i}"))
            zt = txt.index_select(1, getattr(self, f"_text_idx{i}"))
            p = p + self._weights[i] * torch.stack([torch.sigmoid(h(zi, zt)) for h in folds]).mean(0)
        p = p.clamp(1e-7, 1 - 1e-7)
        return torch.log(p) - torch.log1p(-p)  # logit: sigmoid() downstream gives back the blend's probability
