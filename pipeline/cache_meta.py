"""What a feature cache holds: :class:`CacheMeta`, its format number and the checks on it.

No h5py here (:mod:`pipeline.cache` stays the only module that imports it): a cache's metadata is
plain JSON, so comparing caches, checking one against a run and checksumming the meta text need no
HDF5. Split out of :mod:`pipeline.cache`, which re-exports these names.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import MismatchError
from .identity import EncoderId, differences
from .labels import LabelSpace

# 1: mlc 0.1 (no "format" field; its "extra" held the extract config); 2: photos decoded as stored (EXIF
# orientation ignored), meta without a checksum
CACHE_FORMAT = 3
# Fields that may differ between two caches that hold the same features.
_NOT_IDENTITY = frozenset({"created", "mlc_version", "num_records", "extra"})
# The order of the flat fields in a cache's meta (mlc 0.2's, kept so the meta text reads as before).
_FLAT_ORDER = ("split", "image_encoder", "text_encoder", "image_weights", "image_weights_hash", "text_weights",
               "text_weights_hash", "random_init", "image_preprocess", "text_preprocess", "views", "image_dim",
               "text_dim", "label_ids", "label_names", "data_fingerprint", "num_records", "image_cut", "text_cut",
               "source_run", "precision", "mlc_version", "created", "extra", "format")


@dataclass(frozen=True)
class CacheMeta:
    """Everything needed to tell what a cache holds and whether it may be reused: the identities of its two
    encoders (``image``, ``text``: :class:`~pipeline.identity.EncoderId`), its rows, labels and data. Stored flat
    (``image_encoder``, ``text_weights_hash``, ...: ``to_dict``/``from_dict``), as every cache since mlc 0.2; the
    flat names read as attributes too (``meta.image_dim`` is ``meta.image.dim``)."""

    split: str
    image: EncoderId
    text: EncoderId
    views: int
    label_ids: tuple[int | str, ...]
    label_names: tuple[str, ...]
    data_fingerprint: str
    num_records: int
    source_run: str | None = None
    mlc_version: str = ""
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # {"recipe": how the features were made}
    format: int = CACHE_FORMAT

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError("a cache holds at least one image view")
        object.__setattr__(self, "label_ids", tuple(self.label_ids))  # ints (COMP5329) or text
        object.__setattr__(self, "label_names", tuple(self.label_names))

    def __getattr__(self, name: str) -> Any:
        """The flat names of mlc 0.2 (``image_encoder``, ``text_dim``, ``precision``, ``random_init``, ...), read from
        the one identity they belong to (not a whole ``to_dict`` per read: they are read in loops)."""
        if name in ("random_init", "precision"):
            return self._shared()[name]
        kind = name.split("_", 1)[0]
        if name in _FLAT_ORDER and kind in ("image", "text"):
            flat = self.encoder(kind).flat(kind)
            if name in flat:
                return copy.deepcopy(flat[name])
        raise AttributeError(f"CacheMeta has no attribute {name!r}")

    @property
    def labels(self) -> LabelSpace:
        return LabelSpace(self.label_ids, self.label_names)

    def encoder(self, kind: str) -> EncoderId:
        """``image`` or ``text``'s identity."""
        return self.image if kind == "image" else self.text

    def _shared(self) -> dict[str, Any]:
        """The flat fields the two identities share: one ``random_init`` (either encoder's) and one ``precision``."""
        return {"random_init": self.image.random_init or self.text.random_init, "precision": self.image.precision}

    def to_dict(self) -> dict[str, Any]:
        """Flat, as caches store it (with ``_shared``'s two fields)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("image", "text")}
        d.update(self.image.flat("image") | self.text.flat("text"), **self._shared())
        d["label_ids"], d["label_names"] = list(self.label_ids), list(self.label_names)
        return copy.deepcopy({k: d[k] for k in _FLAT_ORDER})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheMeta:
        """From the flat fields (unknown ones ignored; a cache before precision was recorded holds fp32)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"image", "text"}
        d = {"random_init": False, "precision": "fp32", **d}
        return cls(image=EncoderId.from_flat(d, "image"), text=EncoderId.from_flat(d, "text"),
                   **{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> CacheMeta:
        """A changed copy, given flat names (``text_weights_hash="..."``) or fields (``image=EncoderId(...)``)."""
        if {"image", "text"} & set(changes):
            return dataclasses.replace(self, **changes)
        return CacheMeta.from_dict({**self.to_dict(), **changes})

    def identity(self) -> dict[str, Any]:
        """The fields that decide whether two caches hold the same features (JSON-normalised)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _NOT_IDENTITY}
        return json.loads(json.dumps(d, sort_keys=True))

    def differences(self, other: CacheMeta, names: tuple[str, str] = ("this cache", "that one")) -> list[str]:
        """How ``other`` holds other features (``identity.differences``' one format)."""
        return differences(self.identity(), other.identity(), names)


def _digest(text: Any) -> str:
    """sha256 hex of the meta attribute's JSON text (h5py gives str; bytes from other writers)."""
    data = text if isinstance(text, bytes) else str(text).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def check_compatible(meta: CacheMeta, expected: dict[str, Any], *, what: str) -> None:
    """Refuse a cache whose fields differ from what a run expects (encoders, weights, labels, cuts)."""
    have = meta.to_dict()
    diffs = differences(expected, have, ("the run", "the cache"), keys=tuple(expected))
    if diffs:
        raise MismatchError(f"{what} does not match: " + "; ".join(diffs))
