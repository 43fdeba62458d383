"""Per (tracker, frame) judgements: visible, judged, contained by a mask, split; the
under-segmentation filter; the observation and containment matrices the consensus is made of.

A tracker a (a mask of frame i) is judged by every other frame k (MaskClustering's judgement):
- visible in k: >= visible_fraction of a's Gaussians are in k's visible set;
- judged by k: visible, and >= min_labelled_share of those visible Gaussians lie in exactly one
  mask of k (else the segmenter said nothing there, or the Gaussians sit on a boundary between two
  masks of k: the frame abstains);
- contained by mask m of k: m holds >= contained_fraction of a's Gaussians labelled in k;
- split in k: it meets several masks of k and the largest holds < undersegment_share of them
  (or, with undersegment_cover > 0, it holds >= that share of another mask of k besides the
  largest: `_second_mask_cover`).
A mask split in >= undersegment_frame_ratio of the frames judging it is under-segmented and
dropped; as in MaskClustering, a dropped mask stops being a container, and the trackers it
contained no longer count its frame as an observer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import scipy.sparse as sparse

from ._arrays import IdIndex
from .config import TrackerConfig
from .kernels import frame_statistics


@dataclass
class FrameRecord:
    """What the tracker keeps of one frame."""

    mask_ids: np.ndarray  # (n,) int64, every non-zero id of the view's mask
    trackers: dict[int, np.ndarray]  # mask id -> sorted unique persistent Gaussian ids (non-empty)
    visible: np.ndarray  # sorted unique persistent ids contributing anywhere (trackers included)

    @property
    def nbytes(self) -> int:
        return self.mask_ids.nbytes + self.visible.nbytes + sum(ids.nbytes for ids in self.trackers.values())


@dataclass
class Problem:
    """All frames flattened: trackers ordered by frame then mask id, Gaussians as dense columns."""

    frame_indices: np.ndarray  # (F,) the caller's frame indices, sorted
    tracker_frame: np.ndarray  # (M,) position in frame_indices
    tracker_mask: np.ndarray  # (M,) per-view mask id
    gaussian_ids: np.ndarray  # (G,) sorted persistent ids held by some tracker (column -> id)
    incidence: sparse.csr_matrix  # (M, G) tracker x Gaussian, 1 = member
    visibility: sparse.csr_matrix  # (F, G) frame x Gaussian, 1 = visible
    # Filled by `judge`, compressed by Gaussian, (F, G): the Gaussian is in exactly one mask of
    # the frame / it is visible in the frame but in no mask or in several.
    labelled_by_gaussian: Optional[sparse.csc_matrix] = None
    unlabelled_by_gaussian: Optional[sparse.csc_matrix] = None

    @classmethod
    def build(cls, frames: Mapping[int, FrameRecord]) -> "Problem":
        frame_indices = np.array(sorted(frames), dtype=np.int64)
        tracker_frame, tracker_mask, tracker_ids = [], [], []
        for position, frame_index in enumerate(frame_indices.tolist()):
            record = frames[frame_index]
            for mask_id in sorted(record.trackers):
                tracker_frame.append(position)
                tracker_mask.append(mask_id)
                tracker_ids.append(record.trackers[mask_id])
        sizes = np.array([ids.size for ids in tracker_ids], dtype=np.int64)
        all_ids = np.concatenate(tracker_ids) if tracker_ids else np.zeros(0, np.int64)
        index = IdIndex(all_ids)
        # Each tracker's ids are sorted and unique, and columns follow id order: canonical CSR.
        incidence = sparse.csr_matrix(
            (np.ones(all_ids.size, np.int8), index.columns(all_ids), np.concatenate([[0], np.cumsum(sizes)])),
            shape=(sizes.size, len(index)))
        visible_columns = []
        for frame_index in frame_indices.tolist():
            columns = index.columns(frames[frame_index].visible)
            visible_columns.append(np.sort(columns[columns >= 0]))
        visibility = sparse.csr_matrix(
            (np.ones(sum(c.size for c in visible_columns), np.int8),
             np.concatenate(visible_columns) if visible_columns else np.zeros(0, np.int64),
             np.concatenate([[0], np.cumsum([c.size for c in visible_columns])]).astype(np.int64)),
            shape=(frame_indices.size, len(index)))
        return cls(frame_indices=frame_indices, tracker_frame=np.array(tracker_frame, dtype=np.int64),
                   tracker_mask=np.array(tracker_mask, dtype=np.int64), gaussian_ids=index.ids,
                   incidence=incidence, visibility=visibility)

    @property
    def n_trackers(self) -> int:
        return int(self.tracker_frame.size)

    @property
    def n_frames(self) -> int:
        return int(self.frame_indices.size)

    def key(self, tracker: int) -> tuple[int, int]:
        """(frame_index, mask_id) of a tracker."""
        return int(self.frame_indices[self.tracker_frame[tracker]]), int(self.tracker_mask[tracker])


@dataclass
class Observations:
    """What the consensus is computed from (after the under-segmentation filter)."""

    undersegmented: np.ndarray  # (M,) bool
    observed: sparse.csr_matrix  # (M, F) 1 where the frame judged the tracker as contained by a kept mask
    contained: sparse.csr_matrix  # (M, M) 1 where the column's mask contains the row's tracker
    judged_frames: np.ndarray  # (M,) frames that judged the tracker
    split_frames: np.ndarray  # (M,) of those, frames that split it


def _gaussian_major_lists(problem: Problem) -> tuple[np.ndarray, ...]:
    """For each Gaussian column, the masks holding it (at most one per frame) and the frames that
    see it outside any mask; also fills problem.labelled_by_gaussian / unlabelled_by_gaussian."""
    incidence = problem.incidence
    n_gaussians = incidence.shape[1]
    # Trackers are ordered by frame, so in a column equal frames are adjacent: a Gaussian held by
    # two masks of one frame is ambiguous there (MaskClustering's boundary point): seen only.
    by_gaussian = incidence.tocsc()
    by_gaussian.sort_indices()
    entry_tracker = by_gaussian.indices.astype(np.int64)
    entry_gaussian = np.repeat(np.arange(n_gaussians, dtype=np.int64), np.diff(by_gaussian.indptr))
    entry_frame = problem.tracker_frame[entry_tracker]
    duplicate = np.zeros(entry_tracker.size, dtype=bool)
    if entry_tracker.size > 1:
        same = (entry_frame[1:] == entry_frame[:-1]) & (entry_gaussian[1:] == entry_gaussian[:-1])
        duplicate[1:] |= same
        duplicate[:-1] |= same
    single = ~duplicate
    labelled_ptr = np.zeros(n_gaussians + 1, np.int64)
    np.cumsum(np.bincount(entry_gaussian[single], minlength=n_gaussians), out=labelled_ptr[1:])
    labelled_tracker = entry_tracker[single].astype(np.int32)
    problem.labelled_by_gaussian = sparse.csc_matrix(
        (np.ones(labelled_tracker.size, np.int8), entry_frame[single], labelled_ptr), shape=problem.visibility.shape)

    # Visible but in no mask of the frame, or in several: one pass per frame over its trackers.
    holders = np.zeros(n_gaussians, np.int32)
    frame_bounds = np.searchsorted(problem.tracker_frame, np.arange(problem.n_frames + 1))
    indptr, indices = incidence.indptr, incidence.indices
    rows, cols = [], []
    for k in range(problem.n_frames):
        for t in range(frame_bounds[k], frame_bounds[k + 1]):
            holders[indices[indptr[t]:indptr[t + 1]]] += 1
        visible = problem.visibility.indices[problem.visibility.indptr[k]:problem.visibility.indptr[k + 1]]
        outside = visible[holders[visible] != 1]
        holders[indices[indptr[frame_bounds[k]]:indptr[frame_bounds[k + 1]]]] = 0
        rows.append(np.full(outside.size, k, np.int64))
        cols.append(outside)
    unlabelled = sparse.csr_matrix(
        (np.ones(sum(c.size for c in cols), np.int8),
         (np.concatenate(rows) if rows else np.zeros(0, np.int64), np.concatenate(cols) if cols else np.zeros(0, np.int64))),
        shape=problem.visibility.shape).tocsc()
    unlabelled.sort_indices()
    problem.unlabelled_by_gaussian = unlabelled
    return labelled_ptr, labelled_tracker, unlabelled.indptr.astype(np.int64), unlabelled.indices.astype(np.int32)


def _second_mask_cover(problem: Problem, counts: sparse.csr_matrix, first: int, last: int, best_tracker: np.ndarray,
                       sizes: np.ndarray, min_gaussians: int) -> np.ndarray:
    """(last - first, F): for trackers first..last and every frame k, the largest share of another
    tracker of k (of >= min_gaussians Gaussians, not the one holding most of the row's Gaussians
    in k) that the row's tracker holds. A mask that swallowed a small neighbour holds most of that
    neighbour's own mask wherever the segmenter kept the two apart. `counts`: the incidence as
    int32 (its int8 ones would overflow in the product)."""
    shared = (counts[first:last] @ counts.T).tocoo()  # Gaussians in common, tracker pairs
    rows, cols = shared.row, shared.col
    frames = problem.tracker_frame[cols]
    keep = (sizes[cols] >= min_gaussians) & (cols != best_tracker[rows, frames]) & (rows + first != cols)
    cover = np.zeros((last - first, problem.n_frames))
    np.maximum.at(cover, (rows[keep], frames[keep]), shared.data[keep] / sizes[cols[keep]])
    return cover


def judge(problem: Problem, config: TrackerConfig) -> Observations:
    """Judge every tracker in every other frame, apply the under-segmentation filter."""
    n_trackers, n_frames = problem.n_trackers, problem.n_frames
    labelled_ptr, labelled_tracker, unlabelled_ptr, unlabelled_frame = _gaussian_major_lists(problem)
    incidence = problem.incidence
    sizes = np.diff(incidence.indptr)
    tracker_ptr = incidence.indptr.astype(np.int64)
    tracker_cols = incidence.indices.astype(np.int32)
    tracker_frame = problem.tracker_frame.astype(np.int32)
    chunk = max(1, config.statistics_chunk_cells // max(n_frames, 1))
    contained_tracker, contained_frame, container = [], [], []
    judged_frames = np.zeros(n_trackers, np.int64)
    split_frames = np.zeros(n_trackers, np.int64)
    counts = incidence.astype(np.int32) if config.undersegment_cover > 0.0 else None
    for first in range(0, n_trackers, chunk):
        last = min(n_trackers, first + chunk)
        seen, labelled, best_count, best_tracker, masks_met = frame_statistics(
            first, last, tracker_ptr, tracker_cols, tracker_frame, labelled_ptr, labelled_tracker,
            unlabelled_ptr, unlabelled_frame, n_frames)
        size = sizes[first:last, None].astype(np.float64)
        visible = (seen > 0) & (seen >= config.visible_fraction * size)
        judged = visible & (labelled > 0) & (labelled >= config.min_labelled_share * seen)
        share = best_count / np.maximum(labelled, 1)
        contained = judged & (share >= config.contained_fraction)
        split = judged & (masks_met >= 2) & (share < config.undersegment_share)
        if config.undersegment_cover > 0.0:
            cover = _second_mask_cover(problem, counts, first, last, best_tracker, sizes,
                                       config.undersegment_cover_min_gaussians)
            split |= judged & (cover >= config.undersegment_cover)
        judged_frames[first:last] = judged.sum(axis=1)
        split_frames[first:last] = split.sum(axis=1)
        rows, frames = np.nonzero(contained)
        contained_tracker.append(rows + first)
        contained_frame.append(frames)
        container.append(best_tracker[rows, frames])

    def joined(parts: list) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    contained_tracker, contained_frame, container = joined(contained_tracker), joined(contained_frame), joined(container)
    undersegmented = (judged_frames > 0) & (split_frames >= config.undersegment_frame_ratio * judged_frames)
    keep = ~undersegmented[container]
    ones = np.ones(int(keep.sum()), np.int8)
    observed = sparse.csr_matrix((ones, (contained_tracker[keep], contained_frame[keep])), shape=(n_trackers, n_frames))
    contained = sparse.csr_matrix((ones, (contained_tracker[keep], container[keep])), shape=(n_trackers, n_trackers))
    return Observations(undersegmented=undersegmented, observed=observed, contained=contained,
                        judged_frames=judged_frames, split_frames=split_frames)
