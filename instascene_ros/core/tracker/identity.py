"""Stable user-facing instance ids across solves, and the events that explain their changes.

Each previous instance goes to the new cluster holding the largest share of its Gaussians that
still exist, when that share >= match_min_share. A cluster receiving several previous instances
keeps the oldest id (ids grow monotonically, so the smallest) and reports the others as merged
into it; a cluster receiving none gets a fresh id (created; ids are never reused); a previous id
that no cluster carries is removed (its Gaussians were pruned, or its masks stopped forming a
cluster; a split keeps the id on the part holding most of the old Gaussians and creates the rest).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import scipy.sparse as sparse

from ._arrays import lookup

EventKind = Literal["created", "merged", "removed"]


@dataclass(frozen=True)
class TrackerEvent:
    """created: a new id. merged: `instance_id` absorbed the ids in `sources`, which are gone.
    removed: the id is carried by no cluster any more."""

    kind: EventKind
    instance_id: int
    sources: tuple[int, ...] = ()


class InstanceIds:
    """The previous solve's instances (id -> persistent Gaussian ids) and the next fresh id."""

    def __init__(self, match_min_share: float):
        self.match_min_share = match_min_share
        self.previous: dict[int, np.ndarray] = {}
        self.next_id = 1

    def assign(self, priors: list[np.ndarray], existing: Optional[np.ndarray]) -> tuple[list[int], list[TrackerEvent]]:
        """Ids for the new clusters' priors (sorted persistent ids each). existing: sorted ids of
        the Gaussians still in the map (None: all are). Updates the previous instances."""
        previous_ids = sorted(self.previous)
        owner: dict[int, int] = {}
        if previous_ids and priors:
            previous = [self.previous[i] for i in previous_ids]
            if existing is not None:
                previous = [p[lookup(existing, p) >= 0] for p in previous]
            lists = priors + previous
            _, columns = np.unique(np.concatenate(lists), return_inverse=True)
            rows = np.repeat(np.arange(len(lists)), [p.size for p in lists])
            incidence = sparse.csr_matrix((np.ones(columns.size, np.float32), (rows, columns.reshape(-1))),
                                          shape=(len(lists), int(columns.max()) + 1 if columns.size else 0))
            overlap = (incidence[:len(priors)] @ incidence[len(priors):].T).toarray()  # (new, previous)
            previous_sizes = np.array([p.size for p in previous], dtype=np.float64)
            share = overlap / np.maximum(previous_sizes, 1.0)[None, :]
            best = np.argmax(share, axis=0)
            for j, instance_id in enumerate(previous_ids):
                if previous_sizes[j] > 0 and share[best[j], j] >= self.match_min_share:
                    owner[instance_id] = int(best[j])
        carried: dict[int, list[int]] = {}
        for instance_id, cluster in owner.items():
            carried.setdefault(cluster, []).append(instance_id)
        ids: list[int] = []
        events: list[TrackerEvent] = []
        for cluster in range(len(priors)):
            received = sorted(carried.get(cluster, []))
            if received:
                ids.append(received[0])
                if len(received) > 1:
                    events.append(TrackerEvent("merged", received[0], tuple(received[1:])))
            else:
                ids.append(self.next_id)
                events.append(TrackerEvent("created", self.next_id))
                self.next_id += 1
        events.extend(TrackerEvent("removed", i) for i in previous_ids if i not in owner)
        self.previous = dict(zip(ids, priors))
        return ids, events
