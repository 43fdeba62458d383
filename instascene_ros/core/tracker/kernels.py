"""The tracker's one heavy loop (numba; nogil so ROS executor threads stay responsive, cached)."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def frame_statistics(first, last, tracker_ptr, tracker_cols, tracker_frame, labelled_ptr, labelled_tracker,
                     unlabelled_ptr, unlabelled_frame, n_frames):  # pragma: no cover - compiled
    """Per tracker a in [first, last) and frame k, over a's Gaussians:
    seen (visible in k), labelled (in exactly one mask of k), best_count / best_tracker (the mask
    of k holding most of them, ties to the lower tracker index) and masks_met (masks of k met).
    a's own frame stays 0 / -1.

    Inputs (CSR, G = Gaussian columns): tracker_ptr / tracker_cols, a's Gaussians; tracker_frame,
    frame of each tracker; labelled_ptr / labelled_tracker, for each Gaussian the masks holding it
    (at most one per frame); unlabelled_ptr / unlabelled_frame, for each Gaussian the frames that
    see it outside any mask (or inside several). Since a Gaussian lists at most one mask per frame,
    in a's own frame it can only list a itself: skipping b == a skips the own frame.
    Cost: sum over a's Gaussians of the frames that see them; scratch is one int per tracker.
    """
    n = last - first
    n_trackers = tracker_frame.shape[0]
    seen = np.zeros((n, n_frames), np.int32)
    labelled = np.zeros((n, n_frames), np.int32)
    best_count = np.zeros((n, n_frames), np.int32)
    best_tracker = np.full((n, n_frames), -1, np.int64)
    masks_met = np.zeros((n, n_frames), np.int32)
    scratch = np.zeros(n_trackers, np.int32)
    touched = np.empty(n_trackers, np.int64)
    for a in range(first, last):
        r = a - first
        own = tracker_frame[a]
        n_touched = 0
        for p in range(tracker_ptr[a], tracker_ptr[a + 1]):
            g = tracker_cols[p]
            for q in range(labelled_ptr[g], labelled_ptr[g + 1]):
                b = labelled_tracker[q]
                count = scratch[b]
                if count == 0:
                    touched[n_touched] = b
                    n_touched += 1
                scratch[b] = count + 1
            for q in range(unlabelled_ptr[g], unlabelled_ptr[g + 1]):
                k = unlabelled_frame[q]
                if k != own:
                    seen[r, k] += 1
        for t in range(n_touched):
            b = touched[t]
            count = scratch[b]
            scratch[b] = 0
            if b == a:
                continue
            k = tracker_frame[b]
            labelled[r, k] += count
            seen[r, k] += count
            masks_met[r, k] += 1
            if count > best_count[r, k] or (count == best_count[r, k] and b < best_tracker[r, k]):
                best_count[r, k] = count
                best_tracker[r, k] = b
    return seen, labelled, best_count, best_tracker, masks_met
