"""Scoring a run: which held-out pixels a training view saw, and `instascene run`'s output contract
on a small generated scene (a real pybullet render, the real mapper, no ROS)."""
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import trimesh

from instascene_ros.core.camera import Camera, Frame
from instascene_ros.core.evaluation import observed_pixels


def _frame(camera: Camera, depth: np.ndarray) -> Frame:
    return Frame(rgb=np.zeros((camera.height, camera.width, 3), np.uint8), camera=camera, depth=depth.astype(np.float32))


def _camera(size: int, focal: float, x: float = 0.0) -> Camera:
    pose = np.eye(4)
    pose[0, 3] = x
    return Camera(K=np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1.0]]), width=size, height=size,
                  T_world_cam=pose)


def test_observed_pixels_needs_a_view_that_sees_the_surface_unoccluded():
    # A wall at z = 1 m. The training view (same pose, half the field of view: focal 40 on 40 px
    # against focal 20 on 40 px) sees only the centre 20 x 20 pixels of the held-out view, and a
    # card at 0.5 m hides its own centre 10 x 10 pixels (held-out pixels 15..24) of the wall.
    held_out = _frame(_camera(40, 20.0), np.full((40, 40), 1.0))
    held_out.depth[0, 0] = 0.0  # no return: the learned background, counted as observed
    training_depth = np.full((40, 40), 1.0)
    training_depth[10:30, 10:30] = 0.5
    training = _frame(_camera(40, 40.0), training_depth)
    observed = observed_pixels(held_out, [training])
    expected = np.zeros((40, 40), bool)
    expected[10:30, 10:30] = True
    expected[15:25, 15:25] = False
    expected[0, 0] = True
    assert (observed == expected).all()
    # A second view moved sideways sees the wall behind the card: those pixels become observed.
    beside = _frame(_camera(40, 40.0, x=0.2), np.full((40, 40), 1.0))
    observed = observed_pixels(held_out, [training, beside])
    assert observed[15:25, 15:25].all() and not observed[1, 1]
    # Without depth (RGB-only datasets) there is nothing to decide with.
    assert observed_pixels(held_out, [Frame(rgb=training.rgb, camera=training.camera)]) is None


@pytest.fixture(scope="module")
def small_scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("run_scene") / "scene"
    subprocess.run([sys.executable, "-m", "instascene_ros.cli", "make-scene", str(path), "--seed", "3", "--views", "10",
                    "--test-views", "3", "--res", "64", "--objects", "4", "--mask-noise", "0", "--no-progress"],
                   check=True, capture_output=True, timeout=300)
    return path


