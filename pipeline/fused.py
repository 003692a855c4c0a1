"""Several caches of the same rows, read as one: their image features side by side, their text too.

``mlc fit-head CACHE [CACHE ...]`` trains one head over all of them and ``mlc submit`` makes each test
cache with its own recipe and joins them the same way. Caches must hold the same rows (ImageIDs in the
same order, the same data fingerprint), labels and number of views; the difference is named otherwise.
An image (or text) encoder that two caches share feeds the head once: lite0 + MiniLM fused with
lite0 + MPNet gives lite0 + MiniLM + MPNet.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cache import CacheMeta, CacheReader
from .errors import MismatchError, MlcError
from .identity import FUSE, FeatureEntry


@dataclass(frozen=True)
class Part:
    """Which of a cache's features feed the head."""

    image: bool
    text: bool

    def to_dict(self) -> dict[str, bool]:
        return {"image": self.image, "text": self.text}

    @classmethod
    def of(cls, entry: FeatureEntry) -> Part:
        """The part of a features.json entry."""
        return cls(entry.image, entry.text)


def _identity(meta: CacheMeta, kind: str) -> str:
    """One encoder's features as fusion tells them apart (``identity.FUSE``; the image's views too)."""
    key = meta.encoder(kind).key(FUSE) | ({"views": meta.views} if kind == "image" else {})
    return json.dumps(key, sort_keys=True)


def plan_parts(metas: Sequence[CacheMeta]) -> list[Part]:
    """Each distinct image (and text) encoder once, from the first cache that has it."""
    seen: dict[str, set[str]] = {"image": set(), "text": set()}
    parts = []
    for m in metas:
        use = {}
        for kind in ("image", "text"):
            key = _identity(m, kind)
            use[kind] = key not in seen[kind]
            seen[kind].add(key)
        parts.append(Part(**use))
    return parts


def check_joinable(readers: Sequence[CacheReader]) -> list[str]:
    """The shared ImageIDs; MismatchError naming how a cache differs from the first."""
    first = readers[0]
    ids = first.image_ids
    for r in readers[1:]:
        a, b = first.meta, r.meta
        if (a.split, a.label_ids, a.views) != (b.split, b.label_ids, b.views):
            raise MismatchError(f"{r.path} cannot be fused with {first.path}: split/labels/views "
                                f"{(b.split, list(b.label_ids), b.views)} vs {(a.split, list(a.label_ids), a.views)}")
        other = r.image_ids
        if other != ids:
            n = min(len(ids), len(other))
            row = next((i for i in range(n) if ids[i] != other[i]), n)
            theirs, ours = (x[row] if row < len(x) else "none" for x in (other, ids))
            raise MismatchError(f"{r.path} cannot be fused with {first.path}: other rows ({len(other)} vs "
                                f"{len(ids)}; first difference at row {row}: {theirs} vs {ours})")
        if a.data_fingerprint != b.data_fingerprint:
            raise MismatchError(f"{r.path} cannot be fused with {first.path}: the same ImageIDs but other data "
                                "(captions, labels or image bytes changed: data fingerprints differ)")
    return ids


def token_dim(metas: Sequence[CacheMeta], parts: Sequence[Part]) -> int:
    """The width of each image token when the head's image features are one encoder's token map
    (``--image-pooling tokens``), else 0. A token map is never fused with other image features: the
    attention head reads positions of one map."""
    used = [m for m, p in zip(metas, parts, strict=True) if p.image and m.image_dim]
    dims = [int(m.image_preprocess.get("token_dim", 0)) for m in used]
    if any(dims) and len(used) > 1:
        raise MlcError("a cache of image token maps (--image-pooling tokens) cannot be fused with other image "
                       "features: give it alone, or with caches that add caption features only")
    return dims[0] if dims else 0


def load_joined(readers: Sequence[CacheReader], parts: Sequence[Part]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, image (N, V, sum Di), text (N, sum Dt)) as float32, NaN-free (MlcError naming rows otherwise).
    Image token maps stay float16, as cached (49x the pooled size; heads cast each batch)."""
    ids = check_joinable(readers)
    n, views = len(ids), readers[0].meta.views
    tokens = token_dim([r.meta for r in readers], parts)
    image: list[Any] = [np.zeros((n, views, 0), np.float16 if tokens else np.float32)]  # no images: no features
    text: list[Any] = [np.zeros((n, 0), np.float32)]
    for r, part in zip(readers, parts, strict=True):
        if part.image and r.meta.image_dim:  # copy=False: a float16 token map (GBs) is not copied again
            image.append(r.finite("image", r.array("image").astype(np.float16 if tokens else np.float32, copy=False),
                                  ids))
        if part.text and r.meta.text_dim:
            text.append(r.finite("text", r.array("text").astype(np.float32, copy=False), ids))
    return ids, _joined(image), _joined(text)


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays side by side on their last axis; one array (after the empty first) is returned as it is: a token
    map is the one image input, and concatenating would hold it twice at once."""
    return arrays[1] if len(arrays) == 2 else np.concatenate(arrays, axis=-1)
