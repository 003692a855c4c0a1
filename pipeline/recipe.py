"""What a feature cache is: its ``Recipe`` (how its features are made: encoders, weights, cuts, views,
the data's layout; stored in the cache and in every run that reads it) and its file name.

``cache_path`` names a cache after the data folder, split and recipe; ``fit_to_data`` adapts a recipe
to a dataset without images or captions. Nothing here runs an encoder (that is ``encode``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import DataDir, DataOptions
from .encoders import NONE, ImageEncoder, TextEncoder, create_image_encoder, create_text_encoder, load_encoder
from .errors import MismatchError, MlcError
from .log import get
from .runs import RunDir

logger = get(__name__)


@dataclass(frozen=True)
class Recipe:
    """How a cache's features are made. Stored in the cache and in every run that reads it, so the
    test split can be encoded exactly like the training split."""

    image_encoder: str
    text_encoder: str
    image_weights: str | None = None
    text_weights: str | None = None
    random_init: bool = False
    from_run: str | None = None  # take both encoders from a finetuned run folder
    views: int = 1
    image_cut: str | None = None
    text_cut: str | None = None
    text_pooling: str | None = None
    image_pooling: str = "avg"  # "tokens": the image encoder's last map positions (for --head attention)
    data: dict[str, Any] | None = None  # the data folder's layout (DataOptions), so test.csv reads alike
    precision: str = "fp32"  # resolved: fp32, bf16, fp16 (CUDA), int8 or int8-<calibration> (quantize.precision_label)
    crossfit: str | None = None  # made by `mlc crossfit` (K fold models, not kept): its id

    def __post_init__(self) -> None:
        if self.views < 1:
            raise MlcError("--views must be at least 1")
        if self.from_run is not None and self.image_pooling != "avg":
            raise MlcError("--from-run takes the encoders as the run saved them; --image-pooling does not apply")
        if self.from_run is not None and (self.image_weights or self.text_weights or self.random_init):
            raise MlcError("--from-run takes the encoders from the run; do not combine it with "
                           "--image-weights, --text-weights or --random-init")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown or not {"image_encoder", "text_encoder"} <= set(d):
            raise MlcError(f"{where}: not a feature recipe (unknown keys {unknown}, or no encoder names)")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["image_pooling"] == "avg":  # recorded only when set: pooled caches and runs keep their records
            del d["image_pooling"]
        return d

    def tag(self) -> str | None:
        """What tells caches of the same encoder pair apart: finetuned weights, cuts, views."""
        parts = []
        if self.from_run is not None:
            parts.append(f"run-{Path(self.from_run).resolve().name}")
        elif self.random_init:
            parts.append("random")
        elif self.image_weights or self.text_weights:
            parts.append("custom")
        if self.crossfit:
            parts.append(f"crossfit-{self.crossfit}")
        if self.image_cut:
            parts.append(f"img-{self.image_cut}")
        if self.text_cut:
            parts.append(f"txt-{self.text_cut}")
        if self.views > 1:
            parts.append(f"v{self.views}")
        if self.text_pooling:
            parts.append(f"pool-{self.text_pooling}")
        if self.image_pooling != "avg":
            parts.append(f"img-{self.image_pooling}")
        if self.precision != "fp32":
            parts.append(self.precision)
        return "_".join(parts) or None

    def data_options(self) -> DataOptions:
        return DataOptions(**(self.data or {}))

    def encoders(self, verified: Path | None = None) -> tuple[ImageEncoder | None, TextEncoder | None]:
        """Pretrained (or explicit local) weights, a finetuned run's encoders, or seeded random init; None
        for a modality the recipe has no encoder for ('none'). ``verified``: a run folder the caller has
        just verified (RunDir.load), not hashed again when it is the one the encoders come from."""
        if self.crossfit is not None:
            raise MlcError(f"features cross-fitted by `mlc crossfit` ({self.crossfit}) come from {self.text_encoder} "
                           "fold models that are not kept: only the train and test caches crossfit wrote hold "
                           "them; predict and export need a run over encoders that exist")
        if self.from_run is not None:
            run = RunDir(Path(self.from_run))
            if verified is None or Path(verified).resolve() != run.path.resolve():
                run.verify()
            if not run.has_encoders():
                raise MlcError(f"{run.path}: not a finetuned run folder (needs encoders/image and encoders/text, "
                               "written by `mlc finetune`)")
            # verified just above (or by the caller): every file's sha256, the encoders' among them
            image = load_encoder(run.encoder_dir("image"), verified=True)
            text = load_encoder(run.encoder_dir("text"), verified=True)
            if (image.name, text.name) != (self.image_encoder, self.text_encoder):
                raise MismatchError(f"{run.path} holds {image.name} + {text.name}, not "
                                    f"{self.image_encoder} + {self.text_encoder}")
        else:
            # Random init is seeded (seed 0, by the one encoder builder), so a rerun builds the same weights (same
            # hash): resumable and reusable.
            image = None if self.image_encoder == NONE else create_image_encoder(
                self.image_encoder, weights=self.image_weights, random_init=self.random_init,
                pooling=self.image_pooling)
            text = None if self.text_encoder == NONE else create_text_encoder(
                self.text_encoder, weights=self.text_weights, random_init=self.random_init,
                pooling=self.text_pooling)
        for enc, cut in ((image, self.image_cut), (text, self.text_cut)):
            if cut is not None and (enc is None or cut not in enc.cuts):
                raise MlcError(f"--{'image' if enc is image else 'text'}-cut {cut}: no encoder to cut") if enc is None \
                    else enc.no_cut(cut)
        return image, text


def safe_name(name: str) -> str:
    """An encoder name as a file name part: ``timm:convnext_tiny`` -> ``timm-convnext_tiny-<hash>`` (the hash of
    the full name keeps names that differ only in dropped characters apart)."""
    safe = re.sub(r"[^A-Za-z0-9._=-]+", "-", name).strip("-")[-60:]
    return safe if safe == name else f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def fit_to_data(recipe: Recipe, data: DataDir) -> Recipe:
    """The recipe with the data folder's layout, and without an encoder for a modality the data lacks (said)."""
    changes: dict[str, Any] = {"data": data.options.recorded()}
    if not data.options.images and recipe.image_encoder != NONE:
        changes["image_encoder"] = NONE
        logger.info("note: --no-images: a text-only dataset; no image features")
    if not data.has_captions("train" if data.has("train") else "test") and recipe.text_encoder != NONE:
        changes["text_encoder"] = NONE
        logger.info(f"note: no {data.options.caption_col!r} column: an image-only dataset; no caption features")
    return dataclasses.replace(recipe, **changes)


def cache_path(out_dir: Path, data_dir: Path, split: str, recipe: Recipe) -> Path:
    """``<out_dir>/<data folder name>/<split>__<image>__<text>[__<tag>].h5``."""
    tag = recipe.tag()
    name = f"{split}__{safe_name(recipe.image_encoder)}__{safe_name(recipe.text_encoder)}" + (f"__{tag}" if tag else "")
    return Path(out_dir) / Path(data_dir).resolve().name / f"{name}.h5"
