"""bench segment's ablation rows change exactly the setting they are named after."""
import dataclasses

from instascene_ros.commands.bench_segment import ablation_variants
from instascene_ros.core.pipeline import PipelineConfig


def _changed(base, variant) -> dict:
    return {f.name: getattr(variant, f.name) for f in dataclasses.fields(base)
            if getattr(variant, f.name) != getattr(base, f.name)}


def test_each_variant_changes_only_its_own_settings():
    base = dataclasses.replace(PipelineConfig.from_preset("cpu").features, mask_border_px=0.0)
    variants = ablation_variants(PipelineConfig.from_preset("cpu").features)
    assert _changed(base, variants["full (+ cross-view)"]) == {}
    assert _changed(base, variants["noisy 2D masks only"]) == {"lambda_cross": 0.0, "lambda_3d": 0.0}
    assert _changed(base, variants["3D priors only"]) == {"lambda_intra": 0.0, "lambda_cross": 0.0}
    assert _changed(base, variants["3D priors + 2D masks"]) == {"lambda_cross": 0.0}
    assert _changed(base, variants["full without background cluster"]) == {"background_cluster": False}
    assert _changed(base, variants["full + mask borders not sampled (1 px)"]) == {"mask_border_px": 1.0}
    codebook = variants["Unified-Lift object codebook (lr x10)"]
    assert codebook.codebook.enabled and codebook.codebook.feature_lr == 10 * base.codebook.feature_lr
    assert codebook.feature_lr == 2.5e-2  # the same feature rate as our field
    classifier = variants["identity classifier on video-associated ids (baseline) lr x10"]
    assert classifier.objective == "classifier" and classifier.feature_lr == 2.5e-2
    assert all(v.background_cluster for k, v in variants.items() if k != "full without background cluster")
