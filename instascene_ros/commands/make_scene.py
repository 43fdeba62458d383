"""`instascene make-scene`: generate a synthetic cluttered tabletop dataset with ground truth."""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

log = logging.getLogger("instascene.make_scene")

DATASET_MARKERS = ("transforms.json", "scene.json")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "make-scene", help="generate a synthetic tabletop dataset (pybullet) with ground truth",
        description="Drop 8-15 objects into a tray with pybullet physics, render RGB, depth and ground-truth "
                    "instance masks from a training trajectory and a held-out test ring, corrupt the masks the "
                    "way a real 2D segmenter would, and write a nerfstudio-style dataset folder with "
                    "gt_meshes/<id>.ply and a scene.json manifest.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out", metavar="OUT", nargs="?", help="dataset folder to create")
    parser.add_argument("--seed", type=int, default=0, help="everything is deterministic per seed")
    parser.add_argument("--views", type=int, default=60, help="training views")
    parser.add_argument("--test-views", type=int, default=12, help="held-out views on a ring off the trajectory")
    parser.add_argument("--res", type=int, default=256, help="square image size in pixels")
    parser.add_argument("--objects", type=int, default=None, help="object count (default: 8-15, drawn by the seed)")
    parser.add_argument("--mode", default="hemisphere",
                        help="hemisphere: spiral all around; arc: a 90-degree robot arc leaving >= 30%% of each "
                             "object unseen")
    parser.add_argument("--mask-noise", type=int, default=1, help="simulated segmenter: 0 clean, 1 typical, 2 poor")
    parser.add_argument("--object-views", type=int, default=0,
                        help="also render each object alone from N views under objects/<id>/")
    parser.add_argument("--assets", default=None,
                        help="comma-separated object kinds to draw from (default: all; see --list-assets)")
    parser.add_argument("--list-assets", action="store_true", help="print the object kinds and exit")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds a dataset")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
    return parser


def _error(message: str) -> int:
    print(f"make-scene: error: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    # pybullet and trimesh load here, not at parser build time, so `instascene --help` is instant.
    from instascene_ros.core.synth.config import MaskNoiseConfig, SceneConfig, SceneConfigError
    from instascene_ros.core.synth.objects import OBJECT_KINDS

    if args.list_assets:
        for name, kind in OBJECT_KINDS.items():
            print(f"{name}\t{'non-convex' if kind.non_convex else 'convex or near-convex'}")
        return 0
    if args.out is None:
        return _error("the dataset folder OUT is required")
    try:
        config = SceneConfig(seed=args.seed, mode=args.mode, num_views=args.views, num_test_views=args.test_views,
                             resolution=args.res, num_objects=args.objects, object_views=args.object_views,
                             mask_noise=MaskNoiseConfig.from_level(args.mask_noise), progress=not args.no_progress)
        if args.assets is not None:
            config.assets = tuple(name.strip() for name in args.assets.split(",") if name.strip())
        config.validate()
    except SceneConfigError as error:
        return _error(str(error))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _error(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            return _error(f"{out} is not empty (use --overwrite to replace a dataset there)")
        if not any((out / marker).exists() for marker in DATASET_MARKERS):
            return _error(f"{out} is not empty and does not look like a dataset; refusing to delete it")
        shutil.rmtree(out)
    # After validation: importing pybullet prints its build time on stderr, which would make
    # a bad-argument message two lines.
    from instascene_ros.core.synth.scene_builder import SceneGenerationError, generate_scene

    try:
        scene = generate_scene(config, out)
    except SceneGenerationError as error:
        return _error(str(error))
    manifest = scene.manifest
    log.info("dataset written to %s (%d objects, %d train + %d test views, %dx%d, mask noise %d) in %.1f s",
             out.resolve(), len(manifest["objects"]), manifest["num_train_views"], manifest["num_test_views"],
             config.resolution, config.resolution, config.mask_noise.level, scene.seconds)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m instascene_ros.commands.make_scene OUT ...`)."""
    parser = argparse.ArgumentParser(prog="instascene")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["make-scene", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
