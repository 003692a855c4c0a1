"""What a feature cache holds: :class:`CacheMeta`, its format number and the checks on it.

No h5py here (:mod:`pipeline.cache` stays the only module that imports it): a cache's metadata is
plain JSON, so comparing caches, checking one against a run and checksumming the meta text need no
HDF5. Split out of :mod:`pipeline.cache`, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import MismatchError
from .labels import LabelSpace

# 1: mlc 0.1 (no "format" field; its "extra" held the extract config); 2: photos decoded as stored (EXIF
# orientation ignored), meta without a checksum
CACHE_FORMAT = 3
# Fields that may differ between two caches that hold the same features.
_NOT_IDENTITY = frozenset({"created", "mlc_version", "num_records", "extra"})


@dataclass(frozen=True)
class CacheMeta:
    """Everything needed to tell what a cache holds and whether it may be reused."""

    split: str
    image_encoder: str
    text_encoder: str
    image_weights: str
    image_weights_hash: str
    text_weights: str
    text_weights_hash: str
    random_init: bool
    image_preprocess: dict[str, Any]
    text_preprocess: dict[str, Any]
    views: int
    image_dim: int
    text_dim: int
    label_ids: tuple[int | str, ...]
    label_names: tuple[str, ...]
    data_fingerprint: str
    num_records: int
    image_cut: str | None = None
    text_cut: str | None = None
    source_run: str | None = None
    precision: str = "fp32"  # what the encoders computed in: fp32, bf16, fp16 or int8 (older caches: fp32)
    mlc_version: str = ""
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # {"recipe": how the features were made}
    format: int = CACHE_FORMAT

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError("a cache holds at least one image view")
        object.__setattr__(self, "label_ids", tuple(self.label_ids))  # ints (COMP5329) or text
        object.__setattr__(self, "label_names", tuple(self.label_names))

    @property
    def labels(self) -> LabelSpace:
        return LabelSpace(self.label_ids, self.label_names)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def identity(self) -> dict[str, Any]:
        """The fields that decide whether two caches hold the same features (JSON-normalised)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _NOT_IDENTITY}
        return json.loads(json.dumps(d, sort_keys=True))

    def differences(self, other: CacheMeta) -> list[str]:
        a, b = self.identity(), other.identity()
        return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _digest(text: Any) -> str:
    """sha256 hex of the meta attribute's JSON text (h5py gives str; bytes from other writers)."""
    data = text if isinstance(text, bytes) else str(text).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def check_compatible(meta: CacheMeta, expected: dict[str, Any], *, what: str) -> None:
    """Refuse a cache whose fields differ from what a run expects (encoders, weights, labels, cuts)."""
    have = meta.to_dict()
    diffs = [
        f"{k}: the run has {v!r}, the cache has {have.get(k)!r}"
        for k, v in expected.items()
        if json.loads(json.dumps(have.get(k))) != json.loads(json.dumps(v))
    ]
    if diffs:
        raise MismatchError(f"{what} does not match: " + "; ".join(diffs))
