"""In-situ completion on a table-top seen from one side: shapes, views, pose, bad input.

The fixture (core/complete/tabletop.py) is exact geometry observed from a 90 degree arc, so
every object's back is never seen; what a broken completion gets wrong shows up as low F1
against the ground-truth mesh, a filled cup, a misplaced pose or a non-watertight mesh.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from conftest import kinds_tabletop, small_completion_config
import trimesh

from instascene_ros.core.complete import CompletionConfig, CompletionError, build_context, complete_object
from instascene_ros.core.complete.evaluate import evaluate_completion
from instascene_ros.core.complete.frame import fit_support_plane, refine_plane_on_surface
from instascene_ros.core.complete.raster import rasterise_mesh
from instascene_ros.core.camera import Camera, intrinsics_from_fov, look_at

CUP, BOX, BLOCK = 1, 2, 3




@pytest.fixture(scope="module")
def tabletop():
    kinds = {CUP: ("cup", (-0.05, 0.0)), BOX: ("cube", (0.07, 0.02)), BLOCK: ("l_block", (0.0, 0.09))}
    return kinds_tabletop(kinds, views=20, resolution=112)


@pytest.fixture(scope="module")
def completed(tabletop, torch_one_thread):
    config = small_completion_config()
    results = {}
    for object_id in (CUP, BOX, BLOCK):
        rows, others = tabletop.rows(object_id)
        context = build_context(tabletop.gaussians, rows, others, tabletop.keyframes, config, object_id)
        results[object_id] = (context, complete_object(context, config, "geometric"))
    return results


def test_meshes_are_watertight_complete_and_placed(tabletop, completed):
    for object_id, (_, result) in completed.items():
        truth = tabletop.meshes[object_id]
        mesh = result.mesh_world()
        scores = evaluate_completion(mesh, truth, samples=20_000)
        assert mesh.is_watertight
        assert scores["f1_2pct"] >= 0.75, (object_id, scores["f1_2pct"])
        assert scores["position_error"] < 0.02, (object_id, scores["position_error"])
        # the pose stands the object on the table: the object frame's z = 0 is the table plane
        assert abs(result.T_world_object[2, 3]) < 0.003 and result.T_world_object[2, 2] > 0.999
        assert result.vertices_object[:, 2].min() > -0.004
        assert len(result.faces) <= small_completion_config().mesh.max_faces


def test_completion_beats_the_observed_hull_where_the_back_is_unseen(tabletop, completed):
    """Carving keeps concavities a hull fills: a cup stays hollow, an L stays an L."""
    for object_id in (CUP, BLOCK):
        rows, _ = tabletop.rows(object_id)
        hull = trimesh.PointCloud(tabletop.gaussians.means.numpy()[rows]).convex_hull
        truth = tabletop.meshes[object_id]
        ours = evaluate_completion(completed[object_id][1].mesh_world(), truth, samples=20_000)
        theirs = evaluate_completion(hull, truth, samples=20_000)
        assert ours["volumetric_iou"] >= theirs["volumetric_iou"] + 0.05, (object_id, ours["volumetric_iou"],
                                                                           theirs["volumetric_iou"])
    cup = completed[CUP][1].mesh_world()
    truth = tabletop.meshes[CUP]
    inside_the_cup = truth.bounds.mean(axis=0) + [0, 0, 0.25 * truth.extents[2]]
    assert not cup.contains(inside_the_cup[None])[0], "the cup was filled"


def test_views_unseen_behind_the_object_and_known_in_front(completed):
    context, result = completed[BOX]
    centre = context.frame.T_world_normalised[:3, 3]
    # The arc of cameras spans azimuths -135..-45 degrees around the table's centre.
    facing_the_arc, facing_away = [], []
    for view in context.views:
        direction = view.camera.position - centre
        azimuth = np.rad2deg(np.arctan2(direction[1], direction[0]))
        if abs(azimuth + 90) < 30:
            facing_the_arc.append(view.known)
        if abs(azimuth - 90) < 40:  # the side no camera saw: the map has nothing there
            facing_away.append(view.known)
    assert facing_the_arc and any(facing_the_arc)
    assert facing_away and not any(facing_away)
    assert 2 <= len(context.known_indices) <= 12
    assert result.generated_views == context.unseen_indices
    # generated surface is flagged, observed surface is not
    flags = result.vertex_generated.astype(bool)
    assert 0.1 < flags.mean() < 0.9


def test_symmetry_found_for_a_cup_and_not_claimed_for_an_l_block(completed):
    assert completed[CUP][1].info["symmetry"] == "rotational"
    assert completed[BLOCK][1].info["symmetry"] != "rotational"


def test_support_plane_of_a_tilted_table():
    rng = np.random.default_rng(3)
    normal = np.array([0.1, -0.05, 1.0])
    normal /= np.linalg.norm(normal)
    u = np.cross(normal, [1.0, 0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    table = rng.uniform(-0.2, 0.2, (2000, 2)) @ np.stack([u, v]) + 0.3 * normal
    table += rng.normal(0, 0.0005, table.shape)
    clutter = rng.uniform(-0.05, 0.05, (300, 3)) + 0.3 * normal + 0.05 * normal  # an object above it
    fitted, offset, source = fit_support_plane(np.concatenate([table, clutter[:50]]), clutter)
    assert source == "ransac"
    assert np.rad2deg(np.arccos(fitted @ normal)) < 1.0
    assert offset == pytest.approx(0.3, abs=0.002)


def test_support_plane_moves_from_the_gaussian_means_onto_the_seen_surface():
    # The map's table Gaussians sit 3 mm below the table their renders (and the depth sensor)
    # show; the surface the cameras saw decides the plane. A neighbour's top (4 cm up) and its
    # lowest rim (in the band, few points) must not move it.
    rng = np.random.default_rng(5)
    normal = np.array([0.05, 0.02, 1.0])
    normal /= np.linalg.norm(normal)
    u = np.cross(normal, [1.0, 0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    def on_plane(n, height, half=0.15):
        return rng.uniform(-half, half, (n, 2)) @ np.stack([u, v]) + height * normal
    surface = np.concatenate([on_plane(3000, 0.300) + rng.normal(0, 0.0003, (3000, 3)),
                              on_plane(400, 0.340, half=0.03), on_plane(60, 0.304, half=0.03)])
    obj = on_plane(200, 0.32, half=0.02)
    coarse = normal + np.array([0.01, 0.0, 0.0])  # RANSAC on the means: a little tilted, 3 mm low
    coarse /= np.linalg.norm(coarse)
    fitted, offset, refined = refine_plane_on_surface(coarse, 0.297, surface, obj)
    assert refined
    assert offset == pytest.approx(0.300, abs=0.0005)
    assert np.rad2deg(np.arccos(fitted @ normal)) < 0.3
    # Too little seen surface in the band: the plane stays as it was.
    same, same_offset, refined = refine_plane_on_surface(coarse, 0.297, surface[:20], obj)
    assert not refined and same_offset == 0.297 and np.allclose(same, coarse)
    # A surface tilted by 8 degrees (more than `max_tilt_deg`) keeps the means' normal, but the
    # plane still moves to the surface's height.
    tilt = np.deg2rad(8.0)
    tilted_normal = np.cos(tilt) * normal + np.sin(tilt) * u
    along = np.cross(tilted_normal, v)
    plane_points = rng.uniform(-0.03, 0.03, (3000, 2)) @ np.stack([along, v]) + 0.3 * normal
    kept, kept_offset, refined = refine_plane_on_surface(normal, 0.297, plane_points, obj)
    assert refined and np.allclose(kept, normal)
    assert kept_offset == pytest.approx(0.300, abs=0.001)


def test_marching_cubes_never_puts_vertices_a_nanometre_apart():
    # An exact zero at a grid corner whose neighbours on three axes are inside: marching cubes
    # puts three distinct vertices at that corner (1e-9 m apart at 1 mm voxels with a 1e-6
    # nudge). Anything that reads the mesh and merges close vertices (trimesh's 1e-8 tolerance,
    # float32 files) then sees non-manifold edges. The surface must be closed as returned and
    # after a .ply round trip through a merging reader.
    from instascene_ros.core.complete.volume import VoxelGrid, extract_surface

    field = np.ones((12, 12, 12))
    field[6:9, 5:9, 5:9] = -1.0
    field[5, 6:9, 5:9] = -1.0
    field[5:9, 5, 6:9] = -1.0
    field[5, 5, 5] = 0.0
    field[6, 5, 5] = field[5, 6, 5] = field[5, 5, 6] = -1.0
    grid = VoxelGrid(T_world_object=np.eye(4), origin=np.array([-0.03, 0.01, 0.0]), voxel_size=0.001,
                     shape=field.shape)
    mesh = extract_surface(field, grid)
    assert len(mesh.faces) > 0 and mesh.is_watertight and mesh.volume > 0
    reread = trimesh.load(io.BytesIO(mesh.export(file_type="ply")), file_type="ply")  # merges vertices
    assert len(reread.vertices) == len(mesh.vertices) and reread.is_watertight
    # Index to metres: the level set lies half-way between voxels 4 (+1) and 5 (-1).
    assert mesh.bounds[0] == pytest.approx([-0.03 + 0.0045, 0.01 + 0.0045, 0.0045], abs=1e-6)


def test_mesh_rasteriser_matches_a_ray_cast():
    box = trimesh.creation.box(extents=[0.1, 0.06, 0.04])
    box.apply_translation([0.01, -0.02, 0.02])
    camera = Camera(intrinsics_from_fov(64, 48, 40.0), 64, 48, look_at(np.array([0.25, 0.2, 0.2]), np.zeros(3)))
    depth, face_index, _ = rasterise_mesh(box.vertices, box.faces, camera)
    origins, directions = camera.pixel_rays()
    locations, rays, _ = box.ray.intersects_location(origins, directions, multiple_hits=False)
    expected = np.zeros(64 * 48)
    z_axis = camera.T_world_cam[:3, 2]
    expected[rays] = (locations - origins[rays]) @ z_axis
    expected = expected.reshape(48, 64)
    hit = (expected > 0) & (depth > 0)
    assert ((expected > 0) != (depth > 0)).sum() <= 3  # silhouette pixels may split on an exact edge
    assert np.abs(depth[hit] - expected[hit]).max() < 1e-6


def test_bad_input_is_a_clear_error(tabletop):
    config = small_completion_config()
    rows, others = tabletop.rows(BOX)
    with pytest.raises(CompletionError, match="only 3 Gaussians"):
        build_context(tabletop.gaussians, rows[:3], others, tabletop.keyframes, config, BOX)
    context = build_context(tabletop.gaussians, rows, others, tabletop.keyframes, config, BOX)
    with pytest.raises(CompletionError, match="not installed"):
        complete_object(context, config, "dreamfusion")
    with pytest.raises(CompletionError, match="local model folder|model_path|empty"):
        complete_object(context, config, "diffusion")
    with pytest.raises(CompletionError, match="cancelled"):
        complete_object(context, config, "geometric", should_stop=lambda: True)


def _object_ids_seen(tabletop, camera) -> np.ndarray:
    """(H, W) id of the fixture object each pixel of `camera` sees first (0 = table or nothing)."""
    meshes = list(tabletop.meshes.items())
    vertices = np.concatenate([m.vertices for _, m in meshes])
    offsets = np.cumsum([0] + [len(m.vertices) for _, m in meshes[:-1]])
    faces = np.concatenate([m.faces + o for (_, m), o in zip(meshes, offsets)])
    face_object = np.concatenate([np.full(len(m.faces), k) for k, m in meshes])
    _, face_index, _ = rasterise_mesh(vertices, faces, camera)
    return np.where(face_index >= 0, face_object[np.maximum(face_index, 0)], 0)


def test_keyframe_pixels_where_the_sensor_sees_past_the_object_are_not_the_objects(tabletop):
    # A render of Gaussians is wider than the surface they sample: the cup's silhouette spills
    # past its outline onto the table and the L-block behind it, where the sensor's depth is
    # theirs. Fused as the cup's surface, such pixels grew fins on neighbours (completion bench
    # seed 31, an L-block 5.4% off its position). Where the sensor sees farther than the
    # object's own render by more than `sensor_agreement` of its size, the pixel is not the
    # object's. Measured here: 14% of the cup's pixels spill without the test, 3% with it;
    # alpha-composited depth sits a few mm in front of the surface (median 3% of the size),
    # so the test also costs 12% of the true pixels (recall 0.87).
    from instascene_ros.core.complete.complete import observe_keyframes, subset

    rows, _ = tabletop.rows(CUP)
    cup = subset(tabletop.gaussians, rows)
    points = cup.means.numpy()
    size = float(np.linalg.norm(np.percentile(points, 99, axis=0) - np.percentile(points, 1, axis=0)))
    truth = [_object_ids_seen(tabletop, keyframe.camera) for keyframe in tabletop.keyframes]
    side = tabletop.keyframes[0].camera.width
    default = small_completion_config().sensor_agreement
    spill, recall = {}, {}
    for agreement in (0.0, default):
        views = observe_keyframes(cup, tabletop.gaussians, tabletop.keyframes, size, len(tabletop.keyframes), side,
                                  agreement)
        assert len(views) == len(tabletop.keyframes)
        shown = sum(int(v.object_mask.sum()) for v in views)
        spill[agreement] = sum(int((v.object_mask & (t != CUP)).sum()) for v, t in zip(views, truth)) / shown
        recall[agreement] = sum(int((v.object_mask & (t == CUP)).sum()) for v, t in zip(views, truth)) / \
            sum(int((t == CUP).sum()) for t in truth)
    assert default > 0.0
    assert spill[0.0] > 0.08, spill  # the render does spill
    assert spill[default] < spill[0.0] / 3, spill
    assert recall[default] > 0.8 * recall[0.0], recall


def test_a_few_gaussians_of_a_neighbour_do_not_grow_the_object_a_lobe(tabletop):
    # Segmentation that hands an object a few Gaussians of a neighbour (completion bench seed 35:
    # 5 of a duck's, 50 mm from a jenga block) stretches the box and the hull that unseen space
    # fills: the block grew a duck-sized lobe, 23% of its diagonal off. Here 6 of the cup's rim
    # Gaussians given to the box (0.8% of its members) cost F1 0.97 -> 0.79 without the guard;
    # with it the box is completed from exactly its own Gaussians, as if it had never had them.
    clean_rows, clean_others = tabletop.rows(BOX)
    cup, _ = tabletop.rows(CUP)
    means = tabletop.gaussians.means.numpy()
    rim = cup[means[cup, 2] > np.percentile(means[cup, 2], 80)]
    strays = rim[np.argsort(np.linalg.norm(means[rim, :2] - means[clean_rows, :2].mean(axis=0), axis=1))[:6]]
    rows, others = np.concatenate([clean_rows, strays]), clean_others[~np.isin(clean_others, strays)]
    scores = {}
    guard = small_completion_config().stray_max_share
    for name, share, object_rows, other_rows in (("without", 0.0, rows, others), ("with", guard, rows, others),
                                                  ("clean", guard, clean_rows, clean_others)):
        # The guard alone: the foreign-surface rule would also take the rim Gaussians that lie
        # among the cup's (test_gaussians_embedded_in_another_surface_are_left_out).
        config = dataclasses.replace(small_completion_config(), stray_max_share=share, foreign_neighbour_share=0.0)
        context = build_context(tabletop.gaussians, object_rows, other_rows, tabletop.keyframes, config, BOX)
        if name != "clean":
            assert len(context.object_gaussians.means) == len(rows) - (6 if share else 0)
        result = complete_object(context, config, "geometric")
        scores[name] = evaluate_completion(result.mesh_world(), tabletop.meshes[BOX], samples=20_000)
    assert scores["without"]["f1_2pct"] < 0.85, scores["without"]  # the lobe is real
    assert scores["with"]["f1_2pct"] >= 0.9 and scores["with"]["position_error"] < 0.02, scores["with"]
    assert abs(scores["with"]["f1_2pct"] - scores["clean"]["f1_2pct"]) < 0.01, (scores["with"], scores["clean"])
    assert abs(scores["with"]["position_error"] - scores["clean"]["position_error"]) < 0.002


def test_a_fringe_gives_back_an_arm_the_instance_missed_and_never_the_table(tabletop):
    # The L-block's instance without the far 20% of its Gaussians along x (an arm the extraction
    # left in no instance) is meshed 2.6% of its diagonal off. Handed back as the instance's
    # fringe (`InstanceConfig.fringe_reach`) beside 1,248 table Gaussians around the block, the
    # arm joins (but for its few Gaussians in the table band), the table does not, and the mesh
    # is placed as from the whole instance (0.77% vs 0.72%).
    rows, others = tabletop.rows(BLOCK)
    means = tabletop.gaussians.means.numpy()
    cut = means[rows, 0] > np.percentile(means[rows, 0], 80)
    arm, kept = rows[cut], rows[~cut]
    background = np.setdiff1d(np.arange(len(means)), np.concatenate([rows, others]))
    table = background[(np.abs(means[background, 2]) < 0.002) &
                       (np.linalg.norm(means[background, :2] - means[rows, :2].mean(axis=0), axis=1) < 0.06)]
    assert len(table) > 1000
    config = small_completion_config()
    errors = {}
    for name, object_rows, fringe in (("cut", kept, None), ("fringe", kept, np.concatenate([arm, table]))):
        context = build_context(tabletop.gaussians, object_rows, others, tabletop.keyframes, config, BLOCK,
                                fringe_rows=fringe)
        if name == "fringe":
            assert len(kept) + 0.9 * len(arm) <= len(context.object_gaussians.means) <= len(rows)
        result = complete_object(context, config, "geometric")
        errors[name] = evaluate_completion(result.mesh_world(), tabletop.meshes[BLOCK], samples=20_000)["position_error"]
    assert errors["cut"] > 0.02, errors
    assert errors["fringe"] < 0.01, errors


def test_stray_groups_are_small_and_far_and_nothing_else():
    from instascene_ros.core.complete.complete import stray_groups

    rng = np.random.default_rng(3)
    # The surface of a 10 cm box, 2000 points.
    body = rng.uniform(-0.05, 0.05, (2000, 3))
    axis = rng.integers(0, 3, 2000)
    body[np.arange(2000), axis] = np.sign(body[np.arange(2000), axis]) * 0.05
    far_few = np.array([0.11, 0.0, 0.0]) + rng.normal(0, 0.002, (8, 3))  # 0.4%, 6 cm off
    far_many = np.array([0.0, 0.12, 0.0]) + rng.normal(0, 0.004, (180, 3))  # 8% (a duck's head), 7 cm off
    near_few = np.array([0.0, -0.08, 0.0]) + rng.normal(0, 0.002, (5, 3))  # 0.2%, 3 cm off: a sparse side
    near_one = np.array([[0.0, 0.0, 0.058]])  # a lone point 8 mm above the box
    points = np.concatenate([body, far_few, far_many, near_few, near_one])
    defaults = CompletionConfig()
    settings = (defaults.stray_link, defaults.stray_max_share, defaults.stray_min_distance)
    stray = stray_groups(points, *settings)
    assert stray[2000:2008].all()
    assert not stray[:2000].any() and not stray[2008:].any()
    assert not stray_groups(points, settings[0], 0.0, settings[2]).any()  # 0 = off
    # A dense instance (linked through one point per cell): the same answer.
    dense = np.concatenate([np.repeat(body, 10, axis=0) + rng.normal(0, 1e-4, (20000, 3)), far_few])
    assert np.flatnonzero(stray_groups(dense, *settings)).tolist() == list(range(20000, 20008))


def test_keyframe_pixels_on_a_touching_neighbour_go_to_the_neighbour(torch_one_thread):
    # Where two objects touch, the object's render covers the neighbour's face next to the
    # contact and the sensor's depth there is the neighbour's, at nearly the object's own depth:
    # neither the occlusion test nor `sensor_agreement` can tell. Fused as the object's surface,
    # such pixels grew a 12 mm fin into a touching L-block (completion bench seed 32, oracle
    # segmentation: position 5.0%; 1.1% with them handed over). A measured point nearer to the
    # neighbour's Gaussians than to the object's is the neighbour's. The fixture's Gaussians
    # are grown to the width of a real map's, so the render spills as it does there.
    import math

    import torch

    box, block = 1, 2
    tabletop = kinds_tabletop({box: ("cube", (0.0, 0.0)), block: ("l_block", (0.057, 0.0))}, views=20, resolution=112)
    assert tabletop.meshes[block].bounds[0, 0] < tabletop.meshes[box].bounds[1, 0]  # they touch
    with torch.no_grad():
        tabletop.gaussians.log_scales += math.log(2.5)
    truth = {keyframe.camera.T_world_cam.tobytes(): _object_ids_seen(tabletop, keyframe.camera)
             for keyframe in tabletop.keyframes}
    rows, others = tabletop.rows(block)
    assert CompletionConfig().neighbour_pixel_ratio > 0.0
    shown = {}
    for ratio in (0.0, CompletionConfig().neighbour_pixel_ratio):
        config = dataclasses.replace(small_completion_config(), neighbour_pixel_ratio=ratio)
        views = build_context(tabletop.gaussians, rows, others, tabletop.keyframes, config, block).observations
        labels = [truth[view.camera.T_world_cam.tobytes()] for view in views]
        shown[ratio] = (sum(int((v.object_mask & (t == box)).sum()) for v, t in zip(views, labels)),
                        sum(int((v.object_mask & (t == block)).sum()) for v, t in zip(views, labels)))
    (spill_before, own_before), (spill_after, own_after) = shown.values()
    assert spill_before >= 10, shown  # the render does cover the box next to the contact
    assert spill_after <= 0.1 * spill_before, shown
    assert own_after >= 0.98 * own_before, shown  # and the block keeps its own pixels


def test_gaussians_embedded_in_another_surface_are_left_out():
    from instascene_ros.core.extraction import foreign_members

    # Two blocks side by side with their tops at one height (completion bench seed 33: an
    # L-block's instance held 7 Gaussians of its neighbour's top, 3-6 mm past its own edge, and
    # its mesh grew 14 mm onto the neighbour: position 6.6%, 1.9% without them). The neighbour's
    # top is part another instance's, part in none (its instance missed it).
    step = 0.001
    grid = np.stack(np.meshgrid(np.arange(-0.05, 0.05, step), np.arange(-0.02, 0.02, step)), -1).reshape(-1, 2)
    top = np.column_stack([grid, np.full(len(grid), 0.04)])
    table = np.column_stack([grid * 2.0, np.zeros(len(grid))])
    means = np.concatenate([top, table])
    own = np.flatnonzero(top[:, 0] < 0.0)
    hole = own[(top[own, 0] > -0.03) & (top[own, 0] < -0.02)]  # the object's own part its instance missed
    near_x = np.abs(top[:, 0] - 0.005) < step / 2
    intruders = np.flatnonzero(near_x & np.isin(np.round(top[:, 1] / step), [-6, -3, 0, 3, 6]))
    assert len(intruders) == 5
    object_rows = np.concatenate([np.setdiff1d(own, hole), intruders])
    off_table = np.arange(len(means)) < len(top)
    defaults = CompletionConfig()
    assert defaults.foreign_neighbour_share > 0.0
    labels = np.zeros(len(means), np.int64)
    labels[object_rows] = 1
    labels[np.setdiff1d(np.flatnonzero(top[:, 0] > 0.0), intruders)[::2]] = 2  # half of it another instance's
    foreign = foreign_members(means, labels, off_table, defaults.foreign_neighbours, defaults.foreign_neighbour_share)
    assert foreign[intruders].all()
    # No own Gaussian goes: not at the edge, nor around the hole, nor at the table.
    assert not foreign[np.setdiff1d(object_rows, intruders)].any()
    assert not foreign_members(means, labels, off_table, defaults.foreign_neighbours, 0.0).any()  # 0 = off


def test_what_an_object_rests_on_bounds_it_even_without_an_instance():
    import torch

    # A cup resting on a box that the segmenter never separated (no instance: its Gaussians are
    # background). Completion fills an object's unseen volume down to the table unless something
    # bounds it; the box's top, under the cup and well above the table, must (completion bench
    # seed 34: a ring on an instance-less L-block grew down through it, 11.9% off its position).
    box, cup = 1, 2
    tabletop = kinds_tabletop({box: ("cube", (0.0, 0.0)), cup: ("cup", (0.2, 0.0))}, views=12, resolution=64)
    box_rows, _ = tabletop.rows(box)
    cup_rows, _ = tabletop.rows(cup)
    means = tabletop.gaussians.means.detach().numpy()
    lift = np.r_[means[box_rows, :2].mean(axis=0) - means[cup_rows, :2].mean(axis=0),
                 means[box_rows, 2].max() - means[cup_rows, 2].min() + 0.002]
    with torch.no_grad():
        shift = torch.as_tensor(lift, dtype=tabletop.gaussians.means.dtype)
        tabletop.gaussians.means[torch.as_tensor(cup_rows)] += shift
    means = tabletop.gaussians.means.detach().numpy()
    top = box_rows[means[box_rows, 2] > means[box_rows, 2].max() - 0.005]
    bounded, own = {}, {}
    for distance in (0.0, CompletionConfig().support_obstacle_distance):
        config = dataclasses.replace(small_completion_config(), support_obstacle_distance=distance)
        context = build_context(tabletop.gaussians, cup_rows, np.zeros(0, np.int64), tabletop.keyframes, config, cup)
        bounds = {tuple(np.round(p, 6)) for p in context.other_points}
        bounded[distance] = sum(tuple(np.round(p, 6)) in bounds for p in means[top].astype(float))
        own[distance] = sum(tuple(np.round(p, 6)) in bounds for p in means[cup_rows].astype(float))
    assert CompletionConfig().support_obstacle_distance > 0.0
    assert bounded[0.0] == 0, bounded
    # The top beyond a margin around the cup's own Gaussians (within it, it could be the cup's
    # own missed bottom); none of the cup's.
    assert bounded[CompletionConfig().support_obstacle_distance] >= 0.25 * len(top), (bounded, len(top))
    assert not any(own.values()), own


def test_an_unsegmented_neighbour_beside_the_object_bounds_it_when_asked():
    # Two boxes side by side; the segmenter separated only one (the other's Gaussians are
    # background). Completion bench seed 34: an L-block grew 19 mm into its instance-less
    # neighbour. With `unsegmented_obstacle_distance` the neighbour's Gaussians farther than
    # that share of the object's size from it bound the object; the object's own never do, and
    # the table stays the table (it bounds the object by its plane already).
    box, neighbour = 1, 2
    tabletop = kinds_tabletop({box: ("cube", (0.0, 0.0)), neighbour: ("cube", (0.07, 0.0))}, views=12, resolution=64)
    box_rows, _ = tabletop.rows(box)
    neighbour_rows, _ = tabletop.rows(neighbour)
    means = tabletop.gaussians.means.detach().numpy().astype(float)
    found = {}
    for distance in (0.0, 0.3):
        config = dataclasses.replace(small_completion_config(), unsegmented_obstacle_distance=distance)
        context = build_context(tabletop.gaussians, box_rows, np.zeros(0, np.int64), tabletop.keyframes, config, box)
        bounds = {tuple(np.round(p, 6)) for p in context.other_points}
        found[distance] = {name: sum(tuple(np.round(p, 6)) in bounds for p in means[rows])
                           for name, rows in (("neighbour", neighbour_rows), ("own", box_rows))}
    assert CompletionConfig().unsegmented_obstacle_distance == 0.0  # an option, measured
    # Without it only the neighbour's bottom edge in the table band bounds the box.
    assert found[0.0]["neighbour"] < 0.1 * len(neighbour_rows), (found, len(neighbour_rows))
    # With it most of the neighbour (above the support floor, past the margin), none of the box.
    assert found[0.3]["neighbour"] - found[0.0]["neighbour"] >= 0.5 * len(neighbour_rows), (found, len(neighbour_rows))
    assert found[0.3]["own"] == 0 and found[0.0]["own"] == 0, found
