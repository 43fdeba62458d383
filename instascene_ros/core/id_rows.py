"""Rows of Gaussian ids in an id table.

Gaussians keep their ids for life while their rows move (densification appends, pruning
removes), so every table that outlives one optimisation step (the feature field's rows, an
instance's members, a tracker prior) is keyed by id and looked up here."""
from __future__ import annotations

import numpy as np


def rows_of(table_ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Row of each query id in `table_ids` (unsorted, unique), -1 where absent; shaped like `query`."""
    table_ids = np.asarray(table_ids, dtype=np.int64)
    query = np.asarray(query, dtype=np.int64)
    rows = np.full(query.shape, -1, dtype=np.int64)
    if table_ids.size == 0 or query.size == 0:
        return rows
    order = np.argsort(table_ids, kind="stable")
    sorted_ids = table_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, query), 0, sorted_ids.size - 1)
    found = sorted_ids[pos] == query
    rows[found] = order[pos[found]]
    return rows


def present_rows_of(table_ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Rows of the query ids that `table_ids` holds, in query order (absent ids dropped)."""
    rows = rows_of(table_ids, query).ravel()
    return rows[rows >= 0]
