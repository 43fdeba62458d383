"""Services and the completion action of instascene_node (thin: requests -> pipeline -> responses).

Read-only queries (list_instances, segment_at_pixel) answer from the pipeline's latest snapshot
and never wait for mapping. Map-changing requests (forget, clear, load, reset) take the
pipeline's lock, so they wait for at most the mapping step in progress. Completion runs under
its own timeout and can be cancelled; a failed or cancelled completion leaves the map as it was.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from std_srvs.srv import Trigger

from instascene_ros.action import CompleteObject
from instascene_ros.msg import Instance, InstanceArray, InstanceEvent
from instascene_ros.ros.conversions import mesh_to_msg, numpy_to_image, pose_from_matrix, vector3
from instascene_ros.ros.messages import color_msg
from instascene_ros.srv import (ClearRegion, ForgetInstance, GetCompletedObject, ListInstances, LoadMap, SaveMap,
                                SegmentAtPixel)

EVENT_KINDS = {"created": InstanceEvent.CREATED, "merged": InstanceEvent.MERGED, "forgotten": InstanceEvent.FORGOTTEN}


def register(node) -> None:
    group = node.service_group
    node.create_service(ListInstances, "~/list_instances", lambda req, res: list_instances(node, req, res),
                        callback_group=group)
    node.create_service(GetCompletedObject, "~/get_completed_object",
                        lambda req, res: get_completed_object(node, req, res), callback_group=group)
    node.create_service(SegmentAtPixel, "~/segment_at_pixel", lambda req, res: segment_at_pixel(node, req, res),
                        callback_group=group)
    node.create_service(ForgetInstance, "~/forget_instance", lambda req, res: forget_instance(node, req, res),
                        callback_group=group)
    node.create_service(ClearRegion, "~/clear_region", lambda req, res: clear_region(node, req, res),
                        callback_group=group)
    node.create_service(SaveMap, "~/save_map", lambda req, res: save_map(node, req, res), callback_group=group)
    node.create_service(LoadMap, "~/load_map", lambda req, res: load_map(node, req, res), callback_group=group)
    node.create_service(Trigger, "~/reset", lambda req, res: reset(node, req, res), callback_group=group)
    node.completion_server = ActionServer(
        node, CompleteObject, "~/complete_object", execute_callback=lambda goal: complete_action(node, goal),
        goal_callback=lambda goal: GoalResponse.ACCEPT, cancel_callback=lambda goal: CancelResponse.ACCEPT,
        callback_group=group)


# ------------------------------------------------------------------------------------ messages
def instance_msg(summary, map_version: int) -> Instance:
    return Instance(id=int(summary.id), label=summary.label, color=color_msg(summary.color),
                    bbox_min=_point(summary.bbox_min), bbox_max=_point(summary.bbox_max),
                    n_gaussians=int(summary.n_gaussians), observed_fraction=float(summary.observed_fraction),
                    confidence=float(summary.confidence), map_version=int(map_version))


def _point(values):
    from geometry_msgs.msg import Point
    return Point(x=float(values[0]), y=float(values[1]), z=float(values[2]))


def instance_array(node, snapshot, header) -> InstanceArray:
    return InstanceArray(header=header, map_version=int(snapshot.map_version),
                         instances=[instance_msg(s, snapshot.map_version) for s in snapshot.instances])


def event_msg(node, event) -> InstanceEvent:
    return InstanceEvent(header=node.header(), kind=EVENT_KINDS[event.kind], instance_id=int(event.instance_id),
                         merged_ids=[int(i) for i in event.merged_ids], map_version=int(event.map_version))


def completed_object_msg(node, result):
    from instascene_ros.msg import CompletedObject

    message = CompletedObject(header=node.header(), instance_id=int(result.instance_id),
                              mesh=mesh_to_msg(result.vertices_object, result.faces),
                              pose=pose_from_matrix(result.T_world_object), bbox_size=vector3(result.bbox_size),
                              confidence=float(result.confidence), n_views=int(result.n_views),
                              generator=result.generator, map_version=int(result.map_version))
    message.vertex_generated = [int(flag) for flag in np.asarray(result.vertex_generated, np.uint8)]
    message.generated_views = [int(view) for view in result.generated_views]
    return message


# ------------------------------------------------------------------------------------ handlers
def list_instances(node, request, response):
    response.instances = instance_array(node, node.pipeline.snapshot, node.header())
    response.success = True
    response.message = f"{len(response.instances.instances)} instances at map version {response.instances.map_version}"
    return response


def segment_at_pixel(node, request, response):
    stamp = request.stamp.sec + request.stamp.nanosec * 1e-9
    try:
        instance_id, similarity, mask, header_stamp = node.pipeline.segment_at_pixel(
            stamp, float(request.u), float(request.v), bool(request.return_mask))
    except (ValueError, LookupError) as error:
        response.success, response.message = False, str(error)
        return response
    response.success = True
    response.instance_id, response.similarity = int(instance_id), float(similarity)
    response.message = "background" if instance_id == 0 else f"instance {instance_id}"
    if mask is not None:
        response.mask = numpy_to_image(mask.astype(np.uint8) * 255, "mono8", header=node.header())
    return response


def forget_instance(node, request, response):
    error = node.pipeline.forget_instance(int(request.instance_id))
    response.success, response.message = error is None, error or f"forgot instance {request.instance_id}"
    response.map_version = int(node.pipeline.snapshot.map_version)
    _publish_events(node)
    return response


def clear_region(node, request, response):
    lo = np.array([request.min.x, request.min.y, request.min.z])
    hi = np.array([request.max.x, request.max.y, request.max.z])
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))) or np.any(lo >= hi):
        response.success, response.message = False, "min must be finite and below max on every axis"
        return response
    removed, forgotten = node.pipeline.clear_region(lo, hi)
    response.success = True
    response.n_removed_gaussians, response.forgotten_ids = int(removed), [int(i) for i in forgotten]
    response.message = f"removed {removed} Gaussians, forgot {len(forgotten)} instances"
    response.map_version = int(node.pipeline.snapshot.map_version)
    _publish_events(node)
    return response


def _resolve(node, path: str) -> str:
    path = os.path.expanduser(path or "map.instascene")
    return path if os.path.isabs(path) else os.path.join(os.path.expanduser(node.params.map_directory), path)


def save_map(node, request, response):
    path = _resolve(node, request.path)
    try:
        info = node.pipeline.save(path)
    except (OSError, ValueError) as error:
        response.success, response.message = False, f"could not save to {path}: {error}"
        return response
    response.success, response.message = True, f"saved to {path}"
    response.map_version, response.n_gaussians, response.n_instances = info
    return response


def load_map(node, request, response):
    path = _resolve(node, request.path)
    try:
        info = node.pipeline.load(path)
    except (OSError, ValueError) as error:
        response.success, response.message = False, f"refused {path}: {error} (the current map is unchanged)"
        return response
    response.success, response.message = True, f"loaded {path}"
    response.map_version, response.n_gaussians, response.n_instances = info
    return response


def reset(node, request, response):
    node.pipeline.reset()
    response.success, response.message = True, f"map cleared (map version {node.pipeline.snapshot.map_version})"
    return response


def _publish_events(node) -> None:
    for event in node.pipeline.drain_events():
        node.pub_events.publish(event_msg(node, event))


def _complete(node, instance_id, max_faces, generator, timeout_s, on_progress, cancelled):
    generator = generator or node.params.completion_generator
    max_faces = max_faces or node.params.completion_max_faces
    deadline = time.monotonic() + (timeout_s or node.params.completion_timeout_s)
    should_stop = lambda: cancelled() or time.monotonic() > deadline  # noqa: E731
    return node.pipeline.complete(instance_id, max_faces=max_faces, generator=generator, on_progress=on_progress,
                                  should_stop=should_stop)


def get_completed_object(node, request, response):
    outcome = _complete(node, int(request.instance_id), int(request.max_faces), request.generator, 0.0,
                        on_progress=None, cancelled=lambda: False)
    response.success, response.message = outcome.success, outcome.message
    if outcome.success:
        response.object = completed_object_msg(node, outcome.result)
    return response


def complete_action(node, goal_handle):
    goal = goal_handle.request
    feedback = CompleteObject.Feedback()
    cancelled = threading.Event()

    def on_progress(stage: str, fraction: float) -> None:
        feedback.stage, feedback.progress = stage, float(fraction)
        goal_handle.publish_feedback(feedback)
        if goal_handle.is_cancel_requested:
            cancelled.set()

    outcome = _complete(node, int(goal.instance_id), int(goal.max_faces), goal.generator, float(goal.timeout_s),
                        on_progress=on_progress, cancelled=lambda: cancelled.is_set() or goal_handle.is_cancel_requested)
    result = CompleteObject.Result(success=outcome.success, message=outcome.message)
    if outcome.success:
        result.object = completed_object_msg(node, outcome.result)
        goal_handle.succeed()
    elif goal_handle.is_cancel_requested:
        goal_handle.canceled()
    else:
        goal_handle.abort()
    return result
