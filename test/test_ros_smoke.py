"""Cross-process smoke test over real rclpy + Fast DDS (issue 2, item 8).

Process 1 publishes sensor_msgs/Image and serves our rosidl-built GetCompletedObject; process 2
receives the images bit-exactly and calls the service. Nothing is mocked.
"""
import json
import pathlib

import numpy as np

PEERS = pathlib.Path(__file__).parent / "ros_peers"


def test_image_stream_and_completion_service_between_processes(ros_env, ros_processes):
    server = ros_processes([str(PEERS / "smoke_server.py")], ros_env)
    assert server.stdout.readline().strip() == "READY", server.stderr.read()
    client = ros_processes([str(PEERS / "smoke_client.py"), "5"], ros_env)
    stdout, stderr = client.communicate(timeout=90)
    assert client.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])

    images = result["images"]
    assert len(images) >= 5, f"received only {len(images)} images"
    assert all(image["exact"] for image in images), "image pixels changed in transit"
    indices = [image["index"] for image in images]
    assert indices == sorted(indices), "images arrived out of order"

    known, unknown = result["answers"]
    assert known["success"] and known["message"].startswith("placeholder")
    assert np.allclose(known["vertices"][1], [0.1, 0.0, 0.0])
    assert known["faces"] == [[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]
    assert np.allclose(known["position"], [0.5, -0.2, 0.75])
    assert known["generator"] == "geometric"
    assert not unknown["success"] and "unknown instance 8" in unknown["message"]

    assert server.poll() is None, "server died during the exchange"


def test_server_shuts_down_cleanly_on_sigint(ros_env, ros_processes):
    server = ros_processes([str(PEERS / "smoke_server.py")], ros_env)
    assert server.stdout.readline().strip() == "READY"
    server.send_signal(2)
    server.wait(timeout=15)
    assert server.returncode == 0, server.stderr.read()
