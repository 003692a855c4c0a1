"""Shared fixtures: a tiny generated competition folder whose labels are visible in the pixels
and the captions, so even tiny random encoders + a head learn something from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "comp5329"

# Keep runs reproducible and quiet; never reach for a model hub from the tests.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLC_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# label id -> (colour of the image, word in the caption)
SIGNALS = {1: ((220, 40, 40), "person"), 3: ((40, 200, 40), "car"), 18: ((40, 40, 220), "dog")}


def make_data_dir(root: Path, n_train: int = 24, n_test: int = 6, seed: int = 0) -> Path:
    """train.csv / test.csv / data/*.jpg in the competition's dirty format (one unescaped quote)."""
    rng = np.random.default_rng(seed)
    (root / "data").mkdir(parents=True, exist_ok=True)
    ids = list(SIGNALS)

    def picture(labels: list[int], path: Path) -> None:
        arr = rng.integers(0, 60, size=(48, 64, 3)).astype(np.uint8)
        for k, lid in enumerate(labels):
            arr[:, k * 20:(k + 1) * 20] = SIGNALS[lid][0]
        Image.fromarray(arr).save(path, quality=90)

    train = ["ImageID,Labels,Caption"]
    for i in range(n_train):
        labels = sorted({ids[i % 3], *([ids[(i + 1) % 3]] if i % 4 == 0 else [])})
        picture(labels, root / "data" / f"{i}.jpg")
        words = " and a ".join(SIGNALS[lid][1] for lid in labels)
        cap = f'A photo of a {words} "here".' if i == 5 else f"A photo of a {words} in the street."
        train.append(f'{i}.jpg,{" ".join(map(str, labels[::-1]))},"{cap}"')
    test = ["ImageID,Caption"]
    for j in range(n_test):
        image_id = "36889.jpg" if j == n_test - 1 else f"{1000 + j}.jpg"
        lid = ids[j % 3]
        picture([lid], root / "data" / image_id)
        cap = f'A "{SIGNALS[lid][1]}" sign, unescaped.' if image_id == "36889.jpg" else f"A {SIGNALS[lid][1]}."
        test.append(f'{image_id},"{cap}"')
    (root / "train.csv").write_text("\n".join(train) + "\n")
    (root / "test.csv").write_text("\n".join(test) + "\n")
    return root


def refresh_manifest(run: Path) -> None:
    """Make a run's manifest.json agree with its files again: the run as a buggy or foreign writer would
    have left it, so the checks behind the manifest (schemas, contracts) are what a test exercises."""
    from pipeline.folders import sha256_file
    from pipeline.schemas import checksum

    m = json.loads((run / "manifest.json").read_text())
    for name in m["files"]:
        m["files"][name] = {"bytes": (run / name).stat().st_size, "sha256": sha256_file(run / name)}
    m["sha256"] = checksum(m)
    (run / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return make_data_dir(tmp_path / "tiny")


@pytest.fixture
def fitted(tmp_path: Path) -> dict[str, Path]:
    """A tiny data folder, its train cache and a 3-fold run fitted on it."""
    from pipeline.extract import ExtractConfig, extract
    from pipeline.fit_head import FitHeadConfig, fit_head

    data = make_data_dir(tmp_path / "tiny", n_train=30, n_test=4)
    (cache,) = extract(ExtractConfig(data_dir=data, out_dir=tmp_path / "cache", splits=("train",),
                                     image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True,
                                     workers=0, backend="torch"))
    run = tmp_path / "run"
    fit_head(FitHeadConfig(caches=cache, out=run, epochs=3, folds=3), quiet=True)
    return {"data": data, "cache": cache, "run": run, "tmp": tmp_path}
