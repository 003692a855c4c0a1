"""The encoder registry (after timm's ``create_model``): names -> specs -> built encoders.

A spec says what a name builds: its kind, output dim, preprocessing, trunk cuts, default weights
(in words) and the ``build`` function. ``image.py`` and ``text.py`` register the built-in entries
when imported; families of open names (``timm:<model>``) register a prefix whose factory makes a
spec for any name under it. Modules named in ``$MLC_PLUGINS`` (files or importable module names,
separated by ``os.pathsep``) are imported at the first lookup and may register entries of their own:
that is how the tests add their tiny random encoders without shipping them.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import MlcError, WeightsError
from ..registries import load_plugins  # $MLC_PLUGINS: one loader for every registry (no torch there)
from .base import ENCODER_FILE, Encoder, read_encoder_json
from .weights import WEIGHTS_FILE, read_state_dict, state_dict_hash

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
    # build(spec, weights=PATH|None, random_init=bool, **options) -> Encoder in eval mode; called only through
    # build_encoder, which seeds it, hands it a checked saved-encoder folder and refuses a silent random fallback
    build: Callable[..., Encoder]
    scratch: bool = False  # no pretrained weights by design: weights=None builds seeded fresh ones (lstm)
    # a cheap check that the default weights are installed here, without building (None: only a build tells)
    present: Callable[[], bool] | None = None


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
                   random_init: bool = False, seed: int | None = None, verified: bool = False,
                   **options: Any) -> Encoder:
    """Build ``name`` in eval mode (``build_encoder`` of its spec).

    weights=None: the entry's pretrained weights (WeightsError when unavailable); weights=PATH: a local
    file or folder (an encoder saved by ``Encoder.save``, a state dict, a Hugging Face folder);
    random_init=True: random weights (``seed``, default 0, makes them reproducible). ``options`` are the entry's
    own (e.g. ``pooling`` for text encoders). ``verified``: ``build_encoder``'s.
    """
    return build_encoder(get_spec(kind, name), weights=weights, random_init=random_init, seed=seed,
                         verified=verified, **options)


def build_encoder(spec: EncoderSpec, *, weights: str | os.PathLike[str] | None = None, random_init: bool = False,
                  seed: int | None = None, verified: bool = False, **options: Any) -> Encoder:
    """The one way an encoder of any family is built (as timm's ``build_model_with_cfg``): what every family would
    otherwise do, and do differently, is done here once.

    - Random weights are seeded (``seed``, default 0) around the whole build, so two builds with one seed are
      equal (same weights hash, so a cache of them is reused), and the caller's random state is left as it was.
      Pretrained builds are not seeded: the caller's random stream runs through them as it always did.
    - Random weights only when asked (``random_init``, or an entry trained from scratch built without weights):
      an encoder that comes back random otherwise is refused, never used.
    - A folder an encoder was saved in (``Encoder.save``, ``mlc finetune``'s ``encoders/image``) is valid weights
      for every family: checked here (encoder.json, its kind, model.safetensors and the hash encoder.json records
      of it), and anything wrong with it is one message, ``saved_folder_error``. ``verified``: the folder lies in a
      run or export whose manifest's sha256 the caller has just checked, so its weights are not read and hashed a
      second time for that hash (the family reads them once, to build).
    """
    if random_init and weights is not None:
        raise MlcError(f"{spec.name}: pass either weights= or random_init=True, not both")
    fresh = random_init or (weights is None and spec.scratch)
    saved = saved_folder(spec, weights, verified)
    with seeded((0 if seed is None else seed) if fresh else None):
        try:
            encoder = spec.build(spec, weights=weights if saved is None else saved, random_init=random_init,
                                 **options)
        except WeightsError as e:
            if saved is None:
                raise
            raise saved_folder_error(spec, saved, str(e)) from None
    if encoder.random_init and not fresh:  # a family that fell back to random weights: never used silently
        raise WeightsError(f"{spec.name}: got random weights without random_init=True; mlc never falls back to "
                           "random weights")
    return encoder


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed what runs inside (random init) without touching the caller's random state; None: no seeding."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def saved_folder_error(spec: EncoderSpec, folder: Path, fault: str) -> WeightsError:
    """The one message for a folder given as a saved encoder that is not a valid one."""
    return WeightsError(f"{spec.name}: {folder} is not a valid saved {spec.kind} encoder ({ENCODER_FILE} + "
                        f"{WEIGHTS_FILE} + its own files, as `mlc finetune` and Encoder.save write them): {fault}")


def saved_folder(spec: EncoderSpec, weights: str | os.PathLike[str] | None, verified: bool = False) -> Path | None:
    """``weights`` resolved when it is a folder an encoder was saved in (it holds encoder.json), checked for what
    every family needs (the recorded hash only when not ``verified`` already); None for anything else (a file, a
    Hugging Face folder), which the family reads itself."""
    if weights is None:
        return None
    folder = Path(weights).expanduser()
    if not (folder / ENCODER_FILE).is_file():
        return None
    folder = folder.resolve()
    try:
        saved = read_encoder_json(folder)
    except MlcError as e:
        raise saved_folder_error(spec, folder, str(e)) from None
    if saved["kind"] != spec.kind:
        raise saved_folder_error(spec, folder, f"it holds a {saved['kind']} encoder ({saved['name']})")
    if not (folder / WEIGHTS_FILE).is_file():
        raise saved_folder_error(spec, folder, f"{WEIGHTS_FILE} is missing")
    recorded = saved.get("weights_hash")
    # the weights as saved (fp16 in an export): safetensors has no checksum of its own
    if isinstance(recorded, str) and not verified:
        try:
            got = state_dict_hash(read_state_dict(folder))
        except WeightsError as e:
            raise saved_folder_error(spec, folder, str(e)) from None
        if got != recorded:
            raise saved_folder_error(spec, folder, f"its {WEIGHTS_FILE} hashes to {got[:12]}, not the {recorded[:12]} "
                                     f"{ENCODER_FILE} records (an altered or damaged file)")
    return folder
