"""The data folder: where the CSVs and images are, the label space, a fingerprint (photos: :mod:`pipeline.images`).

The CSV records themselves are read by :mod:`pipeline.records`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from PIL import Image

from .config import Config, opt, require
from .errors import DataError, ImageError
from .images import load_image, open_image_file
from .labels import RARE_ROWS, LabelSpace, odd_tokens, same_numbers, typed_ids
from .log import get
from .reading import CSV_BYTES, read_bytes
from .records import IMAGE_EXTENSIONS, CsvLayout, Record, header_cells, image_id_fault, raise_problems, read_csv

# ----------------------------------------------------------------------------------- data folder

Split = Literal["train", "test"]
LABELS_FILE = "labels.csv"

logger = get(__name__)


@dataclass(frozen=True, kw_only=True)
class DataOptions(Config):
    """How a data folder's CSVs are laid out: shared by every command that reads one."""

    PANEL: ClassVar[str] = "Data"

    id_col: str = opt("ImageID", "Column of the row ids: the image file names.")
    labels_col: str = opt("Labels", "Column of a row's labels.")
    caption_col: str = opt("Caption", "Column of the captions (a dataset without it gets an image-only head).")
    label_sep: str = opt(" ", "What separates a row's labels: any whitespace by default; e.g. ';' or '|'.")
    labels: Path | None = opt(None, "A labels file (header id,name; one label a row): the labels' order and names; "
                              "any other label is then an error. Default: DATA_DIR/labels.csv when there, else "
                              "the labels train.csv holds (the COMP5329 names built in).")
    images: bool = opt(True, "Rows have images; --no-images for a text-only dataset (ids need not be files).")
    image_dir: Path | None = opt(None, "The folder of the images, anywhere (e.g. train2014/ or pics/). Default: "
                                 "DATA_DIR/data, else DATA_DIR/images, else DATA_DIR itself.")

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(bool(self.label_sep), "--label-sep must not be empty")])

    def recorded(self) -> dict[str, Any]:
        """These options as a cache's recipe or a run's features.json records them: the labels file as an
        absolute path, so a later command run from another folder reads the same file."""
        d = self.to_dict()
        if self.labels is not None:
            d["labels"] = str(Path(self.labels).resolve())
        if self.image_dir is None:  # recorded only when set: caches made before the option keep their records
            del d["image_dir"]
        else:
            d["image_dir"] = str(Path(self.image_dir).resolve())
        return d


@dataclass(frozen=True)
class DataDir:
    """A data folder: ``train.csv``, ``test.csv`` and the images.

    The images are in ``options.image_dir`` when given, else ``root/data`` (the Kaggle layout), else
    ``root/images``, else ``root`` itself.
    """

    root: Path
    image_dir: Path
    options: DataOptions = dataclasses.field(default_factory=DataOptions)

    @classmethod
    def open(cls, root: str | os.PathLike[str], options: DataOptions | None = None) -> DataDir:
        root = Path(root)
        if not root.is_dir():
            raise DataError(str(root), None, "data folder not found" if not root.exists() else "not a folder")
        options = options or DataOptions()
        image_dir = next((d for d in (root / "data", root / "images") if d.is_dir()), root)
        if options.image_dir is not None:
            image_dir = Path(options.image_dir)
            if not image_dir.is_dir():
                raise DataError(str(image_dir), None, "--image-dir: image folder not found" if not image_dir.exists()
                                else "--image-dir: not a folder")
        return cls(root, image_dir, options)

    def csv_path(self, split: Split) -> Path:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        return self.root / f"{split}.csv"

    def has(self, split: Split) -> bool:
        """Whether the split's CSV is there: anything by that name (a FIFO, a link to a device) counts, to be
        refused by name when read rather than reported missing."""
        return os.path.lexists(self.csv_path(split))

    @functools.cached_property
    def labels_file(self) -> Path | None:
        if self.options.labels is not None:
            if not self.options.labels.exists():  # a FIFO or device is refused by name when read
                raise DataError(str(self.options.labels), None, "labels file not found")
            return self.options.labels
        default = self.root / LABELS_FILE
        return default if default.exists() else None

    @functools.cached_property
    def _fixed_labels(self) -> LabelSpace | None:
        return LabelSpace.from_file(self.labels_file) if self.labels_file else None

    def layout(self, with_labels_file: bool = True) -> CsvLayout:
        """How the CSVs are read: the data options' columns and separator, and (``with_labels_file``) the
        labels file's ids as the only labels allowed."""
        o = self.options
        fixed = self._fixed_labels if with_labels_file else None
        allowed = frozenset(str(i) for i in fixed.ids) if fixed else None
        return CsvLayout(o.id_col, o.labels_col, o.caption_col, o.label_sep, o.images, allowed)

    def records(self, split: Split) -> list[Record]:
        """The split's records; DataError naming the file if it is missing or faulty. Test rows that carry
        labels must use the training labels (each other label is named with its row)."""
        if split == "train":
            return list(self._train_records)
        path = self.csv_path(split)
        records = list(self._test_records)
        if any(r.labels for r in records):
            raise_problems(path, unknown_labels(path, records, self.label_space()))
        return records

    @functools.cached_property
    def _train_records(self) -> tuple[Record, ...]:
        """train.csv parsed once: a command reads its rows and, without a labels file, its label space."""
        return tuple(self._read("train"))

    @functools.cached_property
    def _test_records(self) -> tuple[Record, ...]:
        return tuple(self._read("test"))

    def _read(self, split: Split) -> list[Record]:
        path = self.csv_path(split)
        if not path.exists():  # anything else there (a FIFO, a device) is refused by name when read
            raise DataError(str(path), None, f"{split}.csv not found in the data folder")
        return read_csv(path, labelled=split == "train", layout=self.layout())

    def label_space(self) -> LabelSpace:
        """The labels file's, or the labels train.csv holds."""
        if self._fixed_labels is not None:
            return self._fixed_labels
        return self._train_labels

    @functools.cached_property
    def _train_labels(self) -> LabelSpace:
        path = self.csv_path("train")
        space, bad = train_label_space(path, self._train_records)
        raise_problems(path, bad)
        for warning in rare_labels(path, self._train_records, space):
            logger.warning(f"warning: {warning}")
        return space

    def has_captions(self, split: Split = "train") -> bool:
        """Whether the split's CSV has the caption column (an image-only dataset has none)."""
        path = self.csv_path(split)
        text = read_bytes(path, limit=CSV_BYTES, what="CSV file").split(b"\n", 1)[0]
        header = header_cells(text.decode("utf-8-sig", errors="replace").rstrip("\r"))
        return self.options.caption_col.lower() in {c.lower() for c in header} or (
            bool(header) and header[0].lower().endswith(IMAGE_EXTENSIONS))  # no header: the competition's layout

    def image_path(self, image_id: str) -> Path:
        """Where an image lives; refuses an ImageID that is not a plain file name (never opens it)."""
        if (why := image_id_fault(image_id)) is not None:
            raise DataError(str(self.root), None, why)
        return self.image_dir / image_id

    def image(self, image_id: str, draft: int | None = None) -> Image.Image:
        """The row's photo as RGB (``load_image``), refused unless a regular file inside the image folder."""
        return load_image(self.image_path(image_id), draft, inside=self.image_dir)


