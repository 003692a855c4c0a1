"""The forgiving reader of the competition's dirty CSV layout (``ImageID,Labels,Caption``).

The published CSVs are not valid CSV: captions are double-quoted but quotes inside a caption are
not escaped (``9084.jpg,3 1 11,"A street sign labeled "Seltzer Way," with ..."``), and some captions
hold a newline. ``csv.reader`` and ``pandas.read_csv`` split or drop such rows, so these helpers split
the file into lines, group the lines into records and cut each record's caption out explicitly:

* a record starts at a line that begins with an ImageID (a file name with an image extension)
  followed by a comma; other lines continue the caption of the record before them;
* the caption is everything between the first quote after the label field and the *last* quote of
  the record (an optional trailing comma may follow it);
* a caption written with proper CSV escaping (every inner quote doubled) is un-doubled.

Split out of :mod:`pipeline.records`, which owns ``Record``, ``CsvLayout`` and ``parse_csv`` and builds
the records from these pieces; this module imports nothing of it, so there is no import cycle.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .errors import DataError

# A line that certainly starts a record: an image file name (no quote, no comma; it may hold a path,
# which is then refused with a clear message rather than glued onto the caption before) + a comma.
# The id may be quoted (a file written with csv.QUOTE_ALL).
_RECORD_START = re.compile(r'^"?[^,"\n]*[^,"\s]\.(?:jpe?g|png|bmp|gif|webp|tiff?)"?[ \t]*,', re.IGNORECASE)
# A line that may start a record when the record before it is complete: one token, then a comma.
# Catches ImageIDs without an image extension (so they get an error, not silently merged), while a
# caption continuation ("full of very tidily arranged piles ...") has spaces before any comma.
_LOOSE_START = re.compile(r'^"?[^,"\s]+"?[ \t]*,')


def _split_lines(data: bytes) -> list[bytes]:
    """Lines without their ends; LF or CRLF (a CR alone only in a file with no LF at all)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # the BOM some editors (Excel "CSV UTF-8") put at the start
    sep = b"\n" if b"\n" in data or b"\r" not in data else b"\r"
    lines = data.split(sep)
    if lines and lines[-1] == b"":
        lines.pop()  # the file's final newline ends the last line, it does not start another
    return [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]


def _id_field(text: str) -> str:
    """The ImageID: the text before the first comma, without spaces or CSV quotes around it."""
    field = text.partition(",")[0].strip()
    return field[1:-1] if len(field) >= 2 and field[0] == field[-1] == '"' else field


def _caption_part(text: str, labelled: bool) -> str | None:
    """The text after the ImageID (and label) field, or None when those fields are incomplete."""
    _, sep, rest = text.partition(",")
    if sep and labelled:
        _, sep, rest = rest.partition(",")
    return rest if sep else None


def _opens_quote(first_line: str, labelled: bool) -> bool:
    """True when a record's caption starts with a quote (only then may it span lines)."""
    rest = _caption_part(first_line, labelled)
    return rest is not None and rest.lstrip().startswith('"')


def _ends_with_quote(line: str) -> bool:
    """Whether a line ends with a (possible) closing quote, before an optional trailing comma."""
    return line.rstrip().removesuffix(",").rstrip().endswith('"')


def _closed_on_first_line(first_line: str, labelled: bool) -> bool:
    """Whether a quoted caption also ends on its record's first line (its opening quote does not count)."""
    rest = (_caption_part(first_line, labelled) or "").strip().removesuffix(",").rstrip()
    return len(rest) >= 2 and rest.endswith('"')


def _unescape(inner: str) -> str:
    """Un-double quotes only when the caption is consistently CSV-escaped.

    A properly escaped caption has every inner quote doubled, so every run of quotes has even length.
    The dirty 2023 files leave inner quotes single (``reads "oh no, ...!"``), giving an odd run
    somewhere; such captions are kept exactly as written.
    """
    runs = re.findall(r'"+', inner)
    if runs and all(len(run) % 2 == 0 for run in runs):
        return inner.replace('""', '"')
    return inner


def _parse_header(
    line: str, file: str, columns: tuple[str, ...]
) -> tuple[bool, DataError | None]:
    """(has_header, fault). A missing header is a fault but the rows can still be read."""
    expected = ",".join(columns)
    if _RECORD_START.match(line):
        return False, DataError(file, 1, f"missing header: expected '{expected}' but line 1 is a record")
    cells = [c.strip().strip('"').strip() for c in line.split(",")]
    if len(cells) > 1 and cells[-1] == "":
        cells.pop()  # trailing-comma variant
    if [c.lower() for c in cells] != [c.lower() for c in columns]:
        return True, DataError(file, 1, f"wrong columns: expected '{expected}', found '{','.join(cells)}'")
    return True, None


def _parse_caption(rest: str, text: str, line: int, fault: Callable[..., None], id_col: str) -> str | None:
    """The caption field: between the first quote and the record's last quote, or unquoted."""
    stripped = rest.lstrip()
    if not stripped.startswith('"'):
        caption = rest.strip().removesuffix(",").strip()  # one trailing comma: the 2021 variant
        if "\n" in caption:  # the record's second line is the stray one
            fault(f"line does not start a record ({id_col},...) and an unquoted caption cannot span lines",
                  line + 1)
            return None
        if '"' in caption:
            fault("caption is not quoted but contains a quote (too many fields?)")
            return None
        return caption
    opening = len(rest) - len(stripped)
    last = rest.rfind('"')
    if last == opening:
        fault("unterminated quote: the caption's opening quote is never closed")
        return None
    tail = rest[last + 1 :]
    if not re.fullmatch(r"\s*,?\s*", tail):
        # Locate the stray text: the line of its first non-space character.
        junk = len(text) - len(tail) + (len(tail) - len(tail.lstrip()))
        fault(f"unexpected text after the caption's closing quote: {tail.strip()[:40]!r}",
              line + text[:junk].count("\n"))
        return None
    return _unescape(rest[opening + 1 : last])


def _decode(raw: list[bytes], file: str) -> tuple[list[str], set[int], list[DataError]]:
    """Lines as text; a line that is not UTF-8 is reported (and kept, with replacement characters)."""
    problems: list[DataError] = []
    lines: list[str] = []
    bad_lines: set[int] = set()
    for n, chunk in enumerate(raw, start=1):
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as err:
            problems.append(DataError(file, n, f"not valid UTF-8 (byte {chunk[err.start]:#04x} at column "
                                               f"{err.start + 1})"))
            bad_lines.add(n)
            lines.append(chunk.decode("utf-8", errors="replace"))
    return lines, bad_lines, problems


def _group(lines: list[str], first: int, labelled: bool) -> list[tuple[int, list[str]]]:
    """Lines grouped into records: (first line number, [lines]). ``is_open``: the current record's
    quoted caption has no closing quote yet, so only a certain record start may end it."""
    groups: list[tuple[int, list[str]]] = []
    quoted = is_open = False
    for n, text in enumerate(lines[first - 1:], start=first):
        if groups:
            starts = bool(_RECORD_START.match(text)) or (not is_open and bool(_LOOSE_START.match(text)))
        else:
            starts = bool(text.strip())  # the first non-blank line after the header
        if starts:
            groups.append((n, [text]))
            quoted = _opens_quote(text, labelled)
            is_open = quoted and not _closed_on_first_line(text, labelled)
        elif groups:
            groups[-1][1].append(text)
            if text.strip():  # a blank line neither opens nor closes
                is_open = quoted and not _ends_with_quote(text)
    return groups
