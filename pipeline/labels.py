"""The label space: which labels exist, in which column order, with which names.

It comes from the data: the labels that occur in train.csv (integers sort numerically and stay integers,
as in COMP5329; anything else is text, sorted), or a labels file (``labels.csv``: ``id,name`` rows, in
the order given) which also fixes the order and the names and makes any other label an error. The
COMP5329 names (COCO's categories 1-19 without 12) ship built in, recognised by the label set.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError
from .reading import LABELS_BYTES, read_text

Label = int | str

COCO_NAMES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse",
}
COCO_UNUSED = 12  # COCO's "street sign" slot: never a COMP5329 label, so a stray 12 keeps the others' names
_INT = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"[+-]?\d+")  # anything int() reads as a number: "+3", "03", "٣" (an Arabic-Indic 3)
# What a label id may not hold: the submission writes a row's labels space-separated after "ImageID,"
# (no quoting), so a space, comma or quote inside one would not read back as the same label.
_UNWRITABLE = re.compile(r'[\s,"]')
RARE_ROWS = 5  # a label in fewer training rows than fit-head's default 5 folds is most likely a typo


def is_int(token: str) -> bool:
    """Whether ``token`` is an integer written the one canonical way ("3", "-1"; not "03", "+3" or "-0")."""
    return bool(_INT.fullmatch(token)) and str(int(token)) == token


def typed_ids(tokens: Iterable[str]) -> list[Label]:
    """Label tokens as ids, in the order given: integers when every token is one ("3", "-1"), else the
    text itself (so a space of integer ids sorts numerically, and a text one alphabetically). A token such
    as "03" is text: as the integer 3 it would no longer match its own rows."""
    tokens = list(tokens)
    return [int(t) for t in tokens] if all(is_int(t) for t in tokens) else list(tokens)


def token_fault(token: str) -> str | None:
    """Why ``token`` cannot be a label id (it would not survive the submission file), or None."""
    if not token:
        return "empty label"
    if _UNWRITABLE.search(token):
        return (f"label {token!r} holds a space, comma or quote, which the submission's space-separated labels "
                "cannot carry; use ids without them (a labels file gives each id a display name)")
    return None


def same_numbers(tokens: Iterable[str]) -> dict[str, list[str]]:
    """Integer tokens that name one number in more than one spelling ("1" and "01"): {canonical: spellings}."""
    spellings: dict[str, set[str]] = {}
    for t in set(tokens):
        if _NUMBER.fullmatch(t):
            spellings.setdefault(str(int(t)), set()).add(t)
    return {n: sorted(s) for n, s in spellings.items() if len(s) > 1}


@dataclass(frozen=True)
class LabelSpace:
    """An ordered set of label ids; column j of every target/score matrix is ``ids[j]``.

    Ids compare by their text: the token ``"3"`` in a CSV is the label ``3``.
    """

    ids: tuple[Label, ...]
    names: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.names) or len({str(i) for i in self.ids}) != len(self.ids):
            raise ValueError("label ids must be unique and match the names one to one")
        object.__setattr__(self, "_index", {str(i): j for j, i in enumerate(self.ids)})

    @classmethod
    def coco18(cls) -> LabelSpace:
        ids = tuple(sorted(COCO_NAMES))
        return cls(ids, tuple(COCO_NAMES[i] for i in ids))

    @classmethod
    def from_tokens(cls, tokens: Iterable[str]) -> LabelSpace:
        """The labels that occur: integers (sorted numerically; when most are COCO ids, those are named after COCO
        and a stray other number such as 0 or 25 keeps its number as its name) when every token is one, else text
        sorted."""
        ids = sorted(typed_ids(set(tokens)))  # type: ignore[type-var]  # all int or all str
        if ids and isinstance(ids[0], int):
            coco = 2 * sum(i in COCO_NAMES or i == COCO_UNUSED for i in ids) > len(ids)
            return cls(tuple(ids), tuple(COCO_NAMES.get(i, str(i)) if coco else str(i) for i in ids))
        return cls(tuple(ids), tuple(ids))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LabelSpace:
        """``labels.csv``: a header ``id,name`` (name optional), one label a row, in the order to use."""
        path = Path(path)
        try:
            text = read_text(path, limit=LABELS_BYTES, what="labels file", encoding="utf-8-sig")
            rows = list(csv.reader(io.StringIO(text)))
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(str(path), None, f"cannot read the labels file ({e})") from e
        if not rows or [c.strip().lower() for c in rows[0][:1]] != ["id"]:
            raise DataError(str(path), 1, "expected a header 'id,name' (one label a row below it)")
        ids: list[str] = []
        names: list[str] = []
        for n, row in enumerate(rows[1:], start=2):
            if not row or not "".join(row).strip():
                continue
            label = row[0].strip()
            if (why := token_fault(label)) is not None:
                raise DataError(str(path), n, why)
            if label in ids or (_NUMBER.fullmatch(label) and same_numbers([*ids, label])):
                raise DataError(str(path), n, f"label {label} is listed twice (a number is one label however "
                                              "it is written)")
            ids.append(label)
            names.append(row[1].strip() if len(row) > 1 and row[1].strip() else label)
        if not ids:
            raise DataError(str(path), None, "no labels listed")
        return cls(tuple(typed_ids(ids)), tuple(names))

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, label: object) -> bool:
        return str(label) in self._index

    def column(self, label: Label) -> int:
        """The column of ``label`` (a token or an id); KeyError when it is not in the space."""
        return self._index[str(label)]

    def multi_hot(self, rows: Sequence[Sequence[Label]]) -> np.ndarray:
        """(N,) lists of labels -> (N, C) float32 0/1 matrix, label order within a row ignored."""
        y = np.zeros((len(rows), len(self.ids)), dtype=np.float32)
        for i, labels in enumerate(rows):
            for label in labels:
                y[i, self._index[str(label)]] = 1.0
        return y

    def describe(self) -> str:
        """'1-11, 13-19' for runs of integers, else the labels themselves (shortened)."""
        if all(isinstance(i, int) for i in self.ids):
            ids = sorted(self.ids)  # type: ignore[type-var]
            runs, start, prev = [], ids[0], ids[0]
            for i in [*ids[1:], None]:
                if i is not None and i == prev + 1:
                    prev = i
                    continue
                runs.append(f"{start}-{prev}" if prev > start else str(start))
                if i is not None:
                    start = prev = i
            return ", ".join(runs)
        shown = ", ".join(map(str, self.ids[:8]))
        return shown + (f", ... ({len(self.ids)} labels)" if len(self.ids) > 8 else "")


def odd_tokens(space: LabelSpace) -> set[str]:
    """The text labels of a space that is mostly integers (at least 3 in 4): most likely typos."""
    text = {str(i) for i in space.ids if not is_int(str(i))}
    return text if text and len(text) * 4 <= len(space) else set()


COCO18 = LabelSpace.coco18()
