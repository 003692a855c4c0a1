"""``mlc validate``: read a data folder the way training will, and report what is in it and what is wrong."""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, group, opt
from .data import DataDir, DataOptions, rare_labels, train_label_space, unknown_labels
from .errors import DataError, ImageError
from .images import check_images
from .labels import LabelSpace
from .records import Record, parse_csv


@dataclass(frozen=True, kw_only=True)
class ValidateConfig(Config):
    """Options of ``mlc validate``."""

    data_dir: Path = opt(None, "Data folder: train.csv, test.csv and the images (in data/, images/ or beside).",
                         argument=True, required=True)
    csv_only: bool = opt(False, "Check only the CSV files; skip opening every image (much faster).")
    data: DataOptions = group(DataOptions)


@dataclass(frozen=True)
class CaptionStats:
    """Caption length in words (whitespace-separated)."""

    min: int
    median: float
    max: int

    @classmethod
    def of(cls, records: list[Record]) -> CaptionStats | None:
        words = [len(r.caption.split()) for r in records]
        return cls(min(words), float(statistics.median(words)), max(words)) if words else None


@dataclass
class ValidationReport:
    """What ``validate_data_dir`` found. ``problems`` is empty when the folder is fit to train on."""

    root: Path
    image_dir: Path
    label_space: LabelSpace
    n_train: int = 0
    n_test: int = 0
    label_counts: dict[int | str, int] = field(default_factory=dict)  # label id -> train images with it
    labels_per_image: dict[int, int] = field(default_factory=dict)  # n labels -> train images
    caption_words: dict[str, CaptionStats] = field(default_factory=dict)  # split -> stats
    images_checked: int = 0  # 0 when csv_only
    problems: list[DataError | ImageError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # not faults, but likely ones (a label on 1 row)
    seconds: float = 0.0

    @property
    def mean_labels(self) -> float:
        n = sum(self.labels_per_image.values())
        return sum(k * v for k, v in self.labels_per_image.items()) / n if n else 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_data_dir(root: str | os.PathLike[str], *, csv_only: bool, progress: bool = True,
                      options: DataOptions | None = None, need_test: bool = True) -> ValidationReport:
    """Parse both CSVs (gathering every fault), check train/test overlap and test labels, and, unless
    ``csv_only``, that every image opens; a missing test.csv is a problem only with ``need_test``. Raises
    DataError only when ``root`` is not a folder."""
    t0 = time.perf_counter()
    data_dir = DataDir.open(root, options)
    found: dict[str, list[Record]] = {}
    problems: list[DataError | ImageError] = []
    stats: dict[str, CaptionStats] = {}
    labels_file_ok = True
    try:
        layout = data_dir.layout()
    except DataError as e:  # a labels file that is missing or cannot be read
        problems.append(e)
        layout, labels_file_ok = data_dir.layout(with_labels_file=False), False
    for split in ("train", "test"):
        path = data_dir.csv_path(split)
        if not data_dir.has(split):  # anything else by that name is refused by name when read
            if split == "test" and not need_test:
                continue
            problems.append(DataError(str(path), None, f"{split}.csv not found in the data folder"))
            continue
        records, faults = parse_csv(path, labelled=split == "train", layout=layout)
        found[split] = records
        problems.extend(faults)
        if stat := CaptionStats.of(records):
            stats[split] = stat
    train, test = found.get("train", []), found.get("test", [])
    warnings: list[str] = []
    if labels_file_ok and data_dir.labels_file is not None:
        space = data_dir.label_space()
    elif train:
        space, faults = train_label_space(data_dir.csv_path("train"), train)
        problems.extend(faults)
        warnings = rare_labels(data_dir.csv_path("train"), train, space)
    else:
        space = LabelSpace((), ())
    report = ValidationReport(data_dir.root, data_dir.image_dir, space, problems=problems, caption_words=stats,
                              warnings=warnings)
    report.n_train, report.n_test = len(train), len(test)
    counts = Counter(str(t) for r in train for t in r.labels or ())
    report.label_counts = {lid: counts.get(str(lid), 0) for lid in space.ids}
    report.labels_per_image = dict(sorted(Counter(len(r.labels or ()) for r in train).items()))
    test_csv = str(data_dir.csv_path("test"))
    problems.extend(unknown_labels(data_dir.csv_path("test"), test, space))
    # A test image that is also a training image would leak its label into the score.
    train_lines = {r.image_id: r.line for r in train}
    problems.extend(DataError(test_csv, r.line, f"ImageID {r.image_id} is also in train.csv (line "
                                                f"{train_lines[r.image_id]})")
                    for r in test if r.image_id in train_lines)
    if not csv_only and data_dir.options.images:
        records = train + test
        _, skipped = check_images(data_dir, records, skip_bad=True, progress=progress)
        report.images_checked = len(records)
        problems.extend(ImageError(str(data_dir.image_path(i)), why) for i, why in skipped)
    report.seconds = time.perf_counter() - t0
    return report


def format_report(report: ValidationReport) -> str:
    """A readable multi-line summary: counts, a per-label table, then every problem."""
    lines = [f"data folder: {report.root}", f"images in:   {report.image_dir}"]
    lines.append(f"train rows:  {report.n_train:,}")
    lines.append(f"test rows:   {report.n_test:,}")
    if report.images_checked:
        lines.append(f"images:      {report.images_checked:,} checked")
    else:
        lines.append("images:      not checked (--csv-only)")
    for split, s in report.caption_words.items():
        lines.append(f"{split} caption words: min {s.min}, median {s.median:g}, max {s.max}")
    if report.n_train:
        hist = ", ".join(f"{k}: {v:,}" for k, v in report.labels_per_image.items())
        lines.append(f"labels per train image: mean {report.mean_labels:.2f} ({hist})")
        lines.append("")
        lines.append(f"{'id':>3}  {'label':<14} {'images':>7} {'%':>6}")
        for lid, name in zip(report.label_space.ids, report.label_space.names, strict=True):
            n = report.label_counts.get(lid, 0)
            flag = "  <- never occurs" if n == 0 else ""
            lines.append(f"{lid:>3}  {name:<14} {n:>7,} {100 * n / report.n_train:>5.1f}%{flag}")
    lines.append("")
    lines.extend(f"warning: {w}" for w in report.warnings)
    if report.problems:
        lines.append(f"{len(report.problems)} problem(s):")
        lines.extend(f"  {p}" for p in report.problems)  # each reads "file:line: fault" / "path: fault"
    else:
        lines.append("no problems found")
    lines.append(f"({report.seconds:.1f} s)")
    return "\n".join(lines)
