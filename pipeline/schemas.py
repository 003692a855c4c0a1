"""Checks of the JSON files mlc reads back: types, lengths, ranges. A fault names the file and the field.

Pure functions over already-parsed JSON; ``runs.RunDir`` calls them before anything is used, so an
edited or damaged file stops the command with ``PATH: field: what is wrong`` instead of a traceback or,
worse, a silently wrong submission.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

from .errors import MlcError

RUN_KINDS = ("head", "finetune")
CONTRACT_FIELDS = {"image_encoder": str, "text_encoder": str, "image_weights_hash": str, "text_weights_hash": str,
                   "image_preprocess": dict, "text_preprocess": dict, "image_dim": int, "text_dim": int,
                   "label_ids": list}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Sane sizes of a head: far above any real one (COMP5329: 18 classes, 1664-d features, hidden 512), far
# below what would exhaust memory before its weights file is even read.
MAX_CLASSES = 10_000
MAX_DIM = 1 << 16
CHECKSUM = "sha256"  # the field of manifest.json / export.json that holds the hash of the rest of the file


def checksum(d: dict) -> str:
    """sha256 hex of a JSON object without its own ``sha256`` field (keys sorted): a file's self-check."""
    rest = {k: v for k, v in d.items() if k != CHECKSUM}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode("utf-8")).hexdigest()


def _checked(d: dict, path: Path, fix: str) -> None:
    """The file's ``sha256`` field matches its content: it was neither edited nor damaged since written."""
    if CHECKSUM not in d:
        _fail(path, CHECKSUM, f"missing (written by an older mlc, or edited); {fix}")
    if d[CHECKSUM] != checksum(d):
        _fail(path, CHECKSUM, f"does not match the file's content (edited or damaged since written); {fix}")


