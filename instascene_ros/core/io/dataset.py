"""Dataset folders: nerfstudio `transforms.json` plus depth, input masks and ground truth.

Folder contract (DESIGN.md):
- `transforms.json`: fl_x, fl_y, cx, cy, w, h (top level, or per frame to override);
  `frames[].transform_matrix` = camera-to-world in nerfstudio's OpenGL camera axes.
- per frame: `file_path` (RGB), optional `depth_file_path` (16-bit PNG in units of
  `depth_unit_scale_factor` metres, default millimetres, or float32 .npy metres), optional
  `mask_path` (input 2D instance masks, ids per view), optional `gt_mask_path` (evaluation
  only), optional `split` ("train" / "test").
- `gt_meshes/<id>.ply`: ground-truth meshes in world coordinates, `<id>` = GT mask id.

Loading validates everything before returning anything: a bad file raises `DatasetError`
naming the file and the frame, and no Dataset is half-built. Ground truth is kept apart from
the frames and is reachable only through the explicitly named evaluation accessors.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from instascene_ros.core.camera import OPENGL_TO_OPENCV, Camera, Frame, InvalidFrameError

TRANSFORMS_FILE = "transforms.json"
MANIFEST_FILE = "scene.json"
GT_MESH_DIR = "gt_meshes"
SPLITS = ("train", "test")
# Without explicit splits, every 8th frame is held out (the LLFF / mip-NeRF convention).
DEFAULT_TEST_EVERY = 8
DEFAULT_DEPTH_UNIT = 1e-3  # nerfstudio's default depth_unit_scale_factor: PNG millimetres
MAX_UINT16 = np.iinfo(np.uint16).max
# A pose whose rotation is further than this from orthonormal is not a camera pose.
ROTATION_TOLERANCE = 1e-3
# zlib level 1: files ~15% larger than the default 6, written several times faster.
PNG_COMPRESS_LEVEL = 1


class DatasetError(ValueError):
    """A dataset folder that cannot be loaded; the message names the file and the frame."""


@dataclass
class Dataset:
    """Frames of a dataset folder, in file order. Ground truth is not in the frames."""

    root: Path
    frames: list[Frame]
    _gt_masks: list[Optional[np.ndarray]] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames)

    def __getitem__(self, index: int) -> Frame:
        return self.frames[index]

    @property
    def splits(self) -> list[str]:
        return [frame.meta["split"] for frame in self.frames]

    def held_out_indices(self) -> list[int]:
        """Indices of the held-out frames (split "test"): rendered and scored, never fitted."""
        return [i for i, frame in enumerate(self.frames) if frame.meta.get("split") == "test"]

    def training_indices(self) -> list[int]:
        """Indices of the frames a run may fit (every frame that is not held out)."""
        return [i for i, frame in enumerate(self.frames) if frame.meta.get("split") != "test"]

    def ground_truth_masks(self) -> list[Optional[np.ndarray]]:
        """EVALUATION ONLY: per-frame GT instance masks (int32, ids consistent across views,
        0 = background), aligned with `frames`; None where a frame has none."""
        return list(self._gt_masks)

    def ground_truth_mesh_paths(self) -> dict[int, Path]:
        """EVALUATION ONLY: `gt_meshes/<id>.ply` by GT id (world coordinates)."""
        return ground_truth_mesh_paths(self.root)

    def scene_manifest(self) -> Optional[dict]:
        """EVALUATION ONLY: the generator's scene.json, if the folder has one."""
        path = self.root / MANIFEST_FILE
        return json.loads(path.read_text()) if path.exists() else None


def ground_truth_mesh_paths(root: Path | str) -> dict[int, Path]:
    mesh_dir = Path(root) / GT_MESH_DIR
    if not mesh_dir.is_dir():
        return {}
    paths = {}
    for path in mesh_dir.glob("*.ply"):
        if path.stem.isdigit():
            paths[int(path.stem)] = path
    return dict(sorted(paths.items()))


# ------------------------------------------------------------------------------------------
# loading


