"""What a keyframe costs to keep: depth as float16, masks packed, tracker ids as int32, each read
back as its consumers expect (float32 metres, int32 ids), and maps saved before still load."""
import dataclasses
import pickle

import numpy as np
import pytest
import torch

from instascene_ros.core.keyframe_masks import KeyframeMasks
from instascene_ros.core.mapping import Keyframe
from test_mapping import AnalyticScene, orbit_camera, small_config


def test_masks_read_back_exactly_whatever_ids_a_segmenter_chose():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 12, (40, 50)).astype(np.int32)
    sparse = rng.choice(np.array([0, 1000, 2000, 70_000, 2**31 - 1, -5], np.int32), (40, 50))
    many = rng.permutation(np.arange(40 * 50, dtype=np.int32) * 3).reshape(40, 50)  # 2000 distinct ids
    masks = KeyframeMasks({3: small, 7: sparse})
    masks[9] = many
    huge = np.arange(300 * 300, dtype=np.int32).reshape(300, 300)  # more ids than 16 bits can number
    masks[11] = huge
    for index, mask in ((3, small), (7, sparse), (9, many), (11, huge)):
        read = masks[index]
        assert read.dtype == np.int32 and read.shape == mask.shape and np.array_equal(read, mask), index
    # one byte a pixel below 257 distinct ids, two below 65537, the ids themselves beyond
    assert masks._packed[3].codes.dtype == np.uint8 and masks._packed[7].codes.dtype == np.uint8
    assert masks._packed[9].codes.dtype == np.uint16 and masks._packed[11].codes.dtype == np.int32
    # a reader writing into what it got changes nothing held
    masks[3][:] = 99
    assert np.array_equal(masks[3], small)
    # a dict's behaviour: membership, order, pop, len
    assert list(masks) == [3, 7, 9, 11] and 7 in masks and len(masks) == 4
    assert np.array_equal(masks.pop(7), sparse) and 7 not in masks and masks.pop(7, None) is None
    with pytest.raises(ValueError, match="integer id image"):
        masks[12] = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="integer id image"):
        masks[12] = np.zeros(16, np.int32)
    assert 12 not in masks


def test_a_keyframe_is_kept_in_under_two_thirds_of_the_bytes_and_reads_back_as_before(tmp_path):
    from instascene_ros.core.pipeline import Pipeline, PipelineConfig

    scene = AnalyticScene()
    pipeline = Pipeline(PipelineConfig(mapper=small_config(iterations_per_keyframe=2)))
    frames = []
    for az in (0, 40, 80):
        frame = scene.frame(orbit_camera(32, az, 40))
        # a segmenter's sparse ids: 1000 for what it sees, 2000 for its nearer part
        frame.mask = np.where(frame.depth > 0, 1000, 0).astype(np.int32)
        frame.mask[(frame.depth > 0) & (frame.depth < np.median(frame.depth[frame.depth > 0]) - 0.05)] = 2000
        assert pipeline.add_frame(frame).keyframe
        frames.append(frame)
    held = unpacked = 0
    for kf, frame in zip(pipeline.mapper.keyframes, frames):
        valid = frame.depth > 0
        assert kf.depth_half.dtype == torch.float16 and kf.depth.dtype == torch.float32
        depth = kf.depth.numpy()
        # float16: 11 significant bits, so within 2^-11 of the metres given; invalid stays 0
        assert np.all(np.abs(depth[valid] - frame.depth[valid]) <= frame.depth[valid] * 2.0**-11)
        assert np.all(depth[~valid] == 0) and np.abs(depth[valid] - frame.depth[valid]).max() > 0
        assert np.array_equal(pipeline.masks[kf.index], frame.mask)
        record = pipeline.tracker._frames[kf.index]
        ids = [record.visible, *record.trackers.values()]
        assert all(a.dtype == np.int32 for a in ids) and record.visible.size > 0
        held += (kf.rgb.numel() + kf.depth_half.element_size() * kf.depth_half.numel()
                 + pipeline.masks._packed[kf.index].nbytes + sum(a.nbytes for a in ids))
        unpacked += kf.rgb.numel() + 4 * depth.size + 4 * frame.mask.size + sum(8 * a.size for a in ids)
    # uint8 RGB (3 B) + float16 depth (2) + packed mask (1) + int32 ids against 3 + 4 + 4 + int64
    assert held < 0.65 * unpacked, (held, unpacked)
    # a map saved before the masks were packed (format 1, a dict of int32 images) loads packed
    path = tmp_path / "map.instascene"
    pipeline.save(str(path))
    state = torch.load(path, weights_only=False)
    assert state["format"] == 2
    state["format"], state["masks"] = 1, {index: state["masks"][index] for index in state["masks"]}
    torch.save(state, path)
    loaded = Pipeline(pipeline.config)
    loaded.load(str(path))
    assert isinstance(loaded.masks, KeyframeMasks) and list(loaded.masks) == list(pipeline.masks)
    assert all(np.array_equal(loaded.masks[i], pipeline.masks[i]) for i in pipeline.masks)
    # a format this package does not know is refused with the formats it reads, the map untouched
    state["format"] = 3
    torch.save(state, path)
    with pytest.raises(ValueError, match="map format 3 is not supported .this package reads 1, 2"):
        loaded.load(str(path))
    assert list(loaded.masks) == list(pipeline.masks)


def test_keyframes_of_maps_saved_with_float32_depth_load_as_float16():
    camera = orbit_camera(8, 0, 40)
    depth = torch.linspace(0.3, 1.7, 64, dtype=torch.float32).reshape(8, 8)
    kf = Keyframe(index=0, name="0", camera=camera, rgb=torch.zeros(8, 8, 3, dtype=torch.uint8),
                  depth_half=depth.half(), median_depth=1.0)
    # what an earlier map's pickle holds: the same keyframe with float32 `depth`
    state = dict(vars(kf))
    state["depth"] = state.pop("depth_half").float()
    old = Keyframe.__new__(Keyframe)
    old.__setstate__(state)
    assert old.depth_half.dtype == torch.float16 and torch.equal(old.depth, kf.depth)
    assert torch.allclose(old.depth, depth, rtol=2.0**-11, atol=0)
    without = dataclasses.replace(kf, depth_half=None)
    state = dict(vars(without))
    state["depth"] = state.pop("depth_half")
    old = Keyframe.__new__(Keyframe)
    old.__setstate__(state)
    assert old.depth is None and not old.has_depth
    # and a current keyframe round-trips through pickle unchanged
    again = pickle.loads(pickle.dumps(kf))
    assert torch.equal(again.depth_half, kf.depth_half) and again.has_depth
