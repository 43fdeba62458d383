"""Test peer: exercises instascene_node's topics, services and action; prints one JSON line.

usage: node_client.py NODE_NAMESPACE MIN_INSTANCES MIN_FRAMES_MAPPED TIMEOUT_S [SAVE_PATH]

Waits until the node reports MIN_FRAMES_MAPPED mapped frames in /diagnostics and has updated its
instances twice since (idle refinement), or until it lists MIN_INSTANCES instances after that.
"""
import json
import sys
import time

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.action import ActionClient
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import PointCloud2

from instascene_ros.action import CompleteObject
from instascene_ros.msg import InstanceArray
from instascene_ros.ros.conversions import mesh_from_msg
from instascene_ros.ros.messages import read_cloud
from instascene_ros.srv import ForgetInstance, GetCompletedObject, ListInstances, LoadMap, SaveMap, SegmentAtPixel

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def call(node, client, request, timeout=60.0):
    if not client.wait_for_service(timeout_sec=timeout):
        raise RuntimeError(f"service {client.srv_name} not available")
    start = time.perf_counter()
    future = client.call_async(request)
    rclpy.spin_until_future_complete(node, future, timeout_sec=timeout)
    if not future.done():
        raise RuntimeError(f"service {client.srv_name} timed out")
    return future.result(), time.perf_counter() - start


def _diagnostic(state, key) -> int:
    if not state["diagnostics"]:
        return -1
    values = {kv.key: kv.value for kv in state["diagnostics"][-1].status[0].values}
    return int(float(values.get(key, -1)))


