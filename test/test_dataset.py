"""Dataset folders: writer -> loader round trip, conventions, and loud, all-or-nothing errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from instascene_ros.core.camera import OPENGL_TO_OPENCV, Camera, Frame, look_at
from instascene_ros.core.io import dataset as dataset_module
from instascene_ros.core.io.dataset import DatasetError, DatasetWriter, load_dataset, write_dataset

WIDTH, HEIGHT = 40, 30
K = np.array([[35.0, 0.0, 20.5], [0.0, 34.0, 14.5], [0.0, 0.0, 1.0]])
TARGET = np.array([0.1, -0.2, 0.05])


def _frames(count: int, rng: np.random.Generator) -> tuple[list[Frame], list[np.ndarray]]:
    frames, gt_masks = [], []
    for index in range(count):
        angle = 2.0 * np.pi * index / count
        eye = TARGET + np.array([0.6 * np.cos(angle), 0.6 * np.sin(angle), 0.4])
        camera = Camera(K=K, width=WIDTH, height=HEIGHT, T_world_cam=look_at(eye, TARGET))
        depth = rng.uniform(0.3, 2.0, (HEIGHT, WIDTH)).astype(np.float32)
        depth[0, :5] = 0.0  # invalid pixels survive as 0
        frames.append(Frame(rgb=rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8), camera=camera,
                            depth=depth, mask=rng.integers(0, 5, (HEIGHT, WIDTH)).astype(np.int32),
                            name=f"frame_{index:05d}", meta={"split": "test" if index == count - 1 else "train"}))
        gt_masks.append(rng.integers(0, 300, (HEIGHT, WIDTH)).astype(np.int32))
    return frames, gt_masks


@pytest.fixture
def folder(tmp_path):
    frames, gt_masks = _frames(5, np.random.default_rng(0))
    write_dataset(tmp_path, frames, gt_masks)
    return tmp_path, frames, gt_masks


def _edit_transforms(root, edit):
    path = root / "transforms.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_round_trip_keeps_pixels_poses_and_splits(folder):
    root, frames, gt_masks = folder
    loaded = load_dataset(root)
    assert len(loaded) == len(frames)
    for original, frame in zip(frames, loaded):
        assert np.array_equal(frame.rgb, original.rgb)
        assert np.array_equal(frame.mask, original.mask)
        assert frame.depth.dtype == np.float32
        assert np.max(np.abs(frame.depth - original.depth)) <= 0.0005 + 1e-6  # millimetre PNG
        assert np.all(frame.depth[0, :5] == 0.0)
        assert np.allclose(frame.camera.K, K)
        assert np.allclose(frame.T_world_cam, original.T_world_cam, atol=1e-9)
        assert frame.meta["split"] == original.meta["split"]
    for expected, mask in zip(gt_masks, loaded.ground_truth_masks()):
        assert np.array_equal(mask, expected)
    assert [f.meta["split"] for f in load_dataset(root, split="test")] == ["test"]
    assert len(load_dataset(root, split="train")) == 4


def test_transform_matrix_is_nerfstudio_opengl_and_loads_as_opencv(folder):
    root, frames, _ = folder
    meta = json.loads((root / "transforms.json").read_text())
    stored = np.array(meta["frames"][0]["transform_matrix"])
    # OpenGL camera looks down its -z: the target must be in front along -z of the stored pose
    to_target = TARGET - stored[:3, 3]
    assert to_target @ stored[:3, 2] < 0
    assert np.allclose(stored @ OPENGL_TO_OPENCV, frames[0].T_world_cam)
    assert (meta["fl_x"], meta["fl_y"], meta["cx"], meta["cy"], meta["w"], meta["h"]) == (35.0, 34.0, 20.5, 14.5, 40, 30)
    camera = load_dataset(root)[0].camera
    pixel, z = camera.project(TARGET[None])
    assert z[0] > 0 and np.allclose(pixel[0], [camera.cx, camera.cy], atol=1e-6)  # look_at centre


def test_ground_truth_stays_out_of_the_frames(folder):
    root, _, gt_masks = folder
    for frame, gt in zip(load_dataset(root), gt_masks):
        assert not np.array_equal(frame.mask, gt)
        assert not any(isinstance(value, np.ndarray) for value in frame.meta.values())
        assert "gt" not in " ".join(frame.meta)


def test_default_split_holds_out_every_eighth_frame(tmp_path):
    frames, _ = _frames(17, np.random.default_rng(1))
    for frame in frames:
        frame.meta.pop("split")
    write_dataset(tmp_path, frames)
    dataset = load_dataset(tmp_path)
    assert [i for i, split in enumerate(dataset.splits) if split == "test"] == [0, 8, 16]
    assert dataset.held_out_indices() == [0, 8, 16]
    assert dataset.training_indices() == [i for i in range(17) if i not in (0, 8, 16)]


def test_float_npy_depth_and_per_frame_intrinsics(tmp_path):
    frames, _ = _frames(2, np.random.default_rng(2))
    write_dataset(tmp_path, frames)
    np.save(tmp_path / "depth" / "exact.npy", frames[1].depth)

    def edit(meta):
        meta["frames"][1]["depth_file_path"] = "depth/exact.npy"
        meta["frames"][1]["fl_x"] = 50.0
    _edit_transforms(tmp_path, edit)
    loaded = load_dataset(tmp_path)
    assert np.array_equal(loaded[1].depth, frames[1].depth)  # metres, no quantisation
    assert loaded[1].camera.fx == 50.0 and loaded[0].camera.fx == 35.0


@pytest.mark.parametrize("case, expected", [
    ("missing_image", ["frame_00003.png", "frame 3"]),
    ("nan_pose", ["transforms.json", "frame 2", "NaN"]),
    ("singular_pose", ["transforms.json", "frame 4", "invertible"]),
    ("mask_size", ["frame_00001.png", "frame 1"]),
    ("no_focal", ["transforms.json", "fl_x"]),
])
def test_bad_input_names_the_file_and_frame(folder, case, expected):
    root, _, _ = folder
    if case == "missing_image":
        (root / "images" / "frame_00003.png").unlink()
    elif case == "nan_pose":
        _edit_transforms(root, lambda meta: meta["frames"][2]["transform_matrix"][0].__setitem__(3, float("nan")))
    elif case == "singular_pose":
        singular = np.eye(4)
        singular[:3, 0] = 0.0  # a camera with no x axis: rank-deficient, not invertible
        _edit_transforms(root, lambda meta: meta["frames"][4].__setitem__("transform_matrix", singular.tolist()))
    elif case == "mask_size":
        from PIL import Image
        Image.fromarray(np.zeros((HEIGHT + 1, WIDTH), dtype=np.uint16)).save(root / "masks" / "frame_00001.png")
    elif case == "no_focal":
        _edit_transforms(root, lambda meta: meta.pop("fl_x"))
    with pytest.raises(DatasetError) as raised:
        load_dataset(root)
    for text in expected:
        assert text in str(raised.value)


def test_malformed_json_is_a_dataset_error(folder):
    root, _, _ = folder
    (root / "transforms.json").write_text('{"frames": [')
    with pytest.raises(DatasetError, match="transforms.json.*malformed"):
        load_dataset(root)


@pytest.mark.parametrize("case", ["missing_last_image", "bad_last_pose"])
def test_nothing_is_read_before_every_frame_is_checked(folder, monkeypatch, case):
    """A broken last frame is found before a single pixel of the first frame is read."""
    root, _, _ = folder
    if case == "missing_last_image":
        (root / "images" / "frame_00004.png").unlink()
    else:
        _edit_transforms(root, lambda meta: meta["frames"][4].__setitem__("transform_matrix", [[1, 2], [3, 4]]))
    reads = []
    original = dataset_module._read_array
    monkeypatch.setattr(dataset_module, "_read_array", lambda *args, **kw: reads.append(args) or original(*args, **kw))
    with pytest.raises(DatasetError, match="frame 4"):
        load_dataset(root)
    assert reads == []


def test_writer_refuses_what_a_16_bit_png_cannot_hold(tmp_path):
    writer = DatasetWriter(tmp_path, K, WIDTH, HEIGHT)
    rgb = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="16-bit"):
        writer.add_frame(rgb, np.eye(4), mask=np.full((HEIGHT, WIDTH), 70000, dtype=np.int32))
    with pytest.raises(ValueError, match="split"):
        writer.add_frame(rgb, np.eye(4), split="validation")
