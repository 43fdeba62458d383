"""`instascene complete MAP --id ID --out FILE`: complete one object of a saved map and export its mesh.

The same completion the node's `~/get_completed_object` runs, offline: load a map saved by
`instascene run` (RUN/map.instascene) or by the node's `~/save_map`, complete the instance and
write the watertight mesh as .ply, .obj or .glb (by the file's extension), in the world frame
(default, for checking against a scan) or the object frame (what MoveIt gets, pose beside it
in FILE.json), with a picture of the result.
"""
from __future__ import annotations

import argparse
import json
import pathlib

FORMATS = (".ply", ".obj", ".glb")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "complete", help="complete an object of a saved map and export a watertight mesh (.ply/.obj/.glb)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("map", type=pathlib.Path, help="a saved map (RUN/map.instascene or from ~/save_map)")
    parser.add_argument("--id", type=int, default=None, help="instance id (default: list the instances and exit)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="mesh file to write: .ply, .obj or .glb")
    parser.add_argument("--frame", choices=["world", "object"], default="world",
                        help="vertex frame of the export; the object pose goes to OUT.json either way")
    parser.add_argument("--generator", default="geometric", choices=["geometric", "diffusion"])
    parser.add_argument("--model-path", default="", help="diffusion generator: local model folder")
    parser.add_argument("--faces", type=int, default=0, help="face budget (0 = preset default)")
    parser.add_argument("--preset", default="cpu", choices=["cpu", "paper"], help="completion budgets")
    parser.set_defaults(run=run)


def run(args) -> int:
    import numpy as np

    from instascene_ros.core.complete.pictures import completion_sheet, save_png
    from instascene_ros.core.pipeline import Pipeline, PipelineConfig

    if args.out is not None and args.out.suffix.lower() not in FORMATS:
        print(f"instascene complete: --out must end in {', '.join(FORMATS)} (got '{args.out.suffix}')")
        return 2
    pipeline = Pipeline(PipelineConfig.from_preset(args.preset))
    try:
        pipeline.load(str(args.map))
    except (OSError, ValueError) as error:
        print(f"instascene complete: cannot load {args.map}: {error}")
        return 2
    instances = pipeline.snapshot.instances
    if args.id is None or args.out is None:
        print(f"{len(instances)} instances in {args.map} (map version {pipeline.snapshot.map_version}):")
        for info in instances:
            print(f"  id {info.id}: {info.n_gaussians} Gaussians, confidence {info.confidence:.2f}")
        print("complete one with --id ID --out FILE.ply")
        return 0 if args.id is None and args.out is None else 2
    pipeline.config.completion.diffusion.model_path = args.model_path

    def progress(stage: str, fraction: float) -> None:
        print(f"\r  {stage:<9} {100 * fraction:5.1f}%", end="", flush=True)

    outcome = pipeline.complete(args.id, max_faces=args.faces, generator=args.generator, on_progress=progress)
    print()
    if not outcome.success:
        print(f"instascene complete: {outcome.message}")
        return 1
    completed = outcome.result.completed
    mesh = completed.mesh_world() if args.frame == "world" else completed.mesh_object()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    mesh.export(args.out)
    record = {"instance_id": args.id, "frame": args.frame, "T_world_object": completed.T_world_object.tolist(),
              "bbox_size": completed.bbox_size.tolist(), "confidence": completed.confidence,
              "generator": completed.generator, "watertight": completed.watertight,
              "generated_views": completed.generated_views, "n_views": completed.n_views,
              "generated_vertex_share": float(np.mean(completed.vertex_generated)), "timings_s": completed.timings,
              "map_version": outcome.result.map_version}
    args.out.with_suffix(args.out.suffix + ".json").write_text(json.dumps(record, indent=2))
    sheet, _ = completion_sheet(completed)
    save_png(sheet, args.out.with_suffix(".png"))
    print(f"{outcome.message}\nwrote {args.out} ({args.frame} frame), {args.out}.json (pose) and "
          f"{args.out.with_suffix('.png')}")
    return 0
