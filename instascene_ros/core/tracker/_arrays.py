"""Small array helpers shared by the tracker modules."""
from __future__ import annotations

import numpy as np


def unique_sorted(values: np.ndarray) -> np.ndarray:
    """Sorted unique values of an array, flattened. numpy 2.4's np.unique hashes and took 0.45 s
    for 200k int64 values here, where sorting takes 2 ms."""
    values = np.sort(np.asarray(values).reshape(-1))
    if values.size < 2:
        return values
    return values[np.concatenate([[True], values[1:] != values[:-1]])]


def segment_sum(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Sums of values[indptr[i]:indptr[i + 1]] as int64 (empty segments give 0)."""
    cumulative = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return cumulative[indptr[1:]] - cumulative[indptr[:-1]]


def lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of `ids` in the sorted unique `sorted_ids`, -1 where absent."""
    ids = np.asarray(ids, dtype=np.int64)
    if sorted_ids.size == 0 or ids.size == 0:
        return np.full(ids.shape, -1, np.int64)
    position = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    return np.where(sorted_ids[position] == ids, position, -1).astype(np.int64)


class IdIndex:
    """Persistent ids -> dense columns 0..G-1 (sorted), -1 for ids it does not hold. Persistent ids
    are fresh integers, so they are usually compact: then a table replaces sorting and searching."""

    def __init__(self, all_ids: np.ndarray):
        all_ids = np.asarray(all_ids, dtype=np.int64).reshape(-1)
        self._table = None
        if all_ids.size and all_ids.min() >= 0 and all_ids.max() < 8 * all_ids.size + (1 << 20):
            present = np.zeros(int(all_ids.max()) + 1, dtype=bool)
            present[all_ids] = True
            self.ids = np.flatnonzero(present).astype(np.int64)
            self._table = np.cumsum(present, dtype=np.int64) - 1
            self._table[~present] = -1
        else:
            self.ids = unique_sorted(all_ids).astype(np.int64)

    def __len__(self) -> int:
        return int(self.ids.size)

    def columns(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self._table is None:
            return lookup(self.ids, ids)
        result = np.full(ids.shape, -1, np.int64)
        inside = (ids >= 0) & (ids < self._table.size)
        result[inside] = self._table[ids[inside]]
        return result
