"""instascene_node: posed RGB(-D) [+ masks] in; instances, masks, clouds, services out.

Thin plumbing over `core.pipeline.Pipeline`. Threads: subscription callbacks only decode
stamps and enqueue (they never block); one worker thread owns the mapping work (numba kernels
release the GIL, so the executor keeps serving); services and the action run in their own
callback groups on a multi-threaded executor and read the pipeline's latest immutable snapshot,
so a slow mapping step never stalls a query.
"""
from __future__ import annotations

import contextlib
import gc
import os
import queue
import sys
import threading
import time
from collections import defaultdict

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header
from visualization_msgs.msg import MarkerArray

from instascene_ros.core.resident_memory import release_free_memory, resident_mb
from instascene_ros.msg import InstanceArray, InstanceEvent
from instascene_ros.ros import mapper_services
from instascene_ros.ros.frame_input import (DropReason, FrameAssembler, InputLimits, PoseTopicLookup,
                                            pose_lookup_from_tf, stamp_seconds)
from instascene_ros.ros.messages import diagnostics, instance_markers, make_cloud
from instascene_ros.ros.stall_watchdog import StallWatchdog
from instascene_ros.ros.node_main import run_node
from instascene_ros.ros.conversions import numpy_to_image
from instascene_ros.ros.parameters import declare_and_read
from instascene_ros.ros.sync import ApproximateSync, SyncConfig
from instascene_ros.ros.tf_buffer import TfListener, TransformBuffer, TransformError

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
TF_HISTORY_S = 300.0
RELEASE_MEMORY_EVERY_S = 15.0  # see InstaSceneNode._release_freed_memory


