"""Spatial Gaussian tracker: cross-view association of 2D masks by view consensus (pipeline step 2).

InstaScene (ICCV 2025) traces every 2D mask m_ij of view i into the Gaussians that render it, its
*tracker* P_ij (contributors while transmittance > 0.5), and clusters masks across views with
MaskClustering's view consensus (Yan et al., CVPR 2024), with Gaussians in place of MaskClustering's
back-projected points. Persistent Gaussian ids (`GaussianScene.ids`) make trackers comparable
across views and over time.

Modules, in pipeline order:
- `trace`: `trackers_from_contributors`, one frame's contributor CSR -> its trackers + visible set.
- `statistics`: every tracker judged by every other frame (visible / judged / contained / split),
  the under-segmentation filter, the (tracker x frame) and (tracker x mask) matrices. Its one heavy
  loop is the numba kernel in `kernels`.
- `clustering`: view consensus and MaskClustering's iterative clustering over sparse node
  matrices; per cluster, member filtering, prior support and DBSCAN.
- `identity`: stable instance ids across solves, with created / merged / removed events.
- `spatial`: `SpatialTracker` (add_frame / retrace / solve) and the result types.

Choices beyond the papers (each documented where it is made, thresholds in `TrackerConfig`):
- A frame votes on a tracker only where it judges it *and* one of its masks contains it (as in
  MaskClustering, whose `visible_frame` is only set when contained): frames that split a tracker
  feed the under-segmentation filter, frames that leave it unlabelled (missed detection) abstain.
  With a literal "visible" N_vis, one over-segmented view out of ten blocks every link of that
  object at C > 0.9.
- Containment and split shares are taken over the tracker's Gaussians that fall inside masks of
  the frame (MaskClustering's denominator), not over all its visible Gaussians.
- Trackers default to Gaussians with more than half of their frame weight inside the mask
  (`min_pixel_share`), which keeps one frame's trackers disjoint.
- After the clustering, two checks on the finished priors: members that lend their prior almost
  nothing split off as a cluster of their own (`orphan_share`), and two adjacent priors that one
  mask holds the most of in nearly every frame judging both merge (`split_merge_consensus`).
"""
from .config import TrackerConfig
from .identity import TrackerEvent
from .spatial import Instance, SpatialTracker, TrackerResult
from .trace import trackers_from_contributors

__all__ = [
    "TrackerConfig",
    "SpatialTracker",
    "TrackerResult",
    "Instance",
    "TrackerEvent",
    "trackers_from_contributors",
]