@dataclass
class _FrameEntry:
    """One frame of transforms.json, parsed and checked, its files not yet read."""

    index: int
    label: str  # "frame 3 (images/frame_00003.png)" for error messages
    camera: Camera
    rgb_path: Path
    depth_path: Optional[Path]
    mask_path: Optional[Path]
    gt_mask_path: Optional[Path]
    split: Optional[str]
    stamp: float


def load_dataset(path: Path | str, split: Optional[str] = None) -> Dataset:
    """Load a dataset folder (or its transforms.json); `split` keeps only "train" or "test" frames.

    Raises DatasetError naming the file and frame on any missing or malformed input.
    """
    root = Path(path)
    transforms_path = root if root.is_file() else root / TRANSFORMS_FILE
    root = transforms_path.parent
    if split is not None and split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS} or None, got {split!r}")
    if not transforms_path.is_file():
        raise DatasetError(f"{transforms_path}: not found")
    try:
        meta = json.loads(transforms_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{transforms_path}: malformed JSON ({error})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list) or not meta["frames"]:
        raise DatasetError(f"{transforms_path}: needs a non-empty 'frames' list")
    depth_unit = _number(meta, "depth_unit_scale_factor", transforms_path, "top level", DEFAULT_DEPTH_UNIT)

    # Pass 1: parse every entry and check every file exists before any pixel is read.
    entries = [_parse_entry(index, raw, meta, root, transforms_path) for index, raw in enumerate(meta["frames"])]
    if all(entry.split is None for entry in entries):
        for entry in entries:
            entry.split = "test" if entry.index % DEFAULT_TEST_EVERY == 0 else "train"
    elif any(entry.split is None for entry in entries):
        missing = next(entry for entry in entries if entry.split is None)
        raise DatasetError(f"{transforms_path}: {missing.label}: 'split' missing while other frames have one")
    selected = [entry for entry in entries if split is None or entry.split == split]

    # Pass 2: read and check the pixels.
    frames, gt_masks = [], []
    for entry in selected:
        frame, gt_mask = _read_frame(entry, depth_unit)
        frames.append(frame)
        gt_masks.append(gt_mask)
    return Dataset(root=root, frames=frames, _gt_masks=gt_masks)


