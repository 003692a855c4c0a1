"""What the bench scripts' ``--smoke`` modes share: tiny generated data and tiny random encoders.

A smoke run checks that a script still runs end to end (the slow suite runs every one, tests/test_bench.py);
its figures mean nothing. The data's train ids straddle 10000 (``FIRST_ID``), so the scripts' protocol (train
on ids below 10000, score the rest) holds on it unchanged.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

IMAGE, TEXT = "tiny-resnet", "tiny-bert"
FIRST_ID = 9984  # 24 rows: ids 9984-9999 train, 10000-10007 are scored


def tiny_env() -> None:
    """Register the tiny encoders (here and in every process the script spawns); never reach for a hub."""
    plugin = str(REPO / "tests" / "tiny_encoders.py")
    if plugin not in os.environ.get("MLC_PLUGINS", "").split(os.pathsep):
        os.environ["MLC_PLUGINS"] = os.pathsep.join(filter(None, (os.environ.get("MLC_PLUGINS"), plugin)))
    os.environ.setdefault("MLC_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # encoders look $MLC_PLUGINS up when first named
    # the tiny encoders' graphs stay out of the user's graph cache (one folder, reused by every smoke run)
    os.environ.setdefault("MLC_ONNX_DIR", str(Path(tempfile.gettempdir()) / "mlc-smoke-onnx"))


def tiny_data(root: Path, n_train: int = 24, n_test: int = 4) -> Path:
    """The tests' generated competition folder (labels visible in pixels and captions), train ids from FIRST_ID."""
    from conftest import make_data_dir

    data = make_data_dir(root, n_train=n_train, n_test=n_test)
    lines = (data / "train.csv").read_text().splitlines()
    out = [lines[0]]
    for i, line in enumerate(lines[1:]):
        (data / "data" / f"{i}.jpg").rename(data / "data" / f"{FIRST_ID + i}.jpg")
        out.append(f"{FIRST_ID + i}.jpg" + line[len(f"{i}.jpg"):])
    (data / "train.csv").write_text("\n".join(out) + "\n")
    return data


def tiny_cache(data: Path, cache_dir: Path, split: str = "train", **opts: object) -> Path:
    """The tiny encoders' cache of one split (ONNX Runtime, no decode workers)."""
    from pipeline.extract import ExtractConfig, extract

    (cache,) = extract(ExtractConfig.build(data_dir=data, cache_dir=cache_dir, splits=(split,), image_encoder=IMAGE,
                                           text_encoder=TEXT, random_init=True, workers=0, **opts))
    return cache


def tiny_run(root: Path, folds: int = 0) -> tuple[Path, Path]:
    """(data folder, run folder): a head fitted over the tiny caches, with its submission written."""
    from pipeline.fit_head import FitHeadConfig, fit_head
    from pipeline.submit import SubmitConfig, submit

    data = tiny_data(root / "data")
    cache = tiny_cache(data, root / "cache")
    run = root / "run"
    fit_head(FitHeadConfig.build(caches=cache, out=run, epochs=3, folds=folds), quiet=True)
    submit(SubmitConfig.build(run=run, data_dir=data, cache_dir=root / "cache"))
    return data, run


def named(cache: Path, folder: Path, name: str) -> Path:
    """A copy of ``cache`` under the name a script looks for."""
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(cache, folder / name))
