"""What features *are*: one encoder's identity (:class:`EncoderId`), what a head reads (:class:`FeatureEntry`), and
the one way two identities are compared (:func:`differences`). No torch, no h5py.

Every cache (``CacheMeta.image`` / ``.text``), run (features.json's contracts), fused cache (``fused.plan_parts``)
and export stores and compares these. On disk they stay the flat fields mlc 0.2 wrote (``image_encoder``,
``text_weights_hash``, ...), so every existing cache and run reads as before: ``flat``/``from_flat`` are the
one translation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import MismatchError

NONE = "none"  # the name of a modality without an encoder (encoders.NONE)

# An encoder's fields under their flat names ("image_" or "text_" in front) in caches and runs.
_FLAT = {"name": "encoder", "weights": "weights", "weights_hash": "weights_hash", "preprocess": "preprocess",
         "dim": "dim", "cut": "cut"}
# Which fields decide whether features are the same, for each comparison (the rest is recorded, not compared).
CONTRACT = ("name", "weights_hash", "preprocess", "dim")  # what a head was trained on (features.json)
FUSE = ("name", "weights_hash", "preprocess", "cut")  # one encoder feeds a fused head once


def _json(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples -> lists, int keys -> str), so identities compare alike."""
    return json.loads(json.dumps(value, sort_keys=True))


@dataclass(frozen=True)
class EncoderId:
    """One encoder's features: who made them (name, weights and their hash, random init), how a photo or caption
    became its input (preprocess), their width (dim), where the encoder was cut (cut: trunk features), and what
    precision it computed in. ``name == "none"``: the modality has no encoder."""

    name: str = NONE
    weights: str = ""  # where the weights came from (recorded, never compared: the hash is)
    weights_hash: str = ""
    random_init: bool = False
    preprocess: dict[str, Any] = field(default_factory=dict)
    dim: int = 0
    cut: str | None = None
    precision: str = "fp32"  # fp32, bf16, fp16, int8 or int8-<calibration> (older caches and runs: fp32)

    @classmethod
    def of(cls, encoder: Any, cut: str | None = None, precision: str = "fp32") -> EncoderId:
        """The identity of a built encoder (``encoders.Encoder``), or of none (None)."""
        if encoder is None:
            return cls(precision=precision)
        return cls(encoder.name, encoder.weights_source, encoder.weights_hash, encoder.random_init,
                   encoder.preprocess.to_dict(), encoder.dim, cut, precision)

    def flat(self, kind: str) -> dict[str, Any]:
        """The fields as caches and runs store them: ``{kind}_encoder``, ``{kind}_weights_hash``, ..."""
        return {f"{kind}_{flat}": getattr(self, attr) for attr, flat in _FLAT.items()}

    @classmethod
    def from_flat(cls, d: Mapping[str, Any], kind: str) -> EncoderId:
        """Read back from ``flat`` (and the shared ``random_init`` and ``precision``); fields a writer left out
        (a run's contract records no weights source nor cut) take their defaults."""
        got = {attr: d[f"{kind}_{flat}"] for attr, flat in _FLAT.items() if f"{kind}_{flat}" in d}
        got.update({k: d[k] for k in ("random_init", "precision") if k in d})
        return cls(**got)

    def key(self, compared: tuple[str, ...]) -> dict[str, Any]:
        """The ``compared`` fields, JSON-normalised."""
        return _json({k: getattr(self, k) for k in compared})


