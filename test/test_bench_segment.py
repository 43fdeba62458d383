"""bench segment's ablation rows change exactly the setting they are named after."""
import dataclasses

from instascene_ros.commands.bench_segment import ablation_variants
from instascene_ros.core.pipeline import PipelineConfig


def _changed(base, variant) -> dict:
    return {f.name: getattr(variant, f.name) for f in dataclasses.fields(base)
            if getattr(variant, f.name) != getattr(base, f.name)}


def test_each_variant_changes_only_its_own_settings():
    defaults = PipelineConfig.from_preset("cpu")
    base, tracker = defaults.features, defaults.tracker
    variants = ablation_variants(base, tracker)
    features = {name: v.features for name, v in variants.items()}
    assert _changed(base, features["full (+ cross-view)"]) == {}
    assert _changed(base, features["noisy 2D masks only"]) == {"lambda_cross": 0.0, "lambda_3d": 0.0}
    assert _changed(base, features["3D priors only"]) == {"lambda_intra": 0.0, "lambda_cross": 0.0}
    assert _changed(base, features["3D priors + 2D masks"]) == {"lambda_cross": 0.0}
    assert _changed(base, features["full without background cluster"]) == {"background_cluster": False}
    assert _changed(base, features["full with every mask pixel sampled"]) == {"mask_border_px": 0.0}
    border_rule = features["full with background sampled by the border rule"]
    assert _changed(base, border_rule) == {"background_by_margin": False}
    assert _changed(base, features["full + labels corrected by the priors"]) == {"prior_label_weight": 0.5}
    intra = features["full + intra-view without under-segmented masks"]
    assert _changed(base, intra) == {"intra_skips_undersegmented": True}
    assert _changed(base, features["InstaScene as published"]) == {"mask_border_px": 0.0, "background_cluster": False}
    codebook = features["Unified-Lift object codebook (lr x10)"]
    assert codebook.codebook.enabled and codebook.codebook.feature_lr == 10 * base.codebook.feature_lr
    assert codebook.feature_lr == 2.5e-2  # the same feature rate as our field
    classifier = features["identity classifier on video-associated ids (baseline) lr x10"]
    assert classifier.objective == "classifier" and classifier.feature_lr == 2.5e-2
    # The GradiSeg rows change only the GradiSeg options, on a schedule scaled to the steps.
    steps = 300
    scaled = ablation_variants(base, tracker, steps)
    schedule = {"start_step": steps // 2, "igd_start_step": steps // 2, "igd_interval": steps // 6}
    expected = {"full + GradiSeg LA-KNN": {"laknn": True},
                "full + GradiSeg IGD p90": {"igd": True, "igd_percentile": 90.0},
                "full + GradiSeg IGD p95": {"igd": True},  # 95 is GradiSegConfig's default
                "full + GradiSeg IGD p99": {"igd": True, "igd_percentile": 99.0},
                "full + GradiSeg LA-KNN + IGD p95": {"laknn": True, "igd": True}}
    for name, changes in expected.items():
        assert _changed(base, scaled[name].features) == {"gradiseg": scaled[name].features.gradiseg}, name
        assert _changed(base.gradiseg, scaled[name].features.gradiseg) == {**schedule, **changes}, name
    assert not (base.gradiseg.laknn or base.gradiseg.igd)  # both off in the product
    # Only the tracker rows change the tracker, each only its own rule.
    tracker_rows = {"full with tracker tracing every mask pixel": {"mask_border_px": 0.0},
                    "full without mutual-containment links": {"mutual_containment_link": False},
                    "full without residual masks": {"residual_passes": 0},
                    "full without split-object merge": {"split_merge_consensus": None},
                    "full without separating objects seen apart": {"separate_seen_apart": False},
                    "full without orphan split": {"orphan_share": 0.0},
                    "InstaScene as published": {"mask_border_px": 0.0, "mutual_containment_link": False,
                                                "residual_passes": 0, "split_merge_consensus": None,
                                                "separate_seen_apart": False,
                                                "orphan_share": 0.0, "undersegment_cover": 0.0,
                                                "member_filter_keeps_objects": False, "disjoint_priors": False},
                    "full with under-segmentation filter at 15% of frames": {"undersegment_frame_ratio": 0.15},
                    "full without the second-mask cover rule": {"undersegment_cover": 0.0},
                    "full without the member filter's object rule": {"member_filter_keeps_objects": False},
                    "full with overlapping priors": {"disjoint_priors": False}}
    for name, variant in variants.items():
        assert _changed(tracker, variant.tracker) == tracker_rows.get(name, {}), name
    # Only the input rows change the masks, each in its own way.
    inputs = {name: (v.mask_keyframes, v.clean_masks) for name, v in variants.items() if v.mask_keyframes or v.clean_masks}
    assert inputs == {"full with masks on 6 keyframes": (6, False), "full with masks on 16 keyframes": (16, False),
                      "full on clean masks (noise 0)": (0, True)}
    for name in inputs:
        assert _changed(base, variants[name].features) == {} and _changed(tracker, variants[name].tracker) == {}
    # the rows above switch real defaults off
    assert base.mask_border_px > 0 and base.background_cluster and base.background_by_margin
    assert base.prior_label_weight == 0.0  # an option, off
    assert tracker.mutual_containment_link and tracker.undersegment_cover > 0.0
    assert tracker.residual_passes >= 1 and tracker.split_merge_consensus is not None and tracker.orphan_share > 0
    assert tracker.member_filter_keeps_objects and tracker.disjoint_priors and tracker.separate_seen_apart
    assert all("," not in name for name in variants)  # --variants splits on commas


def test_rescore_without_saved_maps_is_refused_before_any_work(tmp_path):
    import pytest

    from instascene_ros.cli import main

    with pytest.raises(SystemExit, match="--reuse"):
        main(["bench", "segment", "--rescore", "--seeds", "1", "--work", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # no scene was generated


def test_instance_options_need_a_rescore_and_a_typo_stops_the_bench_before_any_work(tmp_path):
    import pytest

    from instascene_ros.cli import main

    with pytest.raises(SystemExit, match="--reuse --rescore"):
        main(["bench", "segment", "--instance-option", "island_gap=none", "--seeds", "1", "--work", str(tmp_path)])
    with pytest.raises(SystemExit, match="--instance-option 'island=none'"):
        main(["bench", "segment", "--reuse", "--rescore", "--instance-option", "island=none", "--seeds", "1",
              "--work", str(tmp_path)])
    assert not any(tmp_path.iterdir())