def test_run_writes_the_metrics_contract_and_keeps_the_training_depth_for_scoring(small_scene, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "instascene_ros.cli", "run", str(small_scene), "--out", str(out),
                             "--no-masks", "--no-depth", "--finish-seconds", "3", "--no-progress"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    transforms = json.loads((small_scene / "transforms.json").read_text())
    test_paths = [f["file_path"] for f in transforms["frames"] if f.get("split") == "test"]
    assert len(test_paths) == 3 and [p.split("/")[-1] for p in metrics["held_out"]] == [p.split("/")[-1]
                                                                                       for p in test_paths]
    for key in ("psnr", "ssim", "psnr_object", "wall_s", "psnr_observed", "observed_fraction"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["rgb_only"] is True
    # RGB-only mapping must not strip the dataset's depth before scoring: the observed-pixel
    # PSNR is computed from the training views' true depth.
    assert 0.5 < metrics["observed_fraction"] <= 1.0
    assert metrics["psnr"] > 10.0 and 0.0 < metrics["ssim"] <= 1.0
    assert metrics["n_gaussians"] > 0
    assert len(trimesh.load(out / "scene.ply").vertices) == metrics["n_gaussians"]
    assert sorted(p.name for p in (out / "renders").iterdir()) == sorted(p.split("/")[-1] for p in test_paths)


def test_bench_live_rescore_scores_the_saved_maps_again_and_keeps_the_stream_measurements(small_scene, tmp_path):
    from instascene_ros.cli import main

    work = tmp_path / "work"
    offline = work / "offline-s3-r64-v10"
    result = subprocess.run([sys.executable, "-m", "instascene_ros.cli", "run", str(small_scene), "--out", str(offline),
                             "--finish-seconds", "3", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((offline / "metrics.json").read_text())
    assert metrics["n_instances"] > 0
    (work / "live-s3").mkdir()
    shutil.copy(offline / "map.instascene", work / "live-s3" / "map.instascene")
    bench_json = tmp_path / "live.json"
    stale = {"miou": -1.0, "biou": -1.0, "pq_scene": -1.0, "cloud_precision": -1.0, "n_instances": -1}
    bench_json.write_text(json.dumps({"scene": str(small_scene), "targets": {}, "rows": {
        "offline": {**stale, "psnr": 12.5}, "live": {**stale, "frames_in": 123.0, "rss_trend_mb_per_min": 0.5}}}))
    args = ["bench", "live", "--rescore", "--seed", "3", "--res", "64", "--views", "10", "--work", str(work)]
    assert main(args + ["--json", str(bench_json), "--rows", "offline,live"]) == 0
    rows = json.loads(bench_json.read_text())["rows"]
    for name in ("offline", "live"):  # the same map: the run's own scores, read again
        assert rows[name]["rescored"] is True
        for key in ("miou", "biou", "pq_scene", "cloud_precision", "n_instances"):
            assert rows[name][key] == pytest.approx(metrics[key]), (name, key)
        assert rows[name]["per_object_iou"] == pytest.approx(metrics["per_object_iou"])
    assert rows["offline"]["psnr"] == 12.5  # not a score of the instances: kept as measured
    assert rows["live"]["frames_in"] == 123.0 and rows["live"]["rss_trend_mb_per_min"] == 0.5
    # Refused before any work: a row without its saved map, or no measurements to keep.
    with pytest.raises(SystemExit, match="live-pose-noise"):
        main(args + ["--json", str(bench_json), "--rows", "live,live-pose-noise"])
    with pytest.raises(SystemExit, match="--json"):
        main(args + ["--rows", "live"])


def test_bench_live_names_the_objects_that_make_a_gap_between_rows():
    """A row's mIoU gap is usually one or two objects lost or found: those are listed, the rest
    (within 0.2 everywhere) are not, and a row without per-object scores is left out."""
    from instascene_ros.commands.bench_live import objects_that_differ

    rows = {"offline": {"per_object_iou": {"1": 0.9, "2": 0.8, "10": 0.62}},
            "live": {"per_object_iou": {"1": 0.0, "2": 0.75, "10": 0.76}},
            "live-pose-noise": {"per_object_iou": {"1": 0.88, "2": 0.95, "10": 0.85}},
            "live-unrefined": {"miou": 50.0}}
    lines = objects_that_differ(rows, ["offline", "live", "live-pose-noise", "live-unrefined"])
    assert lines == ["  object 1: offline 0.90, live 0.00, live-pose-noise 0.88",
                     "  object 10: offline 0.62, live 0.76, live-pose-noise 0.85"]
    assert objects_that_differ(rows, ["offline", "live-unrefined"]) == []


def test_bench_live_memory_trend_reads_the_held_memory_once_per_release_beside_every_sample():
    """The every-sample trend follows where the swings of the working set fall; the trend after
    each release follows what is held. A 2 MB/min growth under a 160 MB swing whose peaks crowd
    the stream's end (as a busier phase would): only the held trend finds the 2 MB/min. With
    the keyframe store growing too (0.5 MB a keyframe, reported at each release), the trend
    of held memory less the store is the 2 MB/min that is not the map."""
    from instascene_ros.commands.bench_live import _memory_trend

    history, releases = [], 0
    for step in range(1200):  # 10 minutes at 2 Hz
        t = step * 0.5
        keyframes = min(step // 8, 120)
        held = 600.0 + 2.0 * t / 60.0
        if step % 30 == 0:  # a release every 15 s; diagnostics repeat its value until the next
            releases += 1
            after, store = held, 0.5 * keyframes
        swing = 160.0 if (t > 450 and step % 3) else 0.0
        history.append((t, {"rss_mb": str(held + swing), "rss_after_release_mb": str(after),
                            "memory_releases": str(releases), "keyframes": str(keyframes),
                            "keyframe_store_mb": str(store)}))
    trend = _memory_trend(history, 0.0, 599.5)
    assert trend["rss_held_trend_mb_per_min"] == pytest.approx(2.0, abs=1e-6)
    assert trend["rss_held_points"] == 20  # one point per release in the second half, not 600
    assert trend["rss_trend_mb_per_min"] > 20.0  # the swing's timing, read as growth
    assert trend["keyframes_at_half"] == 75 and trend["rss_max_mb"] == pytest.approx(600.0 + 2.0 * 599.5 / 60 + 160)
    # held memory here excludes the store, so less it the trend falls below the 2 MB/min
    # by the store's own trend (it grows 7.5 MB/min until the 120th keyframe at 8 min)
    assert trend["rss_held_beyond_keyframes_trend_mb_per_min"] < 2.0 - 3.0
    assert trend["keyframe_store_second_half_mb"] == pytest.approx(0.5 * (120 - 75))

    # the store inside the held memory, as the node measures it: less the store, 2 MB/min is left
    for t, values in history:
        values["rss_after_release_mb"] = str(float(values["rss_after_release_mb"]) + float(values["keyframe_store_mb"]))
    trend = _memory_trend(history, 0.0, 599.5)
    assert trend["rss_held_trend_mb_per_min"] > 2.0 + 3.0
    assert trend["rss_held_beyond_keyframes_trend_mb_per_min"] == pytest.approx(2.0, abs=1e-6)
    # a node without the diagnostic: no such trend rather than a wrong one
    for t, values in history:
        del values["keyframe_store_mb"]
    assert _memory_trend(history, 0.0, 599.5)["rss_held_beyond_keyframes_trend_mb_per_min"] is None
