"""Cut ``examples/comp5329-mini`` from the shared competition subset, reproducibly.

Usage (from the repository root; rerunning gives the same bytes)::

    .venv/bin/python examples/make_mini.py [--src ../shared/data/comp5329] [--dest examples/comp5329-mini]

Selection (deterministic, no randomness):

* train: every 15th ImageID (0, 15, ..., 11985: 800 images), plus the rows with known quirks
  (1014, 2259, 6751: newline inside the caption; 9084, 9508: unescaped inner quotes), plus, for any
  label seen fewer than ``MIN_PER_LABEL`` times, the lowest-numbered further ids carrying it;
* test: every 5th ImageID from 30000 (30000, 30005, ..., 30995: 200 images) plus 36889
  (unescaped inner quotes).

Each selected record is copied as its raw bytes (all its lines, embedded newlines included) in the
source file's order, under the source's header line, so every quirk survives. The images are copied
unchanged. The script then re-reads the sample and checks its records equal the source's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script without installing the package

from pipeline.atomic import write_text  # noqa: E402
from pipeline.labels import COCO18  # noqa: E402
from pipeline.records import Record, parse_csv, read_csv  # noqa: E402

TRAIN_STEP, TEST_STEP = 15, 5
QUIRKY_TRAIN = (1014, 2259, 6751, 9084, 9508)
QUIRKY_TEST = (36889,)
MIN_PER_LABEL = 10


def _number(record: Record) -> int:
    return int(record.image_id.rsplit(".", 1)[0])


def select_train(records: list[Record]) -> list[Record]:
    """Every TRAIN_STEP-th id, the quirky rows, then top-ups so each label has MIN_PER_LABEL rows."""
    chosen = {r.image_id for r in records if _number(r) % TRAIN_STEP == 0 or _number(r) in QUIRKY_TRAIN}
    for lid in COCO18.ids:
        have = sum(lid in (r.labels or ()) for r in records if r.image_id in chosen)
        for r in sorted(records, key=_number):
            if have >= MIN_PER_LABEL:
                break
            if r.image_id not in chosen and lid in (r.labels or ()):
                chosen.add(r.image_id)
                have += 1
    return [r for r in records if r.image_id in chosen]


def select_test(records: list[Record]) -> list[Record]:
    return [r for r in records
            if (30000 <= _number(r) < 31000 and _number(r) % TEST_STEP == 0) or _number(r) in QUIRKY_TEST]


def raw_records(path: Path, records: list[Record], keep: list[Record]) -> bytes:
    """The header line and the raw lines of each kept record, byte for byte, in file order."""
    lines = path.read_bytes().split(b"\n")
    # Re-attach the "\n" each line had (the last piece is whatever followed the final newline).
    lines = [ln + b"\n" for ln in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    starts = [r.line for r in records] + [len(lines) + 1]
    span = {r.image_id: (starts[i], starts[i + 1]) for i, r in enumerate(records)}
    out = [lines[0]]
    for r in keep:
        first, end = span[r.image_id]
        out.extend(lines[first - 1 : end - 1])
    return b"".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data" / "comp5329")
    parser.add_argument("--dest", type=Path, default=REPO / "examples" / "comp5329-mini")
    args = parser.parse_args()

    picked: dict[str, list[Record]] = {}
    for split, labelled, select in (("train", True, select_train), ("test", False, select_test)):
        src = args.src / f"{split}.csv"
        records, problems = parse_csv(src, labelled=labelled)
        if problems:  # a record we cannot parse could not be cut out byte for byte
            sys.exit(f"{src}: {len(problems)} problems, first: {problems[0]}")
        keep = select(records)
        args.dest.mkdir(parents=True, exist_ok=True)
        (args.dest / f"{split}.csv").write_bytes(raw_records(src, records, keep))
        # Check: the sample parses to exactly the source's records (line numbers aside).
        again = read_csv(args.dest / f"{split}.csv", labelled=labelled)
        strip = [(r.image_id, r.caption, r.labels) for r in again]
        assert strip == [(r.image_id, r.caption, r.labels) for r in keep], f"{split}.csv differs"
        picked[split] = keep

    images = args.dest / "data"
    images.mkdir(exist_ok=True)
    wanted = {r.image_id for rs in picked.values() for r in rs}
    for stale in images.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    for image_id in sorted(wanted):
        shutil.copyfile(args.src / "data" / image_id, images / image_id)

    write_text(args.dest / "SOURCE.md", source_md(picked, args.dest))
    size = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    print(f"{args.dest}: {len(picked['train'])} train, {len(picked['test'])} test, {size / 1e6:.1f} MB")


def source_md(picked: dict[str, list[Record]], dest: Path) -> str:
    train, test = picked["train"], picked["test"]
    counts = Counter(lid for r in train for lid in r.labels or ())
    extra = sorted(_number(r) for r in train
                   if _number(r) % TRAIN_STEP and _number(r) not in QUIRKY_TRAIN)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file() and p.name != "SOURCE.md")
    table = "\n".join(f"| {lid} | {name} | {counts[lid]} |" for lid, name in zip(COCO18.ids, COCO18.names,
                                                                               strict=True))
    return f"""# comp5329-mini — a small real sample of the COMP5329 competition data

Cut by `examples/make_mini.py` (rerun it to reproduce these bytes) from the shared development
subset `../shared/data/comp5329` (see its SOURCES.md), which holds the records of images
0–11999 and 30000–30999 + 36889 of the Kaggle in-class competition
"multi-label-classification-competition" (COMP5329 Deep Learning, University of Sydney):
COCO photos with captions, 18 labels (COCO category ids 1–19 without 12).

- `train.csv`: {len(train)} records — every {TRAIN_STEP}th ImageID (0.jpg, {TRAIN_STEP}.jpg, …, 11985.jpg), plus
  the quirky rows {", ".join(f"{i}.jpg" for i in QUIRKY_TRAIN)}, plus {len(extra)} lowest-numbered ids
  added so that every label occurs at least {MIN_PER_LABEL} times ({", ".join(f"{i}.jpg" for i in extra) or "none"}).
- `test.csv`: {len(test)} records — every {TEST_STEP}th ImageID from 30000.jpg to 30995.jpg, plus 36889.jpg.
- `data/`: the {len(train) + len(test)} JPEG files they name, copied unchanged ({size / 1e6:.1f} MB in all).

The CSV records are copied **byte for byte** from the shared files (raw lines, header included), in
file order, so the quirks of the published files are kept on purpose:
- unescaped quotes inside quoted captions: train 9084.jpg and 9508.jpg, test 36889.jpg;
- a newline inside the caption: train 1014.jpg, 2259.jpg, 6751.jpg.

Labels in the train sample (images carrying each label):

| id | label | images |
|---:|---|---:|
{table}
"""


if __name__ == "__main__":
    main()