def main():
    prefix, min_instances = sys.argv[1].rstrip("/"), int(sys.argv[2])
    min_frames, timeout = int(sys.argv[3]), float(sys.argv[4])
    save_path = sys.argv[5] if len(sys.argv) > 5 else ""
    rclpy.init()
    node = Node("instascene_test_client")
    state = {"arrays": [], "cloud": None, "diagnostics": []}
    node.create_subscription(InstanceArray, f"{prefix}/instances", state["arrays"].append, LATCHED)
    node.create_subscription(PointCloud2, f"{prefix}/instances/cloud", lambda m: state.__setitem__("cloud", m), LATCHED)
    node.create_subscription(DiagnosticArray, "/diagnostics", state["diagnostics"].append, 10)
    clients = {name: node.create_client(kind, f"{prefix}/{name}") for name, kind in [
        ("list_instances", ListInstances), ("segment_at_pixel", SegmentAtPixel),
        ("get_completed_object", GetCompletedObject), ("forget_instance", ForgetInstance),
        ("save_map", SaveMap), ("load_map", LoadMap)]}
    result = {}
    started = time.monotonic()
    deadline = started + timeout
    latencies = []
    version_when_mapped = None
    report_at = 0.0
    while time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.5)
        response, seconds = call(node, clients["list_instances"], ListInstances.Request())
        latencies.append(seconds)
        # every valid frame is either mapped or skipped as covered by a keyframe
        handled = _diagnostic(state, "frames_mapped") + max(_diagnostic(state, "frames_covered"), 0)
        if version_when_mapped is None and handled >= min_frames and _diagnostic(state, "queue_depth") == 0:
            version_when_mapped = response.instances.map_version
        if time.monotonic() - started > report_at:
            report_at += 10.0
            print(f"{time.monotonic() - started:5.0f} s: mapped {_diagnostic(state, 'frames_mapped')} covered "
                  f"{_diagnostic(state, 'frames_covered')} queue {_diagnostic(state, 'queue_depth')} version "
                  f"{response.instances.map_version} instances {len(response.instances.instances)}", file=sys.stderr)
        if version_when_mapped is not None and (response.instances.map_version >= version_when_mapped + 2
                                                and len(response.instances.instances) >= min_instances):
            break
    result["waited_s"] = timeout - (deadline - time.monotonic())
    result["list_latency_p95_s"] = float(np.percentile(latencies, 95)) if latencies else None
    # The instance list and the cloud are published together for each map version; the node
    # keeps refining meanwhile, so take a list and a cloud that belong to the same version.
    # The latched topics can trail the service's answer: a list and cloud of an older version
    # (fewer instances) must not stand in for the version the wait ended on.
    end = time.monotonic() + 15.0
    wanted = response.instances.map_version

    def same_version() -> bool:
        if state["cloud"] is None or not state["arrays"] or state["arrays"][-1].map_version < wanted:
            return False
        cloud_ids = set(np.unique(read_cloud(state["cloud"])["instance"]).tolist())
        return cloud_ids == {i.id for i in state["arrays"][-1].instances}

    while time.monotonic() < end and not same_version():
        rclpy.spin_once(node, timeout_sec=0.2)
    listing = state["arrays"][-1] if same_version() else response.instances
    result["instances"] = [{"id": i.id, "n_gaussians": i.n_gaussians, "map_version": i.map_version,
                            "bbox_min": [i.bbox_min.x, i.bbox_min.y, i.bbox_min.z],
                            "bbox_max": [i.bbox_max.x, i.bbox_max.y, i.bbox_max.z]} for i in listing.instances]
    result["map_version"] = listing.map_version
    if state["cloud"] is not None:
        cloud = read_cloud(state["cloud"])
        result["cloud"] = {"points": np.stack([cloud["x"], cloud["y"], cloud["z"]], 1).tolist(),
                           "instance": cloud["instance"].tolist(), "frame_id": state["cloud"].header.frame_id}
    result["diagnostics"] = {kv.key: kv.value for kv in state["diagnostics"][-1].status[0].values} \
        if state["diagnostics"] else {}
    if listing.instances:
        first = listing.instances[0].id
        seg, seconds = call(node, clients["segment_at_pixel"], SegmentAtPixel.Request(u=10.0, v=10.0, return_mask=True))
        result["segment"] = {"success": seg.success, "message": seg.message, "seconds": seconds,
                             "mask_size": [seg.mask.width, seg.mask.height]}
        result["first_query_answered_s"] = time.monotonic() - started
        completed, seconds = call(node, clients["get_completed_object"], GetCompletedObject.Request(instance_id=first))
        vertices, faces = mesh_from_msg(completed.object.mesh)
        p, q = completed.object.pose.position, completed.object.pose.orientation
        result["completed"] = {"success": completed.success, "message": completed.message, "n_vertices": len(vertices),
                               "n_faces": len(faces), "position": [p.x, p.y, p.z], "seconds": seconds,
                               "orientation_xyzw": [q.x, q.y, q.z, q.w], "id": int(first),
                               "vertex_generated": list(completed.object.vertex_generated),
                               "vertices": vertices.tolist(), "faces": faces.tolist(),
                               "frame_id": completed.object.header.frame_id}
        unknown, _ = call(node, clients["get_completed_object"], GetCompletedObject.Request(instance_id=99999))
        result["completed_unknown"] = {"success": unknown.success, "message": unknown.message}
        action = ActionClient(node, CompleteObject, f"{prefix}/complete_object")
        feedback = []
        if action.wait_for_server(timeout_sec=10.0):
            goal_future = action.send_goal_async(CompleteObject.Goal(instance_id=first),
                                                 feedback_callback=lambda m: feedback.append(m.feedback.progress))
            rclpy.spin_until_future_complete(node, goal_future, timeout_sec=30.0)
            result_future = goal_future.result().get_result_async()
            rclpy.spin_until_future_complete(node, result_future, timeout_sec=60.0)
            action_result = result_future.result().result
            # feedback travels on a topic, the result on a service: a last feedback may still
            # be on its way when the result is in
            end = time.monotonic() + 2.0
            while time.monotonic() < end and (not feedback or feedback[-1] < 1.0):
                rclpy.spin_once(node, timeout_sec=0.1)
            result["action"] = {"success": action_result.success, "message": action_result.message,
                                "feedback": feedback, "n_vertices": len(action_result.object.mesh.vertices)}
        if save_path:
            saved, _ = call(node, clients["save_map"], SaveMap.Request(path=save_path))
            result["save"] = {"success": saved.success, "message": saved.message, "n_instances": saved.n_instances}
            corrupt = save_path + ".corrupt"
            with open(corrupt, "wb") as stream:
                stream.write(b"definitely not a map")
            refused, _ = call(node, clients["load_map"], LoadMap.Request(path=corrupt))
            result["load_corrupt"] = {"success": refused.success, "message": refused.message}
            after, _ = call(node, clients["list_instances"], ListInstances.Request())
            result["instances_after_corrupt_load"] = len(after.instances.instances)
            saved_ids = [i.id for i in after.instances.instances]
        else:
            saved_ids = [i.id for i in listing.instances]
        # Idle refinement re-extracts the live map between our calls, so an instance can drop out
        # for a moment (too few Gaussians after a re-trace): forget one that the node lists now,
        # preferring the first one (the completed one), and that the saved map holds.
        for _ in range(3):
            now, _ = call(node, clients["list_instances"], ListInstances.Request())
            listed = [i.id for i in now.instances.instances]
            candidates = [i for i in [first] + saved_ids if i in listed]
            target = candidates[0] if candidates else first
            forgot, _ = call(node, clients["forget_instance"], ForgetInstance.Request(instance_id=target))
            if forgot.success:
                break
        after, _ = call(node, clients["list_instances"], ListInstances.Request())
        result["forget"] = {"success": forgot.success, "message": forgot.message,
                            "ids_after": [i.id for i in after.instances.instances], "forgotten": target}
        if save_path:
            loaded, _ = call(node, clients["load_map"], LoadMap.Request(path=save_path))
            after, _ = call(node, clients["list_instances"], ListInstances.Request())
            result["load"] = {"success": loaded.success, "message": loaded.message,
                              "ids_after": [i.id for i in after.instances.instances]}
    result["client_s"] = time.monotonic() - started
    print(json.dumps(result), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    main()
