"""The mapper node's ROS parameters: declared with descriptors, read into a typed dataclass.

config/instascene.yaml lists every one of them with a comment; `test_node_parameters` checks
that the YAML and these declarations agree one-to-one.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from rcl_interfaces.msg import ParameterDescriptor, ParameterType


@dataclass
class NodeParameters:
    global_frame: str = "world"
    pose_source: str = "tf"  # "tf" (camera frame from the image header) or "pose_topic"
    use_depth: bool = True
    use_masks: bool = True
    refine_poses: bool = True  # correct keyframe poses against the map by depth ICP (core/pose_refinement.py)
    photometric_poses: bool = True  # with refine_poses: photometric refinement of keyframe poses while mapping
    # keyframe memory budget (core/mapping.KeyframeConfig); 0 = unbounded. 80, not 200: at 200 the
    # store (~0.47 MB a 256 px RGB-D keyframe) was still filling after the live bench's 10-minute
    # stream, held memory over the 5 MB/min "flat" line in five of session 34's six streams; at 80
    # the budget fills before half time; the three live runs at 80 (sessions 37, 40 and 41, the
    # last at these defaults) held -1.72 / 3.71 / 0.06 MB/min (noisy streams -0.72 / 0.15 / -0.08),
    # PSNR -0.34 / -0.34 / +0.17 dB and mIoU -3.6 / +0.9 / +1.2 against offline.
    max_keyframes: int = 80
    preset: str = "cpu"  # mapper preset: "cpu" (2 cores) or "paper" (GPU, published schedule)
    device: str = "cpu"  # "cpu" (numba kernels) or "cuda" (gsplat)
    primitive: str = "3dgs"  # "3dgs" (3D Gaussians) or "2dgs" (2D surfels)
    numba_threads: int = 1
    mapper_nice: int = 10  # the mapping thread's niceness (Linux): the executor's threads preempt it
    sync_slop_s: float = 0.02
    mask_wait_s: float = 1.5
    pose_max_gap_s: float = 0.05
    queue_size: int = 4
    max_image_pixels: int = 1920 * 1080
    workspace_min: list = field(default_factory=lambda: [-10.0, -10.0, -10.0])
    workspace_max: list = field(default_factory=lambda: [10.0, 10.0, 10.0])
    self_filter_mask: str = ""  # PNG of camera pixels showing the robot itself (non-zero = ignore)
    scene_cloud_rate_hz: float = 0.5
    instances_rate_hz: float = 1.0
    diagnostics_rate_hz: float = 1.0
    stall_report_ms: float = 250.0  # ros/stall_watchdog.py; 0 = off
    stall_traceback_file: str = ""  # with stall_report_ms: stacks taken during each stall (faulthandler); "" = off
    overlay_every_n_keyframes: int = 1
    max_scene_cloud_points: int = 50000
    instance_field: str = "instascene"  # decomposition: "instascene", "codebook" (Unified-Lift), "classifier" (baseline)
    mask_contact_border_px: float = 2.0  # the 2D segmenter's boundary error where two masks touch
    table_band_m: float = 0.003  # the table plane's band read as background (core/support_plane.py); 0 = off
    completion_generator: str = "geometric"
    completion_max_faces: int = 5000
    completion_timeout_s: float = 120.0
    completion_model_path: str = ""  # diffusion generator: a local model folder (never downloaded)
    map_directory: str = "~/.ros/instascene"


DESCRIPTIONS = {
    "global_frame": "fixed frame of the map; poses, clouds and meshes are expressed in it",
    "pose_source": "'tf': camera pose from TF (global_frame <- image header frame); 'pose_topic': from ~/pose (PoseStamped)",
    "use_depth": "pair each image with a depth image (32FC1 metres or 16UC1 mm, registered to colour)",
    "refine_poses": "correct each RGB-D keyframe's TF pose by point-to-plane ICP against the map (kinematic and calibration error of a few mm / tenths of a degree); false = trust TF as is",
    "photometric_poses": "with refine_poses: every mapping iteration also steps the trained keyframe's pose down the mapping loss (colour, SSIM, depth; PoseRefinementConfig.photometric_step_*), so keyframes keep agreeing with the map as it grows; false = ICP at insertion only",
    "max_keyframes": "keyframe memory budget: at most this many keyframes (about 0.5 MB each at 256x256 RGB-D with masks, held compact: uint8 image, float16 depth, packed mask; in proportion to pixels); when full, a new view replaces the most redundant keyframe only if it spreads the set out more; 0 = unbounded (a long stream over new ground grows without limit)",
    "use_masks": "wait for 2D instance masks on 'mask' (optional per frame: frames without one are still mapped)",
    "preset": "mapper budgets: 'cpu' (2 cores) or 'paper' (GPU, published iteration counts)",
    "device": "'cpu' (numba kernels) or 'cuda' (gsplat)",
    "primitive": "'3dgs' (3D Gaussians, the default by the mapping bench) or '2dgs' (2D surfels: median depth and normals); the instance layer renders the same",
    "numba_threads": "threads for the CPU splatting kernels (leave one core to the executor)",
    "mapper_nice": "niceness of the mapping thread (and of the threads it starts), 0-19 (Linux, where niceness is per thread): mapping is background work, so services, callbacks and DDS preempt it when the cores are busy; 0 = the same priority as the rest",
    "sync_slop_s": "max stamp difference between an image and its camera_info / depth / mask",
    "mask_wait_s": "how long an image waits for a late mask from a slow segmenter",
    "pose_max_gap_s": "pose_topic: max stamp difference between an image and the nearest pose",
    "queue_size": "frames waiting for the mapper; when full, new frames are dropped and counted",
    "max_image_pixels": "images with more pixels are dropped (memory guard)",
    "workspace_min": "workspace crop box minimum corner [x, y, z] in global_frame; instances outside it are not published",
    "workspace_max": "workspace crop box maximum corner [x, y, z] in global_frame",
    "self_filter_mask": "PNG marking image pixels that show the robot itself (non-zero = ignored); '' = none",
    "scene_cloud_rate_hz": "rate of ~/scene/cloud (Gaussian centres and colours)",
    "instances_rate_hz": "rate of ~/instances, ~/instances/cloud and ~/instances/markers",
    "diagnostics_rate_hz": "rate of /diagnostics",
    "stall_traceback_file": "debugging aid, with stall_report_ms > 0: append every thread's stack, taken *during* each stall by faulthandler's C timer (which needs no GIL), to this file; it shows the thread holding the GIL at the line that holds it; '' = off",
    "stall_report_ms": "warn (with every thread's stack, at most every 10 s) when the whole process stops running Python this long: one thread kept the GIL, so services and callbacks waited; counted in /diagnostics (stalls, stall_worst_ms); 0 = off",
    "overlay_every_n_keyframes": "publish ~/instance_mask and ~/instance_overlay for every n-th keyframe",
    "max_scene_cloud_points": "~/scene/cloud is subsampled to at most this many points",
    "mask_contact_border_px": "pixels this close to a touching mask are not traced by the tracker (about the 2D segmenter's boundary error at contacts; 0 = trace every mask pixel)",
    "table_band_m": "instance masks and pixel queries read a pixel as background when its rendered surface lies less than this many metres above the table plane (the level plane under the scene, fitted to the map's rendered surface in global_frame, z up), and instances (their clouds, completion) leave out Gaussians whose surface lies there; objects thinner than this vanish from the masks; 0 = off",
    "instance_field": "decomposition method: 'instascene' (contrastive field around the tracker's priors), 'codebook' (Unified-Lift slots) or 'classifier' (Gaussian Grouping baseline on video-associated ids)",
    "completion_generator": "default generator for completion: 'geometric' (no weights) or 'diffusion' (local weights)",
    "completion_max_faces": "default face budget of completed meshes",
    "completion_timeout_s": "completion requests running longer are aborted",
    "completion_model_path": "diffusion generator: local model folder (unet/, vae/, scheduler/, instascene_layout.json); '' = not installed",
    "map_directory": "where save_map / load_map resolve relative paths",
}

_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
          float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
          list: ParameterType.PARAMETER_DOUBLE_ARRAY}


def declare_and_read(node) -> NodeParameters:
    """Declare every parameter on `node` (with its description and type) and return their values."""
    defaults = NodeParameters()
    values = {}
    for spec in fields(NodeParameters):
        default = getattr(defaults, spec.name)
        # `stall_report_ms:=100` is what people type: a float parameter takes an integer (dynamic
        # typing lets it through; it is cast below), and anything else is refused by name
        # instead of by rclpy's type exception.
        number = isinstance(default, float)
        descriptor = ParameterDescriptor(description=DESCRIPTIONS[spec.name], type=_TYPES[type(default)],
                                         read_only=True, dynamic_typing=number)
        value = node.declare_parameter(spec.name, default, descriptor).value
        if number:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{spec.name} must be a number, not {value!r}")
            value = float(value)
        values[spec.name] = value
    parameters = NodeParameters(**values)
    validate(parameters)
    return parameters


def validate(parameters: NodeParameters) -> None:
    """Raise ValueError naming the first parameter that cannot work."""
    if parameters.pose_source not in ("tf", "pose_topic"):
        raise ValueError(f"pose_source must be 'tf' or 'pose_topic', not '{parameters.pose_source}'")
    if parameters.preset not in ("cpu", "paper"):
        raise ValueError(f"preset must be 'cpu' or 'paper', not '{parameters.preset}'")
    if parameters.device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', not '{parameters.device}'")
    if parameters.device == "cuda":
        from instascene_ros.core.splat.gsplat_backend import cuda_unavailable_reason

        reason = cuda_unavailable_reason()
        if reason is not None:
            raise ValueError(f"device 'cuda': {reason}")
    if parameters.primitive not in ("3dgs", "2dgs"):
        raise ValueError(f"primitive must be '3dgs' or '2dgs', not '{parameters.primitive}'")
    if parameters.instance_field not in ("instascene", "codebook", "classifier"):
        raise ValueError(f"instance_field must be 'instascene', 'codebook' or 'classifier', not '{parameters.instance_field}'")
    if not parameters.table_band_m >= 0.0:
        raise ValueError(f"table_band_m must be >= 0 (0 = off), not {parameters.table_band_m}")
    if not parameters.mask_contact_border_px >= 0.0:
        raise ValueError(f"mask_contact_border_px must be >= 0, not {parameters.mask_contact_border_px}")
    if parameters.max_keyframes < 0 or parameters.max_keyframes in (1, 2):
        raise ValueError(f"max_keyframes must be 0 (unbounded) or >= 3 (the first, the newest and one to "
                         f"replace), not {parameters.max_keyframes}")
    if not 0 <= parameters.mapper_nice <= 19:
        raise ValueError(f"mapper_nice must be 0-19 (0 = as the rest of the node), not {parameters.mapper_nice}")
    if not parameters.stall_report_ms >= 0.0:
        raise ValueError(f"stall_report_ms must be >= 0 (0 = off), not {parameters.stall_report_ms}")
    if parameters.queue_size < 1:
        raise ValueError("queue_size must be >= 1")
    if len(parameters.workspace_min) != 3 or len(parameters.workspace_max) != 3:
        raise ValueError("workspace_min / workspace_max must have 3 values")
    if any(lo >= hi for lo, hi in zip(parameters.workspace_min, parameters.workspace_max)):
        raise ValueError("workspace_min must be below workspace_max on every axis")
