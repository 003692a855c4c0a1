"""Reading the competition CSVs: records, however dirty the file.

The published CSVs are not valid CSV (unescaped quotes inside captions, captions holding a newline),
so a file in the competition's layout (id, labels, caption, the caption last) goes through the
forgiving reader in :mod:`pipeline.competition_csv`, which splits, groups and cuts records explicitly.
Also accepted: CRLF line ends, a UTF-8 BOM, a trailing comma on every line (the 2021 edition),
unquoted captions, and files written by ``csv.writer`` (quoted ImageIDs and labels included).

Other datasets name their columns otherwise, order them otherwise, add columns or have no caption:
a :class:`CsvLayout` says which column holds what. Any layout other than the competition's goes
through a strict CSV reader that maps the named columns. Every fault is reported as a
:class:`DataError` with file, line and fault; no row is ever dropped silently.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The dirty-layout helpers live in their own module (this one was over the size limit); it imports
# nothing from here, so records -> competition_csv is one-way.
from .competition_csv import (
    _RECORD_START,
    _decode,
    _group,
    _id_field,
    _parse_caption,
    _parse_header,
    _split_lines,
)
from .errors import DataError
from .labels import token_fault
from .reading import CSV_BYTES, read_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_DRIVE = re.compile(r"^[A-Za-z]:")
_MAX_LISTED = 5  # problems named in the one-line summary that read_csv raises
NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems alike


@dataclass(frozen=True)
class Record:
    """One CSV row. ``labels`` are the row's label tokens (None where the file has no labels);
    ``caption`` is "" in a dataset without captions; ``line`` is the 1-based line the row starts on."""

    image_id: str
    caption: str
    labels: tuple[str, ...] | None
    line: int


@dataclass(frozen=True)
class CsvLayout:
    """Which column holds what, how labels are separated, and what the ids are."""

    id_col: str = "ImageID"
    labels_col: str = "Labels"
    caption_col: str = "Caption"
    label_sep: str = " "  # " ": any whitespace
    images: bool = True  # ids are image file names (checked as such)
    allowed: frozenset[str] | None = None  # a labels file's ids: any other label is a fault

    def columns(self, labelled: bool) -> tuple[str, ...]:
        """The competition layout's columns for this layout's names."""
        return (self.id_col, self.labels_col, self.caption_col) if labelled else (self.id_col, self.caption_col)

    def split_labels(self, field: str) -> list[str]:
        return field.split() if not self.label_sep.strip() else [t.strip() for t in field.split(self.label_sep)
                                                                  if t.strip()]


def label_faults(tokens: list[str], layout: CsvLayout, labelled: bool) -> tuple[tuple[str, ...], list[str]]:
    """(the row's labels, what is wrong with them)."""
    found: list[str] = []
    faults: list[str] = []
    for token in tokens:
        if (why := token_fault(token)) is not None:
            faults.append(why)
        elif layout.allowed is not None and token not in layout.allowed:
            known = ", ".join(sorted(layout.allowed, key=lambda t: (not t.isdigit(), t.zfill(20))))[:80]
            faults.append(f"label {token!r} is not in the labels file (labels: {known})")
        elif token in found:
            faults.append(f"label {token!r} is repeated")
        else:
            found.append(token)
    if labelled and not tokens:
        faults.append("no labels: a training row needs at least one label")
    return tuple(found), faults


def id_fault(row_id: str, layout: CsvLayout) -> str | None:
    """Why ``row_id`` cannot be a row id: an unsafe or non-image file name, or an empty id."""
    if layout.images:
        return image_id_fault(row_id)
    if not row_id or row_id.strip() != row_id:
        return f"id {row_id!r} is empty or has spaces around it"
    return _unwritable_id(row_id, "id")


def _unwritable_id(row_id: str, what: str) -> str | None:
    """Why ``row_id`` cannot be the first field of a submission line ``ID,labels`` (written unquoted)."""
    if any(ord(ch) < 32 or ch == "\x7f" for ch in row_id):
        return f"{what} {row_id!r} holds a line break or control character"
    if "," in row_id or '"' in row_id:
        return f"{what} {row_id!r} holds a comma or quote, which the submission's {what},Labels lines cannot carry"
    return None


class CsvProblems(DataError):
    """Several faults in one CSV: located at the first one, the message counts and lists a few."""

    def __init__(self, file: str, problems: Sequence[DataError]) -> None:
        self.problems = list(problems)
        first = self.problems[0]
        listed = "; ".join(f"line {p.line}: {p.fault}" for p in self.problems[1:_MAX_LISTED])
        more = len(self.problems) - _MAX_LISTED
        fault = f"{first.fault} (and {len(self.problems) - 1} more problems: {listed}"
        fault += f"; ... {more} more)" if more > 0 else ")"
        super().__init__(file, first.line, fault)


def image_id_fault(image_id: str) -> str | None:
    """Why ``image_id`` is not a plain image file name, or None when it is.

    ImageIDs are joined onto the image folder, so anything that could climb out of it (a path
    separator, ``..``, an absolute or drive path) is refused before any file is opened.
    """
    shown = repr(image_id)
    if not image_id:
        return "empty ImageID"
    if image_id != image_id.strip():
        return f"ImageID {shown} has leading or trailing spaces"
    if image_id.startswith(("/", "\\")) or _DRIVE.match(image_id):
        return f"ImageID {shown} is an absolute path; it must be a plain file name"
    if image_id in (".", "..") or ".." in re.split(r"[/\\]", image_id):
        return f"ImageID {shown} contains '..'; it must be a plain file name"
    if "/" in image_id or "\\" in image_id:
        return f"ImageID {shown} contains a path separator; it must be a plain file name"
    if (why := _unwritable_id(image_id, "ImageID")) is not None:
        return why
    if any(ch in ':*?<>|' for ch in image_id):
        return f"ImageID {shown} contains a character not allowed in a file name"
    if len(image_id.encode("utf-8")) > NAME_MAX:
        return (f"ImageID {image_id[:40]!r}... is {len(image_id.encode('utf-8'))} bytes long; a file name may have "
                f"at most {NAME_MAX}")
    if not image_id.lower().endswith(IMAGE_EXTENSIONS):
        return f"ImageID {shown} is not an image file name (expected e.g. 123.jpg)"
    return None


# ----------------------------------------------------------------------------------------- CSV


def _parse_record(
    text: str, line: int, file: str, labelled: bool, layout: CsvLayout
) -> tuple[Record | None, list[DataError]]:
    """One record's text (lines joined with \\n) -> the Record, or None and its faults."""
    problems: list[DataError] = []

    def fault(msg: str, at: int = line) -> None:
        problems.append(DataError(file, at, msg))

    columns = layout.columns(labelled)
    image_id = _id_field(text)
    _, sep, rest = text.partition(",")
    if not sep:
        fault(f"expected {len(columns)} fields ({','.join(columns)}), found no comma")
        return None, problems
    if (why := id_fault(image_id, layout)) is not None:
        fault(why)

    labels: tuple[str, ...] | None = None
    if labelled:
        field, sep, rest = rest.partition(",")
        if not sep:
            fault(f"missing caption field (expected {','.join(columns)})")
            return None, problems
        field = field.strip()
        if len(field) >= 2 and field[0] == field[-1] == '"':
            field = field[1:-1]  # "1 19" quoted by a CSV writer
        labels, faults = label_faults(layout.split_labels(field), layout, labelled)
        for f in faults:
            fault(f)

    caption = _parse_caption(rest, text, line, fault, columns[0])
    if caption is not None and not caption.strip():
        fault("empty caption")
    if problems or caption is None:
        return None, problems
    return Record(image_id, caption, labels, line), problems


def parse_csv(
    path: str | os.PathLike[str], *, labelled: bool, layout: CsvLayout | None = None
) -> tuple[list[Record], list[DataError]]:
    """Read a CSV, gathering every problem instead of stopping at the first.

    ``labelled``: every row must have labels (train.csv); a file without ``labelled`` may still carry a
    labels column. Returns the good records (file order) and the problems (file order). A record with
    any fault is not returned; it is named in the problems instead.
    """
    layout = layout or CsvLayout()
    path = Path(path)
    file = str(path)
    try:
        data = read_bytes(path, limit=CSV_BYTES, what="CSV file")
    except DataError as err:
        return [], [err]
    except FileNotFoundError:
        return [], [DataError(file, None, "file not found")]
    except OSError as err:
        return [], [DataError(file, None, f"cannot read file: {err.strerror or err}")]

    lines, bad_lines, problems = _decode(_split_lines(data), file)
    if not lines or not any(ln.strip() for ln in lines):
        return [], [DataError(file, None, "empty file: no header and no records")]

    header = header_cells(lines[0])
    columns = layout.columns(labelled)
    other_layout = [c.lower() for c in header] != [c.lower() for c in columns] and not _RECORD_START.match(lines[0])
    if other_layout and {c.lower() for c in header} >= {c.lower() for c in columns[:-1]}:
        return _parse_strict(lines, bad_lines, problems, file, labelled, layout)
    has_header, header_fault = _parse_header(lines[0], file, columns)
    if header_fault is not None:
        problems.append(header_fault)
        if has_header:
            return [], problems  # wrong columns: the layout of the rows is unknown
    groups = _group(lines, 2 if has_header else 1, labelled)

    records: list[Record] = []
    seen: dict[str, int] = {}
    for start, group in groups:
        text = "\n".join(group).rstrip()  # blank lines after a record are not part of it
        record, faults = _parse_record(text, start, file, labelled, layout)
        problems.extend(faults)
        if any(start <= b < start + len(group) for b in bad_lines):
            continue  # already reported as not UTF-8
        if _first_sight(_id_field(text), start, seen, file, problems) and record is not None:
            records.append(record)
    if not groups:
        problems.append(DataError(file, None, "no records: the file has a header but no rows"))
    problems.sort(key=lambda p: p.line or 0)
    return records, problems


def header_cells(line: str) -> list[str]:
    """The column names of a header line (quotes and a trailing empty cell dropped)."""
    cells = [c.strip().strip('"').strip() for c in next(csv.reader([line]), [])]
    if len(cells) > 1 and cells[-1] == "":
        cells.pop()
    return cells


def _first_sight(row_id: str, line: int, seen: dict[str, int], file: str, problems: list[DataError]) -> bool:
    """False (and a problem) for an id seen before."""
    if row_id in seen:
        problems.append(DataError(file, line, f"duplicate ImageID {row_id} (first on line {seen[row_id]})"))
        return False
    seen[row_id] = line
    return True


def _parse_strict(lines: list[str], bad_lines: set[int], problems: list[DataError], file: str, labelled: bool,
                  layout: CsvLayout) -> tuple[list[Record], list[DataError]]:
    """Any other layout: a proper CSV (quotes escaped by doubling), columns found by name."""
    rows = csv.reader(io.StringIO("\n".join(lines) + "\n"))
    header = [c.strip() for c in next(rows)]
    where = {c.lower(): i for i, c in enumerate(header)}
    i_id, i_lab, i_cap = (where.get(c.lower()) for c in (layout.id_col, layout.labels_col, layout.caption_col))
    if i_id is None or (labelled and i_lab is None):
        need = [layout.id_col] + [layout.labels_col] * labelled
        problems.append(DataError(file, 1, f"no column {' or '.join(repr(c) for c in need)} in the header "
                                           f"{','.join(header)!r} (name it with --id-col / --labels-col)"))
        return [], problems
    records: list[Record] = []
    seen: dict[str, int] = {}
    end = 1
    for row in rows:
        start, end = end + 1, rows.line_num
        if not row or not "".join(row).strip():
            continue
        faults = []
        if len(row) != len(header):
            faults.append(f"expected {len(header)} fields ({','.join(header)}), found {len(row)}")
        row_id, caption, field = (_cell(row, i) for i in (i_id, i_cap, i_lab))
        if (why := id_fault(row_id, layout)) is not None:
            faults.append(why)
        labels, label_probs = (label_faults(layout.split_labels(field), layout, labelled)
                               if i_lab is not None else (None, []))
        faults += label_probs
        if i_cap is not None and not caption:
            faults.append("empty caption")
        problems.extend(DataError(file, start, f) for f in faults)
        if any(start <= b <= end for b in bad_lines) or not _first_sight(row_id, start, seen, file, problems):
            continue
        if not faults:
            records.append(Record(row_id, caption, labels, start))
    if not records and not problems:
        problems.append(DataError(file, None, "no records: the file has a header but no rows"))
    problems.sort(key=lambda p: p.line or 0)
    return records, problems


def _cell(row: list[str], i: int | None) -> str:
    return row[i].strip() if i is not None and i < len(row) else ""


def read_csv(path: str | os.PathLike[str], *, labelled: bool, layout: CsvLayout | None = None) -> list[Record]:
    """All records of a CSV; raises DataError (the first fault, or a summary) if any."""
    records, problems = parse_csv(path, labelled=labelled, layout=layout)
    raise_problems(path, problems)
    return records


def raise_problems(path: str | os.PathLike[str], problems: Sequence[DataError]) -> None:
    """Nothing when there are none; else the one problem, or a CsvProblems summary of them all."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise CsvProblems(str(path), problems)


def read_train_csv(path: str | os.PathLike[str], layout: CsvLayout | None = None) -> list[Record]:
    """``ImageID,Labels,Caption`` rows."""
    return read_csv(path, labelled=True, layout=layout)


def read_test_csv(path: str | os.PathLike[str], layout: CsvLayout | None = None) -> list[Record]:
    """``ImageID,Caption`` rows (labels None)."""
    return read_csv(path, labelled=False, layout=layout)