class InstaSceneNode(Node):
    def __init__(self, **kwargs):
        super().__init__("instascene_node", **kwargs)
        self.params = declare_and_read(self)
        from instascene_ros.core.pipeline import Pipeline, PipelineConfig  # heavy: torch, numba

        self.pipeline = Pipeline(PipelineConfig.from_node_parameters(self.params))
        # Compile the CPU kernels now, not on the first keyframe (13 s on a cold numba cache).
        self.get_logger().info(f"CPU kernels ready in {self.pipeline.warm_up():.1f} s")
        # Everything alive now (the libraries' ~460k functions, tuples, dicts) lives as long as the
        # node: out of the cyclic collector's sight, a full collection stops walking it with the
        # GIL held (200 ms with every thread waiting; < 1 ms frozen). It is not all that stalls
        # the live bench's queries (see stall_watchdog and the README's live section).
        gc.collect()
        gc.freeze()
        # Counted once: gc.get_freeze_count() walks the whole frozen list with the GIL held (at
        # 2 Hz in publish_diagnostics it stalled every thread ~45 ms twice a second; py-spy).
        self.gc_frozen_objects = gc.get_freeze_count()
        self.drops: dict[str, int] = defaultdict(int)
        self.stage_seconds: dict[str, float] = {}
        self.frames_in = self.frames_mapped = self.frames_covered = 0
        self.map_settled = False  # see publish_diagnostics
        self._memory_released_at = 0.0
        self.memory_trim_worst_s = 0.0
        # Resident memory just after each release (see publish_diagnostics), and how many so far.
        self.rss_after_release_mb = float("nan")
        self.keyframe_store_after_release_mb = float("nan")
        self.memory_releases = 0
        self._queue: queue.Queue = queue.Queue(maxsize=self.params.queue_size)
        self._stop = threading.Event()

        input_group = MutuallyExclusiveCallbackGroup()
        self.service_group = ReentrantCallbackGroup()
        timer_group = MutuallyExclusiveCallbackGroup()

        if self.params.pose_source == "tf":
            # Frames wait in the queue while the CPU maps (tens of seconds at worst), and their pose is
            # looked up when they are mapped: keep far more TF history than tf2's 10 s default.
            self.tf_buffer = TransformBuffer(cache_seconds=TF_HISTORY_S)
            self.tf_listener = TfListener(self, self.tf_buffer, callback_group=input_group)
            lookup = pose_lookup_from_tf(self.tf_buffer, self.params.global_frame)
        else:
            lookup = self.pose_topic = PoseTopicLookup(self.params.global_frame, self.params.pose_max_gap_s)
            self.create_subscription(PoseStamped, "~/pose", self._on_pose, RELIABLE, callback_group=input_group)
        self.assembler = FrameAssembler(lookup, InputLimits(max_image_pixels=self.params.max_image_pixels),
                                        self_filter=self._load_self_filter(self.params.self_filter_mask))

        required = ["camera_info"] + (["depth"] if self.params.use_depth else [])
        optional = ["mask"] if self.params.use_masks else []
        self.sync = ApproximateSync(required, optional, self._on_synced, self._count_drop,
                                    SyncConfig(slop_s=self.params.sync_slop_s, max_wait_s=self.params.mask_wait_s))
        sensor = qos_profile_sensor_data
        self.create_subscription(Image, "image", self._on_image, sensor, callback_group=input_group)
        self.create_subscription(CompressedImage, "image/compressed", self._on_image, sensor, callback_group=input_group)
        self.create_subscription(CameraInfo, "camera_info", lambda m: self._on_stream("camera_info", m), sensor,
                                 callback_group=input_group)
        if self.params.use_depth:
            self.create_subscription(Image, "depth", lambda m: self._on_stream("depth", m), sensor,
                                     callback_group=input_group)
        if self.params.use_masks:
            # masks come from a segmenter a second late: reliable, so none is lost to a burst
            self.create_subscription(Image, "mask", lambda m: self._on_stream("mask", m), RELIABLE,
                                     callback_group=input_group)

        self.pub_instance_cloud = self.create_publisher(PointCloud2, "~/instances/cloud", LATCHED)
        self.pub_instances = self.create_publisher(InstanceArray, "~/instances", LATCHED)
        self.pub_events = self.create_publisher(InstanceEvent, "~/instances/events", QoSProfile(
            depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        self.pub_markers = self.create_publisher(MarkerArray, "~/instances/markers", LATCHED)
        self.pub_mask = self.create_publisher(Image, "~/instance_mask", RELIABLE)
        self.pub_overlay = self.create_publisher(Image, "~/instance_overlay", RELIABLE)
        self.pub_scene_cloud = self.create_publisher(PointCloud2, "~/scene/cloud", LATCHED)
        self.pub_diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", RELIABLE)

        mapper_services.register(self)
        self._published_version = -1
        self._period_timer(self.params.instances_rate_hz, self.publish_instances, timer_group)
        # its own group: it waits for the mapping lock, the other timers must not wait with it
        self._period_timer(self.params.scene_cloud_rate_hz, self.publish_scene_cloud,
                           MutuallyExclusiveCallbackGroup())
        self._period_timer(self.params.diagnostics_rate_hz, self.publish_diagnostics, timer_group)
        self.stall_watchdog = None
        if self.params.stall_report_ms > 0.0:
            traceback_file = os.path.expanduser(self.params.stall_traceback_file) or None
            try:
                self.stall_watchdog = StallWatchdog(self.params.stall_report_ms / 1000.0, self.get_logger().warning,
                                                    traceback_file=traceback_file).start()
            except OSError as error:  # run_node reports a ValueError as "cannot start: ..."
                raise ValueError(f"stall_traceback_file '{traceback_file}' cannot be opened: {error}") from error
        self._worker_tid = None
        self._worker = threading.Thread(target=self._work, name="instascene-mapper", daemon=True)
        self._worker.start()
        self.get_logger().info(f"ready: preset={self.params.preset} device={self.params.device} "
                               f"primitive={self.params.primitive} pose_source={self.params.pose_source} "
                               f"global_frame={self.params.global_frame}")

    @staticmethod
    def _load_self_filter(path: str):
        if not path:
            return None
        from PIL import Image as PILImage
        path = os.path.expanduser(path)
        if not os.path.exists(path):
            raise ValueError(f"self_filter_mask '{path}' does not exist")
        with PILImage.open(path) as image:
            return np.asarray(image.convert("L")) > 0

    def _period_timer(self, rate_hz: float, callback, group) -> None:
        if rate_hz > 0:
            self.create_timer(1.0 / rate_hz, callback, callback_group=group)

    # ------------------------------------------------------------------ input (never blocks)
    def _count_drop(self, reason: str) -> None:
        self.drops[reason] += 1
        self.get_logger().warning(f"dropped frame: {reason}", throttle_duration_sec=5.0)

    def _on_pose(self, msg: PoseStamped) -> None:
        try:
            self.pose_topic.add(msg)
        except TransformError as error:
            self._count_drop(f"bad pose: {error}")

    def _on_stream(self, name: str, msg) -> None:
        self.sync.add(name, stamp_seconds(msg.header.stamp), msg)

    def _on_image(self, msg) -> None:
        self.frames_in += 1
        self.sync.add_image(stamp_seconds(msg.header.stamp), msg)

    def _on_synced(self, synced) -> None:
        if self._covered_by_keyframe(synced):
            self.frames_covered += 1
            return
        try:
            self._queue.put_nowait(synced)
        except queue.Full:
            self._count_drop("mapper busy: queue full")

    def _covered_by_keyframe(self, synced) -> bool:
        """A frame whose pose is already covered by a keyframe would be skipped by the mapper:
        skip it here, so that the bounded queue holds only frames that can become keyframes and
        a 10 Hz camera does not crowd new views out while a keyframe is being mapped. Without a
        pose yet (TF still on its way), the frame is queued and judged by the mapper."""
        try:
            T_world_cam = self.assembler.lookup_pose(synced.image.header.frame_id, synced.stamp)
            return self.pipeline.mapper.covered(np.asarray(T_world_cam, float))[0]
        except Exception:  # no pose now: the worker looks it up again and reports why it failed
            return False

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        self._worker_tid = threading.get_native_id()
        refused = lower_this_threads_priority(self.params.mapper_nice)
        if refused:
            self.get_logger().warning(f"mapper_nice {self.params.mapper_nice} not applied: {refused}")
        while not self._stop.is_set():
            try:
                synced = self._queue.get(timeout=0.2)
            except queue.Empty:
                self._idle()
                continue
            try:
                self._map_one(synced)
            except Exception as error:  # the node must outlive any single frame
                self.drops[f"internal error: {type(error).__name__}"] += 1
                self.get_logger().error(f"frame at {synced.stamp:.3f} failed: {error!r}")

    def _idle(self) -> None:
        """No frame waiting: let the pipeline refine the map and refresh the instances."""
        try:
            timings = self.pipeline.idle_step()
        except Exception as error:  # the node must outlive any refinement failure
            self.drops[f"internal error: {type(error).__name__}"] += 1
            self.get_logger().error(f"idle refinement failed: {error!r}", throttle_duration_sec=10.0)
            return
        self.stage_seconds.update(timings)
        if timings:
            self._release_freed_memory()
        # Asked here, on the worker (the pipeline lock is free): diagnostics only read the flag.
        self.map_settled = self.pipeline.settled
        for event in self.pipeline.drain_events():
            self.pub_events.publish(mapper_services.event_msg(self, event))

    def _release_freed_memory(self) -> None:
        """Give the memory that mapping and instance updates freed back to the system (see
        core/resident_memory), at most every RELEASE_MEMORY_EVERY_S: glibc locks each heap while
        it trims, and a query thread allocating meanwhile waits. (Trimming after every step with
        the heaps limited to two, the live bench's mask-query p95 went 82 -> 120 ms.)"""
        now = time.monotonic()
        if now - self._memory_released_at >= RELEASE_MEMORY_EVERY_S:
            watchdog = self.stall_watchdog
            with watchdog.episode("malloc_trim (freed memory given back)") if watchdog else contextlib.nullcontext():
                release_free_memory()
            self._memory_released_at = time.monotonic()
            self.memory_trim_worst_s = max(self.memory_trim_worst_s, self._memory_released_at - now)
            self.rss_after_release_mb = resident_mb()
            self.keyframe_store_after_release_mb = self.pipeline.keyframe_store_bytes() / 2**20
            self.memory_releases += 1

    def _map_one(self, synced) -> None:
        start = time.perf_counter()
        try:
            frame = self.assembler.assemble(synced.image, synced.others["camera_info"], synced.others.get("depth"),
                                            synced.others.get("mask"))
        except DropReason as drop:
            self.drops[drop.key] += 1
            self.get_logger().warning(f"frame {synced.stamp:.3f} dropped ({drop.key}): {drop.detail}",
                                   throttle_duration_sec=5.0)
            return
        self.stage_seconds["decode"] = time.perf_counter() - start
        report = self.pipeline.add_frame(frame)
        self.stage_seconds.update(report.timings)
        if not report.accepted:
            self.drops[f"rejected_{report.reason}"] += 1
            self.get_logger().warning(f"frame {synced.stamp:.3f} rejected: {report.detail}", throttle_duration_sec=5.0)
            return
        self.frames_mapped += 1
        if report.keyframe:
            self.map_settled = False
            self._release_freed_memory()
            if self.pipeline.mapper.keyframes_made % max(1, self.params.overlay_every_n_keyframes) == 0:
                self._publish_frame_masks(frame, synced.image.header)
        for event in self.pipeline.drain_events():
            self.pub_events.publish(mapper_services.event_msg(self, event))

    # ------------------------------------------------------------------ output
    def header(self, stamp=None) -> Header:
        return Header(stamp=stamp or self.get_clock().now().to_msg(), frame_id=self.params.global_frame)

    def _publish_frame_masks(self, frame, image_header) -> None:
        from instascene_ros.core.viz import overlay

        ids = self.pipeline.instance_mask(frame.camera)
        self.pub_mask.publish(numpy_to_image(ids.astype(np.int32), "32SC1", header=image_header))
        self.pub_overlay.publish(numpy_to_image(overlay(frame.rgb, ids)[..., ::-1], "bgr8", header=image_header))

    def publish_instances(self) -> None:
        snapshot = self.pipeline.snapshot
        if snapshot.map_version == self._published_version:
            return
        header = self.header()
        self.pub_instances.publish(mapper_services.instance_array(self, snapshot, header))
        self.pub_instance_cloud.publish(make_cloud(header, snapshot.cloud_points, snapshot.cloud_colors,
                                                   snapshot.cloud_ids.astype(np.uint32)))
        self.pub_markers.publish(instance_markers(header, snapshot.instances, table=snapshot.table_plane))
        self._published_version = snapshot.map_version

    def publish_scene_cloud(self) -> None:
        try:
            points, colors = self.pipeline.scene_cloud(self.params.max_scene_cloud_points)
        except Exception as error:  # a timer's exception would end the executor, and the node with it
            self.drops[f"internal error: {type(error).__name__}"] += 1
            self.get_logger().error(f"scene cloud failed: {error!r}", throttle_duration_sec=10.0)
            return
        self.pub_scene_cloud.publish(make_cloud(self.header(), points, colors, np.zeros(len(points), np.uint32)))

    def publish_diagnostics(self) -> None:
        import resource

        snapshot = self.pipeline.snapshot
        # keyframes: held now (at most max_keyframes); keyframes_made: ever taken by this map (the
        # budget's replacements included). Both the mapper's, counted at the same moment.
        mapper = self.pipeline.mapper
        values = {"frames_in": self.frames_in, "frames_mapped": self.frames_mapped,
                  "keyframes": len(mapper.keyframes), "keyframes_made": mapper.keyframes_made,
                  "frames_covered": self.frames_covered,
                  "queue_depth": self._queue.qsize(), "queue_size": self.params.queue_size,
                  "drops_total": sum(self.drops.values()), "n_gaussians": snapshot.n_gaussians,
                  "n_instances": len(snapshot.instances), "map_version": snapshot.map_version,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                  "rss_mb": resident_mb(),
                  # the map has spent its refinement budget and the instances have caught up
                  # with it (what the end of an offline run gives); false again at a new keyframe
                  "map_settled": self.map_settled}
        # Reads a few ints of the mapper's counters (no lock needed for a diagnostic).
        pose_stats = dict(self.pipeline.mapper.pose_stats)
        values.update({"keyframe_poses_refined": pose_stats["refined"], "keyframe_poses_kept": pose_stats["kept"],
                       "keyframe_poses_reverted": pose_stats.get("reverted", 0),
                       "keyframe_poses_kept_by_neighbours": pose_stats.get("kept_by_neighbours", 0),
                       "keyframe_pose_photometric_steps": pose_stats.get("photometric_steps", 0)})
        if self.stall_watchdog is not None:
            watchdog = self.stall_watchdog
            values.update({"stalls": watchdog.stalls, "stall_worst_ms": round(watchdog.worst_s * 1000.0, 1),
                           # the stalls' time, and how much of it the watchdog waited for a CPU or
                           # the hypervisor took (the rest: some thread kept the GIL)
                           "stall_total_ms": round(watchdog.stalled_s * 1000.0, 1),
                           "stall_cpu_wait_ms": round(watchdog.cpu_wait_s * 1000.0, 1),
                           "stall_steal_ms": round(watchdog.steal_s * 1000.0, 1),
                           "gc_worst_ms": round(watchdog.gc_worst_s * 1000.0, 1)})
        values["gc_frozen_objects"] = self.gc_frozen_objects
        values["memory_trim_worst_ms"] = round(self.memory_trim_worst_s * 1000.0, 1)
        # rss_mb, sampled whenever diagnostics go out, swings by the working set of whatever
        # step the worker is in (150-190 MB between the 5th and 95th percentile on the live
        # bench); measured right after the worker's step and the release, it is what the map
        # and the process hold, at the same point of every cycle: the series a leak shows in.
        values["rss_after_release_mb"] = round(self.rss_after_release_mb, 1)
        # Of which the keyframes' images, masks and tracker records, at the same moment: the map
        # grows by these until the keyframe budget (max_keyframes) is full. Held memory growing
        # faster than this is not the map.
        values["keyframe_store_mb"] = round(self.keyframe_store_after_release_mb, 1)
        values["memory_releases"] = self.memory_releases
        if self._worker_tid is not None and sys.platform == "linux":
            try:  # what the kernel holds for the mapping thread, not what was asked
                values["mapper_thread_nice"] = os.getpriority(os.PRIO_PROCESS, self._worker_tid)
            except OSError:
                pass
        values.update({f"drops/{reason}": count for reason, count in self.drops.items()})
        values.update({f"seconds/{stage}": seconds for stage, seconds in self.stage_seconds.items()})
        healthy = self._queue.qsize() < self.params.queue_size
        self.pub_diagnostics.publish(diagnostics(self.header(), self.get_fully_qualified_name(), healthy,
                                                 "mapping" if healthy else "queue full: frames are being dropped",
                                                 values))

    def shutdown(self) -> None:
        self._stop.set()
        self._worker.join(timeout=10.0)
        if self.stall_watchdog is not None:
            self.stall_watchdog.stop()


def lower_this_threads_priority(nice: int) -> str:
    """Give the calling thread niceness `nice` (> 0: lower priority), and with it every thread it
    starts later (numba's and torch's pools, where it starts them). Returns why not, or "".

    Why: on a robot's few cores the mapper keeps a core busy all the time; at the same priority
    the scheduler shares that core evenly with the executor's threads and DDS, so a service call
    waits in the run queue behind a mapping step (on the live bench the executor's threads spent
    longer runnable without a CPU than running; the gain there is within its run-to-run spread, see
    the README's live section). Niceness is per thread on Linux only; elsewhere
    `setpriority` would lower the whole process, queries included, so it is left alone."""
    if nice <= 0:
        return ""
    if sys.platform != "linux":
        return f"per-thread niceness is Linux's, not {sys.platform}'s"
    try:
        # who = 0: the calling thread (Linux/NPTL). Never above what it already has: a node
        # started with `nice` stays at least that nice (and raising needs privileges).
        os.setpriority(os.PRIO_PROCESS, 0, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))
    except OSError as error:
        return str(error)
    return ""


def main(args=None) -> int:
    # a parameter that cannot work raises ValueError in the constructor
    return run_node(InstaSceneNode, "instascene_node", (ValueError,), num_threads=4, args=args)


if __name__ == "__main__":
    sys.exit(main())
