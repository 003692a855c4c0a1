"""A data folder holding the first n train records of another (clean CSV, images symlinked)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import DataDir  # noqa: E402


def first_rows(data: Path, n: int, tmp: Path) -> Path:
    dd = DataDir.open(data)
    out = tmp / f"first-{n}"
    (out / "data").mkdir(parents=True)
    lines = ["ImageID,Labels,Caption"]
    for r in dd.records("train")[:n]:
        (out / "data" / r.image_id).symlink_to(dd.image_path(r.image_id).resolve())
        lines.append(f'{r.image_id},{" ".join(map(str, r.labels))},"{r.caption}"')
    (out / "train.csv").write_text("\n".join(lines) + "\n")
    return out
