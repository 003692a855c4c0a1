"""Cut examples/tags-mini from examples/comp5329-mini: the same kind of data in another dataset's clothes.

Other column names (file,tags,title), labels that are words separated by '|', a labels.csv that gives
their order and display names, and a proper CSV (quotes escaped by doubling), to show that mlc is not
tied to the competition's files. Every 6th train record (135) and every 10th test record (21).

    python examples/make_tags_mini.py      # rewrites examples/tags-mini byte for byte
"""

from __future__ import annotations

import csv
import io
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data import DataDir  # noqa: E402
from pipeline.labels import COCO_NAMES  # noqa: E402

SOURCE, TARGET = REPO / "examples" / "comp5329-mini", REPO / "examples" / "tags-mini"


def tag(label: str) -> str:
    return COCO_NAMES[int(label)].replace(" ", "_")


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def main() -> None:
    src = DataDir.open(SOURCE)
    train, test = src.records("train")[::6], src.records("test")[::10]
    shutil.rmtree(TARGET / "images", ignore_errors=True)  # SOURCE.md stays
    (TARGET / "images").mkdir(parents=True)
    for r in train + test:
        shutil.copyfile(src.image_path(r.image_id), TARGET / "images" / r.image_id)
    write_csv(TARGET / "train.csv", ["file", "tags", "title"],
              [[r.image_id, "|".join(sorted(tag(t) for t in r.labels)), r.caption] for r in train])
    write_csv(TARGET / "test.csv", ["file", "title"], [[r.image_id, r.caption] for r in test])
    used = sorted({tag(t) for r in train for t in r.labels}, key=lambda t: [k for k, v in COCO_NAMES.items()
                                                                             if v.replace(" ", "_") == t][0])
    write_csv(TARGET / "labels.csv", ["id", "name"], [[t, t.replace("_", " ").title()] for t in used])
    print(f"wrote {TARGET}: {len(train)} train, {len(test)} test records, {len(used)} labels")


if __name__ == "__main__":
    main()
