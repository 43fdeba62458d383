"""The field's 2D labels corrected by the 3D priors (core/prior_labels.py): real renders of the
blob scene, and the relabelling rule on a hand-made weight image."""
import numpy as np
import pytest

from instascene_ros.core.features.synthetic import make_blob_scene
from instascene_ros.core import prior_labels
from instascene_ros.core.prior_labels import corrected_labels, prior_weight_images, relabel_by_priors


@pytest.fixture(scope="module")
def blobs():
    return make_blob_scene()


def test_a_fused_mask_gives_the_small_objects_pixels_back_to_its_prior(blobs):
    # The segmenter fuses the red sphere (1) and the green cube (2) into one mask in view 0, and
    # the tracker put that mask in the sphere's cluster: every fused pixel says instance 1.
    view = 0
    truth, mask = blobs.labels[view], blobs.masks[view].copy()
    fused_id = int(np.bincount(mask[truth == 1]).argmax())
    cube = (truth == 2) & (mask != 0)
    assert cube.sum() > 50 and (truth == 1).sum() > 50
    mask[cube] = fused_id
    consistent = np.where(mask == fused_id, 1, np.where(mask != 0, 3, 0)).astype(np.int32)
    consistent[(truth == 4) & (mask != 0)] = 4
    lazy = corrected_labels(blobs.scene, blobs.priors, [blobs.cameras[view]], [consistent], [mask], 0.5)
    fixed, masks = lazy[0].consistent, lazy[0].masks
    moved = int(np.sum(fixed != consistent))
    # The cube's pixels are the cube's again, in a group of their own, exactly where its prior
    # carries half the blend (most of them: 20% of its Gaussians are in no prior); the sphere's stay.
    share = prior_weight_images(blobs.scene, blobs.priors, [blobs.cameras[view]])[0][..., 1]
    assert np.array_equal(fixed[cube] == 2, share[cube] >= 0.5)
    assert np.mean(fixed[cube] == 2) > 0.6 and moved >= int(np.sum(fixed[cube] == 2))
    cube_groups = np.unique(masks[cube & (fixed == 2)])
    assert cube_groups.size == 1 and cube_groups[0] not in np.unique(mask)
    sphere = (truth == 1) & (mask != 0)
    assert np.mean(fixed[sphere] == 1) > 0.95 and np.mean(masks[sphere] == fused_id) > 0.95
    # No mask, no label: the pixels the segmenter left out stay out.
    assert np.all(fixed[mask == 0] == 0) and np.all(masks[mask == 0] == 0)
    # The blue pair (3 and 4) was labelled 3 for both: the priors split it too.
    pair = (truth == 4) & (mask != 0)
    assert np.mean(fixed[pair] == 4) > 0.6
    # The inputs are not modified.
    assert np.all(consistent[cube] == 1)


def test_prior_weights_are_each_priors_share_of_the_blend(blobs):
    weights = prior_weight_images(blobs.scene, blobs.priors, blobs.cameras[:2])
    assert weights[0].shape == (64, 64, 4)
    for view, w in enumerate(weights):
        truth = blobs.labels[view]
        for k in range(1, 5):
            inside = truth == k
            if inside.sum() < 20:
                continue
            # 80% of each object's Gaussians are in its prior: its share dominates its pixels.
            assert np.median(w[inside, k - 1]) > 0.5
            assert np.median(np.delete(w[inside], k - 1, axis=1).max(axis=1)) < 0.1
        assert w.sum(axis=-1).max() <= 1.0 + 1e-4  # shares of one blend


def test_relabel_rule_on_a_hand_made_weight_image():
    # One row of five pixels: mask 7 (instance 1) over pixels 0-3, no mask at pixel 4.
    masks = np.array([[7, 7, 7, 7, 0]])
    consistent = np.array([[1, 1, 1, 1, 0]])
    instance_ids = np.array([1, 2])
    weights = np.zeros((1, 5, 2), np.float32)
    weights[0, 0] = [0.9, 0.0]  # its own prior
    weights[0, 1] = [0.0, 0.8]  # another prior dominates: moves
    weights[0, 2] = [0.0, 0.4]  # another prior, under half the blend: stays
    weights[0, 3] = [0.3, 0.5]  # another prior at exactly the share: moves
    weights[0, 4] = [0.0, 0.9]  # no mask: stays unlabelled
    fixed, new_masks, moved = relabel_by_priors(consistent, masks, weights, instance_ids, 0.5)
    assert fixed.tolist() == [[1, 2, 1, 2, 0]] and moved == 2
    assert new_masks[0, 1] == new_masks[0, 3] == 8 and new_masks[0, [0, 2, 4]].tolist() == [7, 7, 0]
    # A mask the tracker dropped (consistent 0) is the object dominating most of its pixels (2):
    # those stay in it, unlabelled; the other prior's pixel gets a group of its own.
    fixed, new_masks, moved = relabel_by_priors(np.zeros_like(consistent), masks, weights, instance_ids, 0.5)
    assert fixed.tolist() == [[1, 0, 0, 0, 0]] and moved == 1
    assert new_masks.tolist() == [[8, 7, 7, 7, 0]]
    # Off, or no prior: nothing changes.
    for w, ids in ((weights, instance_ids), (np.zeros((1, 5, 0), np.float32), np.zeros(0, np.int64))):
        fixed, new_masks, moved = relabel_by_priors(consistent, masks, w, ids, 0.0 if w.size else 0.5)
        assert moved == 0 and fixed is consistent and new_masks is masks


def test_labels_are_corrected_only_for_the_keyframes_the_field_reads(blobs, monkeypatch):
    renders = []
    real = prior_labels.prior_weight_images
    monkeypatch.setattr(prior_labels, "prior_weight_images", lambda *a, **k: renders.append(1) or real(*a, **k))
    n = len(blobs.cameras)
    lazy = corrected_labels(blobs.scene, blobs.priors, blobs.cameras, [None] + blobs.masks[1:], blobs.masks, 0.5)
    assert renders == [] and [item.has_consistent for item in lazy] == [False] + [True] * (n - 1)
    assert lazy[0].consistent is None and lazy[0].masks is not None and len(renders) == 1
    lazy[3].consistent, lazy[3].masks, lazy[3].consistent
    assert len(renders) == 2  # once per keyframe read
    with pytest.raises(ValueError, match="prior_label_weight"):
        corrected_labels(blobs.scene, blobs.priors, blobs.cameras, blobs.masks, blobs.masks, 1.5)