def train_label_space(path: Path, records: Sequence[Record]) -> tuple[LabelSpace, list[DataError]]:
    """The labels ``records`` (train.csv at ``path``) hold, and what is wrong with them: no labels at all,
    one number written two ways ("1" and "01": they would be two classes), or a few text labels among
    integer ones (typos such as "x3" or "1.5"); each named with its rows."""
    tokens = [t for r in records for t in (r.labels or ())]
    if not tokens:
        return LabelSpace((), ()), [DataError(str(path), None, "no labels at all")]
    space = LabelSpace.from_tokens(tokens)
    counts = collections.Counter(tokens)
    # of each number written several ways, every spelling but the most common one is the fault
    clash = {t: ways for ways in same_numbers(tokens).values()
             for t in sorted(ways, key=lambda w: (-counts[w], w))[1:]}
    odd = odd_tokens(space) - set(clash)
    return space, [DataError(str(path), r.line, f"label {t!r} is the number {int(t)} written another way than "
                                                f"{' / '.join(repr(w) for w in clash[t] if w != t)} (two spellings "
                                                "would be two classes); write it one way")
                   if t in clash else
                   DataError(str(path), r.line, f"label {t!r} is not an integer like the other labels; "
                                                "give a labels file (--labels) if text labels are meant")
                   for r in records for t in (r.labels or ()) if t in odd or t in clash]


def rare_labels(path: Path, records: Sequence[Record], space: LabelSpace, rows: int = RARE_ROWS) -> list[str]:
    """A warning for each label of ``space`` that fewer than ``rows`` rows of train.csv (at ``path``) hold
    (a stray "12" in the competition's file would otherwise be a 19th class), naming its lines and the
    way out: a labels file."""
    lines: dict[str, list[int]] = {str(i): [] for i in space.ids}
    for r in records:
        for t in r.labels or ():
            lines.setdefault(t, []).append(r.line)
    rare = {t: at for t, at in lines.items() if 0 < len(at) < rows}
    if not rare or len(rare) == len(lines):  # a tiny dataset, all of whose labels are rare, is not a typo
        return []
    return [f"{path}: label {t} is on only {len(at)} row(s) (line {', '.join(map(str, at[:5]))}), fewer than "
            f"the {rows} folds fit-head makes: if it is a typo, fix those rows, or give a labels file "
            f"(--labels FILE, header id,name) listing the labels to learn, so that any other is an error"
            for t, at in rare.items()]


def unknown_labels(path: Path, records: Sequence[Record], space: LabelSpace) -> list[DataError]:
    """A fault for each label of ``records`` (test.csv at ``path``) that is not in the training labels."""
    return [DataError(str(path), r.line, f"label {t!r} does not occur in the training labels ({space.describe()})")
            for r in records for t in (r.labels or ()) if t not in space]


# ----------------------------------------------------------------------------------- fingerprint


def fingerprint(records: Iterable[Record], image_dir: Path | None) -> str:
    """sha256 hex over each record's (image_id, caption, labels) and, if given, its image's bytes.

    Record order counts (caches store rows in record order); label order within a row does not
    (it carries no meaning). Fields are JSON-encoded so no two different records hash alike.
    """
    records = list(records)
    h = hashlib.sha256(b"mlc-fingerprint-v1\n")
    for r in records:
        # integer labels as integers, sorted numerically: the fingerprint of COMP5329 data since mlc 0.1
        labels = None if r.labels is None else sorted(typed_ids(r.labels))  # type: ignore[type-var]
        h.update(json.dumps([r.image_id, r.caption, labels], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    if image_dir is not None:
        for r in records:
            if (why := image_id_fault(r.image_id)) is not None:
                raise ImageError(str(Path(image_dir) / r.image_id), why)
            path = Path(image_dir) / r.image_id
            try:
                with open_image_file(path, inside=Path(image_dir)) as fh:
                    h.update(f"{r.image_id}\0{os.fstat(fh.fileno()).st_size}\0".encode())
                    while chunk := fh.read(1 << 20):  # stream: never hold a whole file set in memory
                        h.update(chunk)
            except OSError as err:
                raise ImageError(str(path), f"cannot read: {err.strerror or err}") from err
    return h.hexdigest()
