"""GaussianScene: persistent ids, densify/prune, the hard budget, optimiser state, persistence."""
from __future__ import annotations

import io
import math
import struct

import numpy as np
import pytest
import torch

from instascene_ros.core.camera import Camera, look_at
from instascene_ros.core.scene import GaussianScene, SceneConfig, exponential_lr, rgb_to_sh_dc, sh_dc_to_rgb


def make_scene(n: int = 12, **config) -> GaussianScene:
    torch.manual_seed(0)
    scene = GaussianScene(SceneConfig(**config))
    scene.add(torch.randn(n, 3), torch.rand(n, 3), log_scales=torch.full((n, 3), -4.0))
    return scene


def take_adam_step(scene: GaussianScene, seed: int = 1) -> None:
    """A deterministic fake loss so every parameter has gradient and Adam state."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((p * torch.randn(p.shape, generator=g)).sum() for p in scene.parameters().values())
    loss.backward()
    scene.step()


def force_gradients(scene: GaussianScene, rows: torch.Tensor, value: float = 1.0) -> None:
    """Pretend the given rows had a large view-space gradient in one view."""
    scene.grad_accum[rows] = value
    scene.grad_denom[rows] = 1.0


def test_insertion_assigns_fresh_sequential_ids():
    scene = make_scene(5)
    assert scene.ids.tolist() == [0, 1, 2, 3, 4]
    assert scene.parent_ids.tolist() == [-1] * 5
    new = scene.add(torch.zeros(3, 3), torch.rand(3, 3), log_scales=torch.zeros(3, 3))
    assert new.tolist() == [5, 6, 7] and scene.next_id == 8


def test_clone_keeps_parent_split_replaces_parent_prune_forgets():
    scene = make_scene(6, max_gaussians=100)
    scene.extent = 1.0
    with torch.no_grad():
        # rows 0,1: small -> clone; rows 2,3: large -> split; rows 4,5: no gradient -> untouched.
        scene.log_scales[:2] = math.log(0.001)
        scene.log_scales[2:4] = math.log(0.5)
        scene.opacity_logits[5] = -10.0  # transparent -> pruned
    force_gradients(scene, torch.tensor([0, 1, 2, 3]))
    take_adam_step(scene)
    before = scene.ids.tolist()
    parent_scales = scene.scales[2:4].detach().clone()
    counts = scene.densify_and_prune()
    assert counts["cloned"] == 2 and counts["split"] == 2 and counts["pruned"] == 1
    ids = scene.ids.tolist()
    assert len(ids) == len(set(ids)), "ids must stay unique"
    # Clone: the originals keep their id, each copy is new with the original as parent.
    for original in (before[0], before[1]):
        assert original in ids
        assert (scene.parent_ids == original).sum() == 1
    # Split: the parents' ids vanish; split_children new ids each point back at them.
    for parent, parent_scale in zip((before[2], before[3]), parent_scales):
        assert parent not in ids
        children = scene.ids[scene.parent_ids == parent]
        assert len(children) == scene.config.split_children
        assert all(c >= 6 for c in children.tolist())
        child_scales = scene.scales[scene.index_of(children)]
        assert torch.allclose(child_scales, (parent_scale / 1.6).expand_as(child_scales))
    assert before[4] in ids and before[5] not in ids  # untouched survivor; pruned id gone
    # Ids are never reused, even after removals.
    new = scene.add(torch.zeros(1, 3), torch.rand(1, 3), log_scales=torch.zeros(1, 3))
    assert int(new) == scene.next_id - 1 and int(new) > max(before + ids)
    # Statistics are reset after densification, and all tensors agree on N.
    assert scene.grad_accum.sum() == 0 and scene.grad_denom.sum() == 0
    for p in scene.parameters().values():
        assert p.shape[0] == scene.n


def test_oversized_prune_by_screen_radius_and_by_world_scale():
    """Rows 0-1 were drawn larger than max_screen_radius, rows 2-3 are larger in the world than
    max_world_scale_fraction x extent, rows 4-5 neither. Nothing oversized goes unless asked;
    with max_screen_radius None only the world-size rule prunes."""
    def prepared(**config) -> GaussianScene:
        scene = make_scene(6, max_gaussians=100, **config)
        scene.extent = 1.0
        with torch.no_grad():
            scene.log_scales[2:4] = math.log(0.5)
        scene.max_radii2d[:] = torch.tensor([50.0, 30.0, 5.0, 5.0, 5.0, 19.0])
        return scene

    def survivors(scene: GaussianScene, prune_oversized: bool) -> list[int]:
        scene.densify_and_prune(prune_oversized=prune_oversized)  # no gradients: prunes only
        return sorted(scene.ids.tolist())

    assert survivors(prepared(), False) == [0, 1, 2, 3, 4, 5]
    assert survivors(prepared(), True) == [4, 5]
    assert survivors(prepared(max_screen_radius=None), True) == [0, 1, 4, 5]


def test_adam_state_follows_the_gaussians():
    scene = make_scene(8)
    take_adam_step(scene)
    survivor = int(scene.ids[3])
    moment = scene.optimizer.state[scene.means]["exp_avg"][3].clone()
    sq = scene.optimizer.state[scene.means]["exp_avg_sq"][3].clone()
    scene.remove(torch.tensor([True, True, False, False, True, False, False, False]))
    row = int(scene.index_of(torch.tensor([survivor])))
    state = scene.optimizer.state[scene.means]
    assert torch.equal(state["exp_avg"][row], moment) and torch.equal(state["exp_avg_sq"][row], sq)
    scene.add(torch.zeros(2, 3), torch.rand(2, 3), log_scales=torch.zeros(2, 3))
    for param in scene.parameters().values():
        state = scene.optimizer.state[param]
        assert state["exp_avg"].shape == param.shape == state["exp_avg_sq"].shape
        assert state["exp_avg"][-2:].abs().sum() == 0, "new Gaussians start without optimiser history"
    take_adam_step(scene, seed=2)  # the optimiser still works on the replaced tensors


def test_budget_is_never_exceeded():
    budget = 20
    scene = make_scene(15, max_gaussians=budget)
    scene.extent = 1.0
    with torch.no_grad():
        scene.log_scales[:] = math.log(0.5)  # everything wants to split: 15 -> 30
    scene.grad_accum[:] = torch.arange(15, dtype=torch.float32) + 1.0
    scene.grad_denom[:] = 1.0
    strongest = scene.ids[10:].tolist()
    counts = scene.densify_and_prune()
    # Room for 5 splits: those with the largest gradients; no child is evicted after the fact.
    assert counts["split"] == 5 and counts["evicted"] == 0
    assert scene.n == budget
    assert set(scene.parent_ids[scene.parent_ids >= 0].tolist()) == set(strongest)
    # Insertion beyond the budget evicts the least important existing Gaussians first.
    importance = torch.arange(scene.n, dtype=torch.float32)
    least = scene.ids[:5].tolist()
    new = scene.add(torch.zeros(5, 3), torch.rand(5, 3), log_scales=torch.zeros(5, 3), importance=importance)
    assert scene.n == budget and len(new) == 5
    assert not any(i in scene.ids.tolist() for i in least)
    # More new Gaussians than the whole budget: a subset of them is kept, still within budget.
    scene.add(torch.zeros(50, 3), torch.rand(50, 3), log_scales=torch.zeros(50, 3))
    assert scene.n == budget
    # Without a measured importance, the proxy (opacity x max-scale^2) decides.
    scene2 = make_scene(10, max_gaussians=10)
    with torch.no_grad():
        scene2.opacity_logits[:3] = -6.0
    faint = scene2.ids[:3].tolist()
    scene2.add(torch.zeros(3, 3), torch.rand(3, 3), log_scales=torch.zeros(3, 3))
    assert scene2.n == 10 and not any(i in scene2.ids.tolist() for i in faint)


def test_full_budget_densification_evicts_the_least_important_to_make_room():
    scene = make_scene(10, max_gaussians=10, densify_turnover=0.2)
    scene.extent = 100.0  # every Gaussian is "small" -> clone
    force_gradients(scene, torch.tensor([0, 1]))
    keep_ids = scene.ids[:8].tolist()
    # Rank the last two originals lowest: they make room for the two clones.
    counts = scene.densify_and_prune(importance_fn=lambda s: torch.isin(s.ids, torch.tensor(keep_ids)).float())
    assert counts["evicted"] == 2 and counts["cloned"] == 2 and scene.n == 10
    assert set(keep_ids) <= set(scene.ids.tolist())


def _covariance(scene: GaussianScene, rows) -> torch.Tensor:
    from instascene_ros.core.scene import quaternion_to_matrix
    R = quaternion_to_matrix(scene.quats[rows].detach())
    S = torch.diag_embed(scene.scales[rows].detach() ** 2)
    return R @ S @ R.transpose(1, 2)


def test_identity_gradient_split_places_two_children_across_the_boundary_and_keeps_the_moments():
    """IGD (GradiSeg): a Gaussian straddling a boundary becomes two, one on either side along the
    boundary normal; the pair keeps the parent's mean and covariance (for a direction along one of
    its axes), its colour and opacity, and gets new ids that name the parent."""
    from instascene_ros.core.scene import matrix_to_quaternion
    scene = make_scene(4)
    angle = 0.7  # the parent's long axis, turned about z
    R = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1.0]])
    with torch.no_grad():
        scene.quats[1] = torch.as_tensor(matrix_to_quaternion(R[None])[0], dtype=torch.float32)
        scene.log_scales[1] = torch.log(torch.tensor([0.1, 0.02, 0.01]))
    parent_mean, parent_cov = scene.means[1].detach().clone(), _covariance(scene, [1])[0]
    parent_colour, parent_opacity = scene.sh[1].detach().clone(), scene.opacities[1].detach().clone()
    direction = torch.as_tensor(-3.0 * R[:, 0], dtype=torch.float32)  # along the long axis; sign and length free
    counts = scene.split_along(torch.tensor([1, 99]), torch.stack([direction, torch.ones(3)]))  # 99: gone
    assert counts == {"split": 1, "evicted": 0} and scene.n == 5
    assert 1 not in scene.ids.tolist()
    children = torch.nonzero(scene.parent_ids == 1).squeeze(1)
    assert len(children) == 2 and min(scene.ids[children].tolist()) >= 4
    means = scene.means[children].detach()
    along = (means - parent_mean) @ torch.as_tensor(R[:, 0], dtype=torch.float32)
    assert torch.allclose(along.sort().values, torch.tensor([-1.0, 1.0]) * 0.1 * math.sqrt(2 / math.pi), atol=1e-6)
    assert torch.allclose(means.mean(0), parent_mean, atol=1e-6)
    offsets = means - means.mean(0)
    mixture = _covariance(scene, children).mean(0) + (offsets[:, :, None] * offsets[:, None, :]).mean(0)
    assert torch.allclose(mixture, parent_cov, atol=1e-7)
    for row in children:
        assert torch.allclose(scene.sh[row], parent_colour) and torch.allclose(scene.opacities[row], parent_opacity)
    with pytest.raises(ValueError, match="2 ids but 1 directions"):
        scene.split_along(torch.tensor([0, 2]), torch.ones(1, 3))


def test_identity_gradient_split_under_a_full_budget_evicts_others_then_splits_what_fits():
    scene = make_scene(10, max_gaussians=10, densify_turnover=0.1)  # room for one eviction
    keep_ids = scene.ids[:9].tolist()
    counts = scene.split_along(torch.tensor([0, 1, 2]), torch.tensor([[1.0, 0, 0]] * 3),
                               importance_fn=lambda s: torch.isin(s.ids, torch.tensor(keep_ids)).float())
    assert counts == {"split": 1, "evicted": 1} and scene.n == 10
    assert 9 not in scene.ids.tolist()  # the least important non-candidate made room ...
    assert 0 not in scene.ids.tolist() and {1, 2} <= set(scene.ids.tolist())  # ... for the first candidate
    assert (scene.parent_ids == 0).sum() == 2


def test_state_dict_round_trip_is_exact_and_training_continues_identically():
    scene = make_scene(10, sh_degree=1, feature_dim=4)
    scene.extent = 2.5
    take_adam_step(scene)
    force_gradients(scene, torch.tensor([0, 1, 2]))
    scene.densify_and_prune()
    take_adam_step(scene, seed=3)
    scene.update_learning_rate(700)
    scene.update_sh_degree(1500)
    buffer = io.BytesIO()
    torch.save(scene.state_dict(), buffer)
    buffer.seek(0)
    restored = GaussianScene.from_state_dict(torch.load(buffer, weights_only=False))
    assert restored.config == scene.config
    assert restored.next_id == scene.next_id and restored.extent == scene.extent
    assert restored.active_sh_degree == scene.active_sh_degree
    assert torch.equal(restored.ids, scene.ids) and torch.equal(restored.parent_ids, scene.parent_ids)
    for name, param in scene.parameters().items():
        other = restored.parameters()[name]
        assert torch.equal(param, other), name
        a, b = scene.optimizer.state[param], restored.optimizer.state[other]
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a[key], b[key]), (name, key)
    assert [g["lr"] for g in scene.optimizer.param_groups] == [g["lr"] for g in restored.optimizer.param_groups]
    # Same gradients -> same parameters, and the same split samples (generator state restored).
    for s in (scene, restored):
        take_adam_step(s, seed=4)
        force_gradients(s, torch.arange(4))
        with torch.no_grad():
            s.log_scales[:4] = 0.0
        s.densify_and_prune()
    for name, param in scene.parameters().items():
        assert torch.equal(param, restored.parameters()[name]), name
    assert torch.equal(scene.ids, restored.ids)


def test_features_slot_follows_densify_and_keeps_other_optimiser_state():
    scene = make_scene(6)
    take_adam_step(scene)
    moments = scene.optimizer.state[scene.means]["exp_avg"].clone()
    scene.enable_features(3, init=torch.arange(18, dtype=torch.float32).reshape(6, 3))
    assert torch.equal(scene.optimizer.state[scene.means]["exp_avg"], moments)
    assert scene.to_gaussians().features.shape == (6, 3)
    scene.extent = 100.0
    force_gradients(scene, torch.tensor([2]))
    scene.densify_and_prune()
    clone = scene.index_of(scene.ids[scene.parent_ids == 2])
    assert torch.equal(scene.features[clone][0], torch.tensor([6.0, 7.0, 8.0]))


def test_learning_rates_follow_3dgs():
    scene = make_scene(3)
    scene.extent = 2.0
    c = scene.config
    lrs = {g["name"]: g["lr"] for g in scene._make_optimizer().param_groups}
    assert lrs["sh_dc"] == 2.5e-3 and lrs["sh_rest"] == pytest.approx(2.5e-3 / 20)
    assert lrs["opacity_logits"] == 0.025 and lrs["log_scales"] == 5e-3 and lrs["quats"] == 1e-3
    assert scene.update_learning_rate(0) == pytest.approx(1.6e-4 * 2.0)
    assert scene.update_learning_rate(c.position_lr_max_steps) == pytest.approx(1.6e-6 * 2.0)
    mid = exponential_lr(15_000, 1.6e-4, 1.6e-6, 30_000)
    assert mid == pytest.approx(1.6e-5)  # log-linear: the geometric mean half way
    assert [scene.update_sh_degree(s) for s in (0, 999, 1000, 2500, 10 ** 6)] == [0, 0, 1, 2, 3]


def test_view_space_gradient_statistics():
    scene = GaussianScene(SceneConfig())
    scene.add(torch.tensor([[0.0, 0.0, 2.0], [5.0, 0.0, 2.0]]), torch.rand(2, 3), log_scales=torch.full((2, 3), -3.0))
    camera = Camera(K=np.array([[50.0, 0, 50], [0, 50.0, 40], [0, 0, 1]]), width=100, height=80,
                    T_world_cam=np.eye(4))
    # From the renderer's 2D means: NDC gradient = pixel gradient x (W/2, H/2); radii 0 = unseen.
    scene.add_densification_stats(camera, torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
                                  torch.tensor([[3, 3], [0, 0]]))
    assert scene.grad_accum.tolist() == [50.0, 0.0] and scene.grad_denom.tolist() == [1.0, 0.0]
    # Fallback from the 3D gradient: dL/du = <dL/dmean, right> z / fx.
    scene._reset_stats(2)
    scene.means.grad = torch.tensor([[1.0, 0.0, 7.0], [1.0, 0.0, 0.0]])
    scene.add_densification_stats(camera)
    assert scene.grad_accum[0].item() == pytest.approx(1.0 * 2.0 / 50.0 * 50.0)
    assert scene.grad_denom.tolist() == [1.0, 0.0]  # the second one projects far off-image


def write_read(scene: GaussianScene, tmp_path, **kwargs) -> tuple[bytes, GaussianScene]:
    path = tmp_path / "map.ply"
    scene.save_ply(path, **kwargs)
    return path.read_bytes(), GaussianScene.load_ply(path)


def test_ply_round_trip_and_standard_layout(tmp_path):
    scene = make_scene(7, sh_degree=3)
    with torch.no_grad():
        scene.sh_rest.normal_()
        scene.quats.normal_()
        scene.opacity_logits.normal_()
    data, loaded = write_read(scene, tmp_path)
    header, _, body = data.partition(b"end_header\n")
    lines = header.decode("ascii").splitlines()
    assert lines[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 7"]
    names = [line.split()[2] for line in lines[3:]]
    assert all(line.split()[1] == "float" for line in lines[3:])
    expected = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2",
                *[f"f_rest_{i}" for i in range(45)], "opacity", "scale_0", "scale_1", "scale_2",
                "rot_0", "rot_1", "rot_2", "rot_3"]
    assert names == expected
    assert len(body) == 7 * len(expected) * 4
    # f_rest is channel-major: coefficient 1 of green is f_rest_15 (= 1 * 15 + 0).
    row = struct.unpack("<" + "f" * len(expected), body[: 4 * len(expected)])
    assert row[names.index("f_rest_15")] == pytest.approx(float(scene.sh_rest[0, 0, 1].detach()))
    assert row[names.index("x")] == pytest.approx(float(scene.means[0, 0].detach()))
    for name in ("means", "sh_dc", "sh_rest", "opacity_logits", "log_scales", "quats"):
        assert torch.equal(getattr(loaded, name), getattr(scene, name)), name
    assert loaded.config.sh_degree == 3 and loaded.n == 7


def test_ply_extras_keep_ids_and_features(tmp_path):
    scene = make_scene(5, sh_degree=0, feature_dim=2)
    scene.remove(torch.tensor([True, False, False, False, False]))
    scene.add(torch.zeros(1, 3), torch.rand(1, 3), log_scales=torch.zeros(1, 3))
    with torch.no_grad():
        scene.features.normal_()
    data, loaded = write_read(scene, tmp_path, extras=True)
    assert b"property double instascene_id" in data
    assert torch.equal(loaded.ids, scene.ids) and loaded.next_id == scene.next_id
    assert torch.equal(loaded.features, scene.features)
    _, plain = write_read(scene, tmp_path)  # the viewer layout has no ids: fresh ones
    assert plain.ids.tolist() == list(range(scene.n)) and plain.features is None


def test_sh_colour_convention():
    rgb = torch.tensor([[0.0, 0.5, 1.0]])
    assert torch.allclose(sh_dc_to_rgb(rgb_to_sh_dc(rgb)), rgb)
    scene = GaussianScene(SceneConfig(sh_degree=2))
    scene.add(torch.zeros(1, 3), rgb, log_scales=torch.zeros(1, 3))
    assert scene.sh.shape == (1, 9, 3) and torch.allclose(sh_dc_to_rgb(scene.sh[:, 0]), rgb)
    g = scene.to_gaussians()
    assert g.sh_degree == 2 and g.features is None


def test_render_uses_scene_parameters_and_gradients_flow():
    render = pytest.importorskip("instascene_ros.core.splat").render
    scene = GaussianScene(SceneConfig(sh_degree=0))
    scene.add(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]),
              log_scales=torch.full((1, 3), math.log(0.05)), opacities=torch.tensor([0.9]))
    camera = Camera(K=np.array([[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]]), width=32, height=32,
                    T_world_cam=look_at(np.array([0.0, -1.0, 0.0]), np.zeros(3)))
    out = render(scene.to_gaussians(), [camera])
    assert out.color[0, 16, 16, 0] > 0.8 and out.color[0, 16, 16, 1] < 0.05
    out.color.sum().backward()
    assert all(p.grad is not None for p in scene.parameters().values())
    scene.add_densification_stats(camera, out.means2d.grad[0], out.radii[0])
    assert scene.grad_denom.tolist() == [1.0]