def _number(container: dict, key: str, file: Path, where: str, default=None) -> float:
    value = container.get(key, default)
    if value is None:
        raise DatasetError(f"{file}: {where}: '{key}' missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DatasetError(f"{file}: {where}: '{key}' is not a finite number ({value!r})")
    return float(value)


def _intrinsics(raw: dict, meta: dict, file: Path, where: str) -> tuple[np.ndarray, int, int]:
    def lookup(key, default=None):
        return _number(raw, key, file, where, default=None) if key in raw else \
            _number(meta, key, file, where, default=default)

    width, height = lookup("w"), lookup("h")
    if width != int(width) or height != int(height) or width <= 0 or height <= 0:
        raise DatasetError(f"{file}: {where}: image size w={width}, h={height} is not a positive integer size")
    if "fl_x" in raw or "fl_x" in meta:
        fx = lookup("fl_x")
        fy = lookup("fl_y", default=fx) if ("fl_y" in raw or "fl_y" in meta) else fx
    elif "camera_angle_x" in meta:  # the Blender-synthetic variant of the format
        fx = fy = 0.5 * width / math.tan(0.5 * lookup("camera_angle_x"))
    else:
        raise DatasetError(f"{file}: {where}: 'fl_x' missing")
    cx = lookup("cx", default=width / 2.0)
    cy = lookup("cy", default=height / 2.0)
    for key in ("k1", "k2", "k3", "k4", "p1", "p2"):
        if key in raw or key in meta:
            if lookup(key) != 0.0:
                raise DatasetError(f"{file}: {where}: lens distortion '{key}' is not supported (undistort first)")
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    return K, int(width), int(height)


def _pose(raw: dict, file: Path, where: str) -> np.ndarray:
    try:
        matrix = np.asarray(raw["transform_matrix"], dtype=np.float64)
    except KeyError:
        raise DatasetError(f"{file}: {where}: 'transform_matrix' missing") from None
    except (TypeError, ValueError):
        raise DatasetError(f"{file}: {where}: 'transform_matrix' is not a numeric matrix") from None
    if matrix.shape == (3, 4):
        matrix = np.vstack([matrix, [0.0, 0.0, 0.0, 1.0]])
    if matrix.shape != (4, 4):
        raise DatasetError(f"{file}: {where}: 'transform_matrix' has shape {matrix.shape}, expected 4x4")
    if not np.all(np.isfinite(matrix)):
        raise DatasetError(f"{file}: {where}: 'transform_matrix' has NaN or infinite entries")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise DatasetError(f"{file}: {where}: 'transform_matrix' last row is not [0, 0, 0, 1]")
    rotation = matrix[:3, :3]
    if abs(np.linalg.det(rotation)) < ROTATION_TOLERANCE:
        raise DatasetError(f"{file}: {where}: 'transform_matrix' is not invertible (singular rotation)")
    if not np.allclose(rotation @ rotation.T, np.eye(3), atol=ROTATION_TOLERANCE) or np.linalg.det(rotation) < 0:
        raise DatasetError(f"{file}: {where}: 'transform_matrix' rotation is not a proper rotation")
    # Re-orthonormalise: JSON round-trips leave ~1e-9 errors that Camera.validate may trip on.
    u, _, vt = np.linalg.svd(rotation)
    matrix[:3, :3] = u @ vt
    return matrix @ OPENGL_TO_OPENCV


def _parse_entry(index: int, raw, meta: dict, root: Path, file: Path) -> _FrameEntry:
    if not isinstance(raw, dict):
        raise DatasetError(f"{file}: frame {index}: not a JSON object")
    if not isinstance(raw.get("file_path"), str):
        raise DatasetError(f"{file}: frame {index}: 'file_path' missing")
    label = f"frame {index} ({raw['file_path']})"
    K, width, height = _intrinsics(raw, meta, file, label)
    camera = Camera(K=K, width=width, height=height, T_world_cam=_pose(raw, file, label))
    try:
        camera.validate()
    except InvalidFrameError as error:
        raise DatasetError(f"{file}: {label}: {error}") from None

    def existing(key: str, required: bool) -> Optional[Path]:
        value = raw.get(key)
        if value is None:
            if required:
                raise DatasetError(f"{file}: {label}: '{key}' missing")
            return None
        if not isinstance(value, str):
            raise DatasetError(f"{file}: {label}: '{key}' is not a path")
        path = _resolve(root, value)
        if not path.is_file():
            raise DatasetError(f"{path}: {label}: {key} file not found")
        return path

    split = raw.get("split")
    if split is not None and split not in SPLITS:
        raise DatasetError(f"{file}: {label}: split {split!r} is not one of {SPLITS}")
    stamp = raw.get("stamp", float(index))
    return _FrameEntry(index=index, label=label, camera=camera, rgb_path=existing("file_path", True),
                       depth_path=existing("depth_file_path", False), mask_path=existing("mask_path", False),
                       gt_mask_path=existing("gt_mask_path", False), split=split,
                       stamp=float(stamp) if isinstance(stamp, (int, float)) else float(index))


def _resolve(root: Path, value: str) -> Path:
    path = Path(value)
    if path.is_absolute():
        return path
    candidate = root / path
    # nerfstudio writes bare stems ("images/frame_00001") for some exporters.
    if not candidate.suffix and not candidate.exists():
        for suffix in (".png", ".jpg", ".jpeg"):
            if candidate.with_suffix(suffix).is_file():
                return candidate.with_suffix(suffix)
    return candidate


def _read_array(path: Path, label: str, colour: bool = False) -> np.ndarray:
    """Pixels of an image (PNG/JPEG) or .npy file; unreadable files raise DatasetError.

    `colour` converts palette / CMYK / grey images to RGB; masks and depth are read as stored.
    """
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        with Image.open(path) as image:
            if colour and image.mode not in ("RGB", "RGBA"):
                image = image.convert("RGB")
            return np.array(image)
    except Exception as error:  # PIL raises many types for corrupt files
        raise DatasetError(f"{path}: {label}: unreadable ({type(error).__name__}: {error})") from None


def _read_rgb(path: Path, label: str) -> np.ndarray:
    pixels = _read_array(path, label, colour=True)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise DatasetError(f"{path}: {label}: RGB image has shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        raise DatasetError(f"{path}: {label}: RGB image must be 8-bit, got {pixels.dtype}")
    return np.ascontiguousarray(pixels[:, :, :3])


def _read_depth(path: Path, label: str, depth_unit: float) -> np.ndarray:
    pixels = _read_array(path, label)
    if pixels.ndim != 2:
        raise DatasetError(f"{path}: {label}: depth must be single-channel, got shape {pixels.shape}")
    if path.suffix.lower() == ".npy":
        return pixels.astype(np.float32)
    if not np.issubdtype(pixels.dtype, np.integer):
        raise DatasetError(f"{path}: {label}: depth PNG must be integer (16-bit), got {pixels.dtype}")
    return (pixels.astype(np.float64) * depth_unit).astype(np.float32)


def _read_mask(path: Path, label: str) -> np.ndarray:
    pixels = _read_array(path, label)
    if pixels.ndim != 2 or not np.issubdtype(pixels.dtype, np.integer):
        raise DatasetError(f"{path}: {label}: mask must be a single-channel integer image, got "
                           f"{pixels.shape} {pixels.dtype}")
    return pixels.astype(np.int32)


def _read_frame(entry: _FrameEntry, depth_unit: float) -> tuple[Frame, Optional[np.ndarray]]:
    label = entry.label
    rgb = _read_rgb(entry.rgb_path, label)
    depth = _read_depth(entry.depth_path, label, depth_unit) if entry.depth_path else None
    mask = _read_mask(entry.mask_path, label) if entry.mask_path else None
    gt_mask = _read_mask(entry.gt_mask_path, label) if entry.gt_mask_path else None
    expected = (entry.camera.height, entry.camera.width)
    for name, path, pixels in (("depth", entry.depth_path, depth), ("mask", entry.mask_path, mask),
                               ("gt_mask", entry.gt_mask_path, gt_mask)):
        if pixels is not None and pixels.shape[:2] != expected:
            raise DatasetError(f"{path}: {label}: {name} is {pixels.shape[1]}x{pixels.shape[0]}, "
                               f"the camera is {expected[1]}x{expected[0]}")
    frame = Frame(rgb=rgb, camera=entry.camera, stamp=entry.stamp, depth=depth, mask=mask,
                  name=entry.rgb_path.stem,
                  meta={"split": entry.split, "index": entry.index, "file_path": str(entry.rgb_path)})
    try:
        frame.validate()
    except InvalidFrameError as error:
        raise DatasetError(f"{entry.rgb_path}: {label}: {error}") from None
    return frame, gt_mask


# ------------------------------------------------------------------------------------------
# writing


def _write_png16(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels.astype(np.uint16)).save(path, compress_level=PNG_COMPRESS_LEVEL)


def depth_to_png_units(depth_m: np.ndarray, depth_unit: float = DEFAULT_DEPTH_UNIT) -> np.ndarray:
    """Metres -> 16-bit integer units; invalid (0, inf, NaN) and out-of-range depths become 0."""
    units = np.where(np.isfinite(depth_m) & (depth_m > 0), np.round(depth_m / depth_unit), 0.0)
    units[units > MAX_UINT16] = 0
    return units.astype(np.uint16)


class DatasetWriter:
    """Writes a dataset folder frame by frame; `close()` writes transforms.json.

    Poses are given as camera-to-world in OpenCV axes (the project's convention) and stored in
    nerfstudio's OpenGL axes.
    """

    def __init__(self, root: Path | str, K: np.ndarray, width: int, height: int,
                 depth_unit: float = DEFAULT_DEPTH_UNIT, extra: Optional[dict] = None):
        self.root = Path(root)
        self.K = np.asarray(K, dtype=float)
        self.width, self.height = int(width), int(height)
        self.depth_unit = depth_unit
        self.extra = dict(extra or {})
        self.entries: list[dict] = []
        for folder in ("images", "depth", "masks", "gt_masks"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    def add_frame(self, rgb: np.ndarray, T_world_cam: np.ndarray, depth: Optional[np.ndarray] = None,
                  mask: Optional[np.ndarray] = None, gt_mask: Optional[np.ndarray] = None,
                  split: Optional[str] = None, name: Optional[str] = None) -> dict:
        """Write one frame's files; returns its transforms.json entry."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        expected = (self.height, self.width)
        if rgb.shape[:2] != expected:
            raise ValueError(f"rgb is {rgb.shape[1]}x{rgb.shape[0]}, the dataset is {self.width}x{self.height}")
        for array, what in ((mask, "mask"), (gt_mask, "gt_mask")):
            if array is not None and (array.min(initial=0) < 0 or array.max(initial=0) > MAX_UINT16):
                raise ValueError(f"{what} ids must lie in 0..{MAX_UINT16} for a 16-bit PNG")
        name = name or f"frame_{len(self.entries):05d}"
        entry: dict = {"file_path": f"images/{name}.png"}
        Image.fromarray(np.ascontiguousarray(rgb[:, :, :3]).astype(np.uint8)).save(self.root / entry["file_path"],
                                                                                  compress_level=PNG_COMPRESS_LEVEL)
        if depth is not None:
            entry["depth_file_path"] = f"depth/{name}.png"
            _write_png16(self.root / entry["depth_file_path"], depth_to_png_units(depth, self.depth_unit))
        if mask is not None:
            entry["mask_path"] = f"masks/{name}.png"
            _write_png16(self.root / entry["mask_path"], mask)
        if gt_mask is not None:
            entry["gt_mask_path"] = f"gt_masks/{name}.png"
            _write_png16(self.root / entry["gt_mask_path"], gt_mask)
        if split is not None:
            entry["split"] = split
        entry["transform_matrix"] = (np.asarray(T_world_cam, dtype=float) @ OPENGL_TO_OPENCV).tolist()
        self.entries.append(entry)
        return entry

    def close(self) -> Path:
        """Write transforms.json (atomically: a reader never sees half a file); returns its path."""
        meta = {
            "camera_model": "OPENCV",
            "fl_x": float(self.K[0, 0]), "fl_y": float(self.K[1, 1]),
            "cx": float(self.K[0, 2]), "cy": float(self.K[1, 2]),
            "w": self.width, "h": self.height,
            "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
            "depth_unit_scale_factor": self.depth_unit,
            **self.extra,
            "frames": self.entries,
        }
        path = self.root / TRANSFORMS_FILE
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(meta, indent=1))
        os.replace(temporary, path)
        return path


def write_dataset(root: Path | str, frames: Sequence[Frame], gt_masks: Optional[Sequence[Optional[np.ndarray]]] = None,
                  splits: Optional[Sequence[Optional[str]]] = None) -> Path:
    """Write frames that share one camera model as a dataset folder; returns transforms.json."""
    if not frames:
        raise ValueError("no frames to write")
    first = frames[0].camera
    writer = DatasetWriter(root, first.K, first.width, first.height)
    for index, frame in enumerate(frames):
        if not np.allclose(frame.camera.K, first.K) or (frame.camera.width, frame.camera.height) != (first.width, first.height):
            raise ValueError(f"frame {index} has other intrinsics than frame 0; write one folder per camera")
        split = splits[index] if splits is not None else frame.meta.get("split")
        writer.add_frame(frame.rgb, frame.T_world_cam, depth=frame.depth, mask=frame.mask,
                         gt_mask=gt_masks[index] if gt_masks is not None else None, split=split,
                         name=frame.name or None)
    return writer.close()
