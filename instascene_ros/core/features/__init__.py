"""Instance feature field (DESIGN.md step 3): InstaScene's spatial contrastive learning of a
16-D feature per Gaussian, with the Unified-Lift codebook, GradiSeg's LA-KNN / IGD and the
Gaussian Grouping classifier baseline as options.

Modules: config (dataclasses), losses (InfoNCE with per-cluster temperature, sampling),
codebook (Unified-Lift), gradiseg (LA-KNN, IGD), baseline (classifier, video associator),
field (FeatureField: storage keyed by persistent Gaussian ids, training step).
"""
from .baseline import IdentityClassifier, video_associate, warp_labels
from .codebook import MaskMapping, ObjectCodebook
from .config import (INSTANCE_FIELDS, AssociatorConfig, ClassifierConfig, CodebookConfig, FeatureConfig,
                     GradiSegConfig, feature_config_preset, instance_field_config)
from .field import FeatureField, KeyframeLabels, Priors, render_features, scene_gaussians
from .gradiseg import igd_select, la_knn_neighbours, neighbour_kl_loss
from .losses import ClusterSample, concentration_temperature, proto_nce_loss, sample_clusters, sample_groups

__all__ = [
    "INSTANCE_FIELDS", "AssociatorConfig", "ClassifierConfig", "ClusterSample", "CodebookConfig", "FeatureConfig", "FeatureField",
    "GradiSegConfig", "IdentityClassifier", "KeyframeLabels", "MaskMapping", "ObjectCodebook", "Priors",
    "concentration_temperature", "feature_config_preset", "instance_field_config", "igd_select", "la_knn_neighbours", "neighbour_kl_loss",
    "proto_nce_loss", "render_features", "sample_clusters", "sample_groups", "scene_gaussians", "video_associate",
    "warp_labels",
]
