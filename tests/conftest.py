"""Shared fixtures: a tiny generated competition folder whose labels are visible in the pixels
and the captions, so even tiny random encoders + a head learn something from it."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
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
# The tiny random encoders (tiny-resnet, tiny-bert) are the tests' own: registered through the plugin
# hook, so CLI subprocesses the tests spawn (they inherit the environment) know them too.
TINY_ENCODERS = str(REPO / "tests" / "tiny_encoders.py")
if TINY_ENCODERS not in os.environ.get("MLC_PLUGINS", "").split(os.pathsep):
    os.environ["MLC_PLUGINS"] = os.pathsep.join(filter(None, (os.environ.get("MLC_PLUGINS"), TINY_ENCODERS)))

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


@pytest.fixture(scope="session", autouse=True)
def graph_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One ONNX graph folder for the whole session (subprocesses inherit it): each tiny encoder is exported
    once, not once per test's output folder, and the user's own graph cache is never touched."""
    old = os.environ.get("MLC_ONNX_DIR")
    path = tmp_path_factory.mktemp("onnx-graphs")
    os.environ["MLC_ONNX_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MLC_ONNX_DIR", None)
    else:
        os.environ["MLC_ONNX_DIR"] = old


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return make_data_dir(tmp_path / "tiny")


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An end-to-end finetuned tiny run (1 epoch) whose data folder is its sibling ``tiny``: built once per
    session for every test that reads such a run (tests copy it before damaging it)."""
    from pipeline.finetune import FinetuneConfig, finetune

    tmp = tmp_path_factory.mktemp("ft")
    data = make_data_dir(tmp / "tiny", n_train=24, n_test=4)
    run = tmp / "run"
    finetune(FinetuneConfig.build(data_dir=data, out=run, epochs=1, batch_size=8, workers=0, end_to_end=True, lr=1e-2,
                                  encoder_lr=1e-2, image_encoder="tiny-resnet", text_encoder="tiny-bert",
                                  random_init=True))
    return run


@pytest.fixture(scope="session")
def fitted_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny data folder, its train cache and a 3-fold run fitted on it: built once per session."""
    from pipeline.extract import ExtractConfig, extract
    from pipeline.fit_head import FitHeadConfig, fit_head

    root = tmp_path_factory.mktemp("fitted")
    data = make_data_dir(root / "tiny", n_train=30, n_test=4)
    (cache,) = extract(ExtractConfig.build(data_dir=data, cache_dir=root / "cache", splits=("train",),
                                           image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True,
                                           workers=0, backend="torch"))
    fit_head(FitHeadConfig.build(caches=cache, out=root / "run", epochs=3, folds=3), quiet=True)
    return root


@pytest.fixture
def fitted(fitted_once: Path, tmp_path: Path) -> dict[str, Path]:
    """A copy of the session's data folder, cache and 3-fold run, for one test to damage as it likes."""
    shutil.copytree(fitted_once, tmp_path, dirs_exist_ok=True)
    (cache,) = (tmp_path / "cache").rglob("train__*.h5")
    return {"data": tmp_path / "tiny", "cache": cache, "run": tmp_path / "run", "tmp": tmp_path}
