"""Stage 1, ``mlc extract``: encode every image and caption once and cache the embeddings.

Resumable: rerun the same command after an interruption and it continues; rerun it after it
finished and it does nothing. The work itself is :mod:`pipeline.features`'.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .config import Config, group, opt, require
from .data import DataDir, DataOptions
from .device import distributed
from .encoders import NONE, EncoderOptions
from .features import Hints, Job, LoaderOptions, Recipe, build_cache, cache_path, encoders_and_engine, fit_to_data
from .quantize import FIRST_CALIBRATION, PrecisionOptions, feature_precision

SPLITS = ("train", "test")
HINTS = Hints(bad_image="pass --skip-bad-images to leave such images out",
              skipped=". Pass --skip-bad-images to reuse it, or --overwrite to encode every image anew.",
              different="Pass --overwrite to replace it, or --cache-dir to write elsewhere.")


@dataclass(frozen=True, kw_only=True)
class ExtractConfig(Config):
    """What ``mlc extract`` does."""

    data_dir: Path = opt(None, "Data folder: train.csv, test.csv and the images (in data/, images/ or beside).",
                         argument=True, required=True)
    splits: tuple[str, ...] = opt(SPLITS, "Which splits to encode (repeatable).", flag="--split")
    from_run: Path | None = opt(None, "Take both encoders from a finetuned run folder (frozen-then-finetuned).")
    views: int = opt(1, "Image views per image: 1 = evaluation transform; 2 adds a horizontal flip; more add "
                     "seeded augmentations (for head training and TTA).")
    image_cut: str | None = opt(None, "Where the image encoder's frozen trunk ends (e.g. block11, layer3): the cache "
                                "also holds the trunk's activations there, for `mlc finetune --from-cache`.")
    text_cut: str | None = opt(None, "Where the text encoder's frozen trunk ends (e.g. layer4): the cache also holds "
                               "its token states there.")
    cache_dir: Path = opt(Path("cache"), "Where caches are written (CACHE_DIR/DATA_NAME/SPLIT__IMAGE__TEXT.h5).",
                          aliases=("--out-dir",))
    chunk_rows: int = opt(512, "Rows per committed chunk: an interrupted run loses at most this many rows of work "
                          "(captions are length-sorted within a chunk, so bigger chunks pad less).")
    skip_bad_images: bool = opt(False, "Leave out missing or corrupt images (reported by id) instead of stopping "
                                "at the first.")
    overwrite: bool = opt(False, "Rebuild a cache that holds other features (other weights or changed data) or is "
                          "no readable cache, instead of stopping.")
    data: DataOptions = group(DataOptions)
    loader: LoaderOptions = group(LoaderOptions)
    numerics: PrecisionOptions = group(PrecisionOptions)
    encoders: EncoderOptions = group(EncoderOptions)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [s for s in self.splits if s not in SPLITS]
        require([(self.data_dir is not None, "give the data folder"),
                 (bool(self.splits) and not bad, f"--split must be among {SPLITS}, got {list(self.splits)}"),
                 (self.chunk_rows >= 1, "--chunk-rows must be at least 1")])
        self.recipe()  # validates the combination

    def recipe(self) -> Recipe:
        e = self.encoders
        return Recipe(image_encoder=e.image_encoder, text_encoder=e.text_encoder, image_weights=e.image_weights,
                      text_weights=e.text_weights, random_init=e.random_init,
                      from_run=None if self.from_run is None else str(self.from_run.resolve()), views=self.views,
                      image_cut=self.image_cut, text_cut=self.text_cut, text_pooling=e.text_pooling,
                      image_pooling=e.image_pooling)


def extract(cfg: ExtractConfig) -> list[Path]:
    """Run stage 1 for every requested split; returns the cache paths (existing ones reused)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data = DataDir.open(cfg.data_dir, cfg.data)
    recipe = fit_to_data(cfg.recipe(), data)
    for split in cfg.splits:
        data.records(split)  # a faulty CSV stops here, not after minutes of loading and exporting encoders
    with distributed(cfg.loader.device) as device:
        # a caption-only cache's int8 has no image graph to calibrate: plain "int8" whatever the calibration
        calib = cfg.numerics.calibration() if recipe.image_encoder != NONE else FIRST_CALIBRATION
        recipe = dataclasses.replace(recipe, precision=feature_precision(cfg.numerics.precision, device, calib))
        image, text, eng = encoders_and_engine(recipe, cfg.loader, device, data=data)
        return [build_cache(Job(recipe, data, split, cache_path(cfg.cache_dir, cfg.data_dir, split, recipe),
                                cfg.loader, cfg.chunk_rows, cfg.skip_bad_images, cfg.overwrite, HINTS),
                            image, text, eng, device)
                for split in cfg.splits]
