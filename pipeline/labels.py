"""The label space: the 18 COCO categories the competition uses (ids 1-19, 12 never occurs)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

COCO_NAMES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse",
}


@dataclass(frozen=True)
class LabelSpace:
    """An ordered set of label ids; column j of every target/score matrix is ``ids[j]``."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.names) or len(set(self.ids)) != len(self.ids):
            raise ValueError("label ids must be unique and match the names one to one")

    @classmethod
    def coco18(cls) -> LabelSpace:
        ids = tuple(sorted(COCO_NAMES))
        return cls(ids, tuple(COCO_NAMES[i] for i in ids))

    @classmethod
    def from_ids(cls, ids: Iterable[int]) -> LabelSpace:
        ids = tuple(int(i) for i in ids)
        return cls(ids, tuple(COCO_NAMES.get(i, str(i)) for i in ids))

    def __len__(self) -> int:
        return len(self.ids)

    def multi_hot(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """(N,) lists of label ids -> (N, C) float32 0/1 matrix, label order within a row ignored."""
        col = {lid: j for j, lid in enumerate(self.ids)}
        y = np.zeros((len(rows), len(self.ids)), dtype=np.float32)
        for i, labels in enumerate(rows):
            for lid in labels:
                y[i, col[lid]] = 1.0
        return y


COCO18 = LabelSpace.coco18()