def relative(name: Any, path: Path, field: str) -> str:
    """A path inside the folder a file describes: relative, forward slashes, no '..' (never outside it)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        _fail(path, field, f"expected a path inside the folder, found {name!r:.80}")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts or re.match(r"^[A-Za-z]:", name) or name.startswith("~"):
        _fail(path, field, f"{name!r:.80} leads out of the folder; only paths inside it are read")
    return name


def _fail(path: Path, field: str, msg: str) -> NoReturn:
    raise MlcError(f"{path}: {field}: {msg}")


def _dict(obj: Any, path: Path, field: str) -> dict:
    if not isinstance(obj, dict):
        _fail(path, field, f"expected an object, found {type(obj).__name__}")
    return obj


def _list(obj: Any, path: Path, field: str, min_len: int = 0) -> list:
    if not isinstance(obj, list):
        _fail(path, field, f"expected a list, found {type(obj).__name__}")
    if len(obj) < min_len:
        _fail(path, field, f"expected at least {min_len} entries, found {len(obj)}")
    return obj


def _int(obj: Any, path: Path, field: str, low: int = 0) -> int:
    if isinstance(obj, bool) or not isinstance(obj, int) or obj < low:
        _fail(path, field, f"expected an integer >= {low}, found {obj!r}")
    return obj


def _unit(obj: Any, path: Path, field: str) -> float:
    """A finite number in [0, 1] (a probability threshold)."""
    if isinstance(obj, bool) or not isinstance(obj, int | float) or not math.isfinite(obj) or not 0 <= obj <= 1:
        _fail(path, field, f"expected a finite number in [0, 1], found {obj!r}")
    return float(obj)


def _key(d: dict, key: str, path: Path) -> Any:
    if key not in d:
        _fail(path, key, "missing")
    return d[key]


def label_ids(obj: Any, path: Path, field: str = "label_ids") -> list:
    ids = _list(obj, path, field, 1)
    for i, v in enumerate(ids):
        if isinstance(v, bool) or not isinstance(v, int | str):
            _fail(path, f"{field}[{i}]", f"expected a label id (integer or text), found {v!r}")
    if len({str(v) for v in ids}) != len(ids):
        _fail(path, field, "label ids repeat")
    return ids


def thresholds(d: Any, path: Path) -> dict:
    d = _dict(d, path, "(file)")
    ids = label_ids(_key(d, "label_ids", path), path)
    names = _list(_key(d, "label_names", path), path, "label_names")
    if len(names) != len(ids) or not all(isinstance(n, str) for n in names):
        _fail(path, "label_names", f"expected {len(ids)} names (one per label id), found {names!r:.80}")
    if not _known_rule(_key(d, "mode", path)):
        _fail(path, "mode", f"expected one of {_rules()}, found {d['mode']!r}")
    _unit(_key(d, "global", path), path, "global")
    per_class = _list(_key(d, "per_class", path), path, "per_class")
    if len(per_class) != len(ids):
        _fail(path, "per_class", f"expected {len(ids)} thresholds (one per label), found {len(per_class)}")
    for i, t in enumerate(per_class):
        _unit(t, path, f"per_class[{i}] (label {ids[i]})")
    if "decision" in d:  # runs before decision rules (issue 26) have none: their thresholds are the rule
        decision(d["decision"], path, "decision", len(ids))
    return d


def _known_rule(name: Any) -> bool:
    """Whether this mlc applies the decision rule ``name`` (decision.RULES: the package's and those registered)."""
    from .decision import RULES  # here: decision imports numpy and the rule modules, and no schema is read at import

    return isinstance(name, str) and name in RULES


def _rules() -> tuple[str, ...]:
    """The decision rules this mlc applies, for a message (every plugin loaded)."""
    from .decision import RULES

    return tuple(RULES.choices())


def decision(d: Any, path: Path, field: str, classes: int) -> dict:
    """A saved decision rule (decision.Decision.to_dict()): a known rule, one threshold per label, a calibration,
    the rule's own tuned numbers (``params``)."""
    d = _dict(d, path, field)
    if not _known_rule(d.get("rule")):
        _fail(path, f"{field}.rule", f"expected one of {_rules()}, found {d.get('rule')!r}")
    th = _list(_key(d, "thresholds", path), path, f"{field}.thresholds")
    if len(th) != classes:
        _fail(path, f"{field}.thresholds", f"expected {classes} thresholds (one per label), found {len(th)}")
    for i, t in enumerate(th):
        _unit(t, path, f"{field}.thresholds[{i}]")
    cal = d.get("calibration")
    if cal is not None and not (isinstance(cal, list) and len(cal) == 2
                                and all(isinstance(x, int | float) and math.isfinite(x) for x in cal)):
        _fail(path, f"{field}.calibration", f"expected two finite numbers [a, b], found {cal!r:.80}")
    params = d.get("params", {})
    if not (isinstance(params, dict) and all(isinstance(k, str) and isinstance(v, int | float)
                                             and not isinstance(v, bool) and math.isfinite(v)
                                             for k, v in params.items())):
        _fail(path, f"{field}.params", f"expected an object of finite numbers, found {params!r:.80}")
    return d


def head(d: Any, path: Path, heads: tuple[str, ...]) -> dict:
    d = _dict(d, path, "(file)")
    if _key(d, "name", path) not in heads:
        _fail(path, "name", f"expected one of {heads}, found {d['name']!r}")
    for key in ("num_classes", "hidden"):
        _int(_key(d, key, path), path, key, 1)
    for key in ("image_dim", "text_dim"):  # 0: a dataset without that modality (a single-modality head)
        _int(_key(d, key, path), path, key, 0)
    for key, top in (("num_classes", MAX_CLASSES), ("hidden", MAX_DIM), ("image_dim", MAX_DIM), ("text_dim", MAX_DIM)):
        if d[key] > top:
            _fail(path, key, f"{d[key]} is beyond any real head (at most {top})")
    if d["image_dim"] + d["text_dim"] == 0:
        _fail(path, "image_dim", "a head needs image or text features (image_dim and text_dim are both 0)")
    drop = _key(d, "dropout", path)
    if isinstance(drop, bool) or not isinstance(drop, int | float) or not 0 <= drop < 1:
        _fail(path, "dropout", f"expected a number in [0, 1), found {drop!r}")
    return d


def contract(d: Any, path: Path, field: str) -> dict:
    d = _dict(d, path, field)
    for key, kind in CONTRACT_FIELDS.items():
        v = d.get(key)
        if v is None or isinstance(v, bool) or not isinstance(v, kind):
            _fail(path, f"{field}.{key}", f"expected {kind.__name__}, found {v!r:.60}")
    label_ids(d["label_ids"], path, f"{field}.label_ids")
    return d


def features(d: Any, path: Path) -> list:
    entries = _list(d, path, "(file)", 1)
    for i, e in enumerate(entries):
        e = _dict(e, path, f"[{i}]")
        contract(_key(e, "contract", path), path, f"[{i}].contract")
        _dict(_key(e, "recipe", path), path, f"[{i}].recipe")
        for kind in ("image", "text"):
            if not isinstance(e.get(kind, True), bool):
                _fail(path, f"[{i}].{kind}", f"expected true or false, found {e[kind]!r}")
    return entries


def _files(d: dict, path: Path) -> dict:
    """``files``: {relative path: {bytes, sha256}}, as ``folders.listing`` writes it."""
    files = _dict(_key(d, "files", path), path, "files")
    for name, entry in files.items():
        relative(name, path, f"files[{name!r:.80}]")
        entry = _dict(entry, path, f"files[{name!r}]")
        _int(entry.get("bytes"), path, f"files[{name!r}].bytes")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            _fail(path, f"files[{name!r}].sha256", "expected 64 hex digits")
    return files


def manifest(d: Any, path: Path) -> dict:
    d = _dict(d, path, "(file)")
    _int(_key(d, "format", path), path, "format", 1)
    if _key(d, "kind", path) not in RUN_KINDS:
        _fail(path, "kind", f"expected one of {RUN_KINDS}, found {d['kind']!r}")
    _files(d, path)
    _checked(d, path, "refit the run")
    return d


def export(d: Any, path: Path) -> dict:
    """``export.json`` (see export.py): labels, thresholds, the decision rule, the preprocessing, and either the
    ONNX graph (``graph``) or the encoder folders and heads (``branches``, ``heads``; their ``head`` constructor
    is checked by the torch side, which knows the head names)."""
    d = _dict(d, path, "(file)")
    _int(_key(d, "format", path), path, "format", 1)
    files = _files(d, path)
    ids = label_ids(_key(d, "label_ids", path), path)
    names = _list(_key(d, "label_names", path), path, "label_names")
    if len(names) != len(ids) or not all(isinstance(n, str) for n in names):
        _fail(path, "label_names", f"expected {len(ids)} names (one per label id), found {names!r:.80}")
    per_class = _list(_key(d, "thresholds", path), path, "thresholds")
    if len(per_class) != len(ids):
        _fail(path, "thresholds", f"expected {len(ids)} thresholds (one per label), found {len(per_class)}")
    for i, t in enumerate(per_class):
        _unit(t, path, f"thresholds[{i}] (label {ids[i]})")
    if isinstance(d.get("decision"), dict) and "thresholds" in d["decision"]:  # exports before issue 26: text only
        decision(d["decision"], path, "decision", len(ids))
    if _key(d, "graph", path) is not None:
        _graph(d, path, files)
    else:
        for i, name in enumerate(_list(_key(d, "heads", path), path, "heads", 1)):
            if relative(name, path, f"heads[{i}]") not in files:
                _fail(path, f"heads[{i}]", f"{name!r} is not one of the exported files")
        h = _dict(_key(d, "head", path), path, "head")  # its constructor is checked by the torch side
        if h.get("num_classes") != len(ids):
            _fail(path, "head.num_classes", f"{h.get('num_classes')!r} outputs but {len(ids)} labels (label_ids)")
        for i, b in enumerate(_list(_key(d, "branches", path), path, "branches", 1)):
            b = _dict(b, path, f"branches[{i}]")
            for kind in ("image", "text"):
                if b.get(kind) is None:
                    continue
                folder = relative(b[kind], path, f"branches[{i}].{kind}").rstrip("/")
                if f"{folder}/encoder.json" not in files:
                    _fail(path, f"branches[{i}].{kind}", f"{folder!r} is not an exported encoder folder")
    _checked(d, path, "export the run again")
    return d


def _graph(d: dict, path: Path, files: dict) -> None:
    """An ONNX export's graph file, image rule and tokenizer: what ``portable`` reads."""
    graph = _dict(d["graph"], path, "graph")
    if relative(_key(graph, "file", path), path, "graph.file") not in files:
        _fail(path, "graph.file", f"{graph['file']!r} is not one of the exported files")
    image, text = _key(d, "image", path), _key(d, "text", path)
    if image is None and text is None:
        _fail(path, "image", "an export reads images, captions or both; both are null")
    if image is not None:
        image = _dict(image, path, "image")
        resize = _dict(_key(image, "resize", path), path, "image.resize")
        crop = _dict(_key(image, "crop", path), path, "image.crop")
        size = _int(_key(resize, "shorter_side", path), path, "image.resize.shorter_side", 1)
        _int(_key(crop, "size", path), path, "image.crop.size", 1)
        if crop["size"] > size:
            _fail(path, "image.crop.size", f"larger than the resized shorter side ({crop['size']} > {size})")
        if _key(resize, "interpolation", path) not in ("nearest", "bilinear", "bicubic"):
            _fail(path, "image.resize.interpolation", f"expected nearest, bilinear or bicubic, found "
                  f"{resize['interpolation']!r}")
        if not isinstance(_key(image, "jpeg_draft", path), bool):
            _fail(path, "image.jpeg_draft", f"expected true or false, found {image['jpeg_draft']!r}")
    if text is not None:
        text = _dict(text, path, "text")
        if relative(_key(text, "tokenizer", path), path, "text.tokenizer") not in files:
            _fail(path, "text.tokenizer", f"{text['tokenizer']!r} is not one of the exported files")
        if not isinstance(_key(text, "lowercase", path), bool):
            _fail(path, "text.lowercase", f"expected true or false, found {text['lowercase']!r}")


def metrics(d: Any, path: Path) -> dict:
    """metrics.json: an object; its samples-F1 figures (the ones mlc prints) finite numbers in [0, 1]."""
    d = _dict(d, path, "(file)")
    for key, v in d.items():
        if key.startswith("samples_f1"):
            _unit(v, path, key)
    return d


def config(d: Any, path: Path) -> dict:
    return _dict(d, path, "(file)")


def history(d: Any, path: Path) -> list:
    folds = _list(d, path, "(file)")
    for i, fold in enumerate(folds):
        for j, epoch in enumerate(_list(fold, path, f"[{i}]")):
            _dict(epoch, path, f"[{i}][{j}]")
    return folds