def differences(mine: Mapping[str, Any], theirs: Mapping[str, Any], names: tuple[str, str] = ("this", "that"),
                keys: tuple[str, ...] | None = None) -> list[str]:
    """How two identities differ, one line per field, in mlc's one format: ``field: <mine> has X, <theirs> has
    Y``. ``keys``: the fields compared (default: every field either has). Values are compared as JSON reads them."""
    a, b = _json(dict(mine)), _json(dict(theirs))
    keys = tuple(sorted(set(a) | set(b))) if keys is None else keys
    return [f"{k}: {names[0]} has {a.get(k)!r}, {names[1]} has {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


@dataclass(frozen=True)
class FeatureEntry:
    """What a head reads from one cache (one entry of a run's features.json): the contract its features must
    meet (flat ``image_*``/``text_*`` fields, labels, precision), the recipe that makes them again (for the test
    split), which of the cache's two features feed the head (``image``, ``text``: a fused run reads an encoder
    two caches share once) and the fingerprint of the data they were made from."""

    contract: dict[str, Any]
    recipe: dict[str, Any] = field(default_factory=dict)
    image: bool = True
    text: bool = True
    data_fingerprint: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureEntry:
        """An entry as features.json holds it; ``image``/``text`` default to True (runs before fusion)."""
        return cls(dict(d["contract"]), dict(d.get("recipe") or {}), bool(d.get("image", True)),
                   bool(d.get("text", True)), d.get("data_fingerprint"))

    def to_dict(self) -> dict[str, Any]:
        return {"contract": self.contract, "recipe": self.recipe, "image": self.image, "text": self.text,
                "data_fingerprint": self.data_fingerprint}

    def encoder(self, kind: str) -> EncoderId:
        """The image or text encoder whose features the head reads."""
        return EncoderId.from_flat(self.contract, kind)


@dataclass(frozen=True)
class Contract:
    """What features a head was trained on: a cache (or encoders) must match every field to feed it. The two
    encoders' identities reduced to what decides the features (``identity.CONTRACT``: name, weights hash,
    preprocessing, dim; and precision), and the label ids. Stored flat in features.json, as since mlc 0.2; the
    flat names read as attributes too (``contract.image_dim``)."""

    image: EncoderId
    text: EncoderId
    label_ids: tuple[int | str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_ids", tuple(self.label_ids))  # JSON gives a list
        for kind in ("image", "text"):  # only the compared fields, so equal contracts compare equal
            e = getattr(self, kind)
            object.__setattr__(self, kind, EncoderId(**e.key(CONTRACT), precision=e.precision))

    def __getattr__(self, name: str) -> Any:
        """The flat names (``image_encoder``, ``text_dim``, ``precision``, ...)."""
        flat = self.to_dict() if name.startswith(("image_", "text_", "precision")) else {}
        if name not in flat:
            raise AttributeError(f"Contract has no attribute {name!r}")
        return flat[name]

    @classmethod
    def of_cache(cls, meta: Any) -> Contract:
        """A cache's (``CacheMeta``)."""
        return cls(meta.image, meta.text, meta.label_ids)

    @classmethod
    def of_encoders(cls, image: Any, text: Any, labels: Any) -> Contract:
        """Built encoders' and a ``LabelSpace``'s."""
        return cls(EncoderId.of(image), EncoderId.of(text), labels.ids)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Contract:
        # a run written before precision was recorded holds fp32 features (the default)
        return cls(EncoderId.from_flat(d, "image"), EncoderId.from_flat(d, "text"), d["label_ids"])

    def to_dict(self) -> dict[str, Any]:
        i, t = self.image.flat("image"), self.text.flat("text")
        d = {k: (i | t)[k] for k in _CONTRACT_ORDER[:-2]}
        return json.loads(json.dumps({**d, "label_ids": list(self.label_ids), "precision": self.image.precision}))

    def check(self, found: Any, what: str) -> None:
        """Refuse features (a Contract or a CacheMeta) from other encoders, weights, preprocessing or labels."""
        theirs = found if isinstance(found, Contract) else Contract.of_cache(found)
        diffs = differences(self.to_dict(), theirs.to_dict(), ("the run", "it"))
        if diffs:
            raise MismatchError(f"{what} does not match the run: " + "; ".join(diffs))


# features.json's contract fields, in the order mlc 0.2 wrote them
_CONTRACT_ORDER = ("image_encoder", "text_encoder", "image_weights_hash", "text_weights_hash", "image_preprocess",
                   "text_preprocess", "image_dim", "text_dim", "label_ids", "precision")
