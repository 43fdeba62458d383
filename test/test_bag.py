"""`instascene record` / `instascene play` over real rclpy + Fast DDS processes, bags via `rosbags`.

record: a peer publishes camera frames, CameraInfo, /tf, a latched /tf_static and one of our own
messages (instascene_ros/InstanceEvent); the recorder is stopped with SIGINT and the MCAP bag must
hold the exact bytes. A second recorder (sqlite3, --max-messages) stops by itself.
play: a bag written here with rosbags (sqlite3) is played at 2x; a listener peer checks content,
order, timing and /clock. A looping player must stop cleanly on SIGINT.
"""
import json
import pathlib
import signal
import sys
import time

import pytest

from conftest import communicate_or_dump, wait_for_output

PEERS = pathlib.Path(__file__).parent / "ros_peers"
sys.path.insert(0, str(PEERS))
import bag_peer  # noqa: E402  (the expected messages)

CLI = ["-m", "instascene_ros.cli"]
RECORD_TOPICS = ["/camera/color/image_raw", "/camera/color/camera_info", "/tf", "/tf_static", bag_peer.EVENT_TOPIC]
T0 = 1000 * 10**9  # bag start of the play test: /clock goes 1000.0 s -> 1001.002 s
STEP = 500_000_000


def test_parser_registers_play_and_record():
    from instascene_ros.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["play", "some_bag", "--rate", "0.5", "--loop", "--no-clock", "--topics", "/tf,/a"])
    assert (args.bag, args.rate, args.loop, args.no_clock, args.topics) == ("some_bag", 0.5, True, True, ["/tf", "/a"])
    args = parser.parse_args(["record", "out"])
    assert args.topics == ["/camera/color/image_raw", "/camera/color/camera_info",
                           "/camera/aligned_depth_to_color/image_raw", "/tf", "/tf_static"]
    assert (args.storage, args.duration, args.max_messages) == ("mcap", None, None)
    args = parser.parse_args(["record", "out", "--topics", "/a,/b", "--duration", "2", "--storage", "sqlite3"])
    assert (args.topics, args.duration, args.storage) == (["/a,/b"], 2.0, "sqlite3")
    assert args.run.__name__ == "run_record"
    with pytest.raises(SystemExit):
        parser.parse_args(["play", "bag", "--rate", "0"])


def _messages(bag):
    from rosbags.rosbag2 import Reader

    with Reader(bag) as reader:
        connections = {c.topic: c for c in reader.connections}
        messages = [(c.topic, stamp, bytes(raw)) for c, stamp, raw in reader.messages()]
    return connections, messages


def test_record_writes_exact_bytes_and_survives_sigint(tmp_path, ros_env, ros_processes):
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image

    from instascene_ros.ros.bag import make_typestore

    bag, bag2 = tmp_path / "rec", tmp_path / "rec_sqlite"
    recorder = ros_processes([*CLI, "record", str(bag), "--topics", *RECORD_TOPICS], ros_env)
    counted = ros_processes([*CLI, "record", str(bag2), "--topics", "/tf,/tf_static", "--storage", "sqlite3",
                             "--max-messages", "4"], ros_env)
    wait_for_output(recorder, "recording to", 30)
    wait_for_output(counted, "recording to", 30)
    peer = ros_processes([str(PEERS / "bag_peer.py"), "publish", "2"], ros_env)
    stdout, stderr = peer.communicate(timeout=40)
    assert peer.returncode == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["acked"] and report["matched"]["tf"] == 2, report

    recorder.send_signal(signal.SIGINT)
    stdout, stderr = communicate_or_dump(recorder, 20)
    assert recorder.returncode == 0, stderr
    assert "wrote 9 messages" in stdout, stdout + stderr
    stdout2, stderr2 = communicate_or_dump(counted, 20)  # stops by itself after 4 messages
    assert counted.returncode == 0, stderr2

    assert (bag / "metadata.yaml").exists() and (bag / "rec.mcap").exists()
    connections, messages = _messages(bag)
    typestore = make_typestore()
    for topic, type_name in [("/camera/color/image_raw", "sensor_msgs/msg/Image"),
                             ("/camera/color/camera_info", "sensor_msgs/msg/CameraInfo"),
                             ("/tf", "tf2_msgs/msg/TFMessage"), ("/tf_static", "tf2_msgs/msg/TFMessage"),
                             (bag_peer.EVENT_TOPIC, "instascene_ros/msg/InstanceEvent")]:
        assert connections[topic].msgtype == type_name
        # the publisher's type hash (from the graph) matches the definition written into the bag
        assert connections[topic].digest == typestore.hash_rihs01(type_name), topic
        assert connections[topic].msgdef.data.strip()
    assert connections["/tf_static"].ext.offered_qos_profiles[0].durability.name == "TRANSIENT_LOCAL"

    by_topic = {}
    for topic, _, raw in messages:
        by_topic.setdefault(topic, []).append(raw)
    assert {t: len(v) for t, v in by_topic.items()} == {
        "/camera/color/image_raw": 3, "/camera/color/camera_info": 1, "/tf": 3, "/tf_static": 1,
        bag_peer.EVENT_TOPIC: 1}
    stamps = [stamp for _, stamp, _ in messages]
    assert stamps == sorted(stamps)
    # rclpy equality is field by field. Bytes are not compared whole: Fast CDR leaves alignment padding
    # unzeroed and DDS pads a payload to a multiple of 4, so two serialisations of one message differ there.
    expected = {
        "/camera/color/image_raw": [bag_peer.image_msg(i, bag_peer.BASE_NS + i * bag_peer.STEP_NS) for i in range(3)],
        "/tf": [bag_peer.tf_msg(i, bag_peer.BASE_NS + i * bag_peer.STEP_NS) for i in range(3)],
        "/camera/color/camera_info": [bag_peer.camera_info_msg(bag_peer.BASE_NS)],
        "/tf_static": [bag_peer.tf_msg(7, bag_peer.STATIC_NS, child="camera_link")],
        bag_peer.EVENT_TOPIC: [bag_peer.event_msg()],
    }
    for topic, wanted in expected.items():
        for raw, message in zip(by_topic[topic], wanted):
            assert deserialize_message(raw, type(message)) == message, topic
            assert 0 <= len(raw) - len(serialize_message(message)) < 4, topic  # DDS pads payloads to 4 bytes
    for index, raw in enumerate(by_topic["/camera/color/image_raw"]):
        image = deserialize_message(raw, Image)
        assert image.header.frame_id == f"frame_{index}"
        assert bytes(image.data) == bag_peer.pattern(index).tobytes()
        assert raw.endswith(bag_peer.pattern(index).tobytes())  # pixels are the tail of the raw bytes
    # our own message type also decodes with the definition registered from msg/InstanceEvent.msg
    event = typestore.deserialize_cdr(by_topic[bag_peer.EVENT_TOPIC][0], "instascene_ros/msg/InstanceEvent")
    assert (event.kind, event.instance_id, list(event.merged_ids), event.map_version) == (1, 4, [5, 6], 9)

    connections2, messages2 = _messages(bag2)
    assert (bag2 / "rec_sqlite.db3").exists()
    assert sorted(topic for topic, _, _ in messages2) == ["/tf", "/tf", "/tf", "/tf_static"]


def _write_play_bag(path):
    """Image + CameraInfo + TF every 0.5 s (3 frames), a /tf_static, and a topic of an unknown type."""
    from rclpy.serialization import serialize_message
    from rosbags.rosbag2 import StoragePlugin, Writer

    from instascene_ros.ros.bag import make_typestore

    typestore = make_typestore()
    with Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        add = {topic: writer.add_connection(topic, type_name, typestore=typestore) for topic, type_name in [
            ("/tf_static", "tf2_msgs/msg/TFMessage"), ("/tf", "tf2_msgs/msg/TFMessage"),
            ("/camera/color/camera_info", "sensor_msgs/msg/CameraInfo"),
            ("/camera/color/image_raw", "sensor_msgs/msg/Image")]}
        add["/unknown"] = writer.add_connection("/unknown", "foo_msgs/msg/Bar", msgdef="int32 x",
                                                rihs01="RIHS01_" + "0" * 64)
        writer.write(add["/tf_static"], T0, serialize_message(bag_peer.tf_msg(9, T0, child="camera_link")))
        for index in range(3):
            stamp = T0 + index * STEP
            writer.write(add["/tf"], stamp, serialize_message(bag_peer.tf_msg(index, stamp)))
            writer.write(add["/unknown"], stamp + 500_000, b"\x00\x01\x00\x00\x05\x00\x00\x00")
            writer.write(add["/camera/color/camera_info"], stamp + 1_000_000,
                         serialize_message(bag_peer.camera_info_msg(stamp)))
            writer.write(add["/camera/color/image_raw"], stamp + 2_000_000,
                         serialize_message(bag_peer.image_msg(index, stamp)))
    return T0 + 2 * STEP + 2_000_000  # last message


def test_play_publishes_in_order_with_timing_and_clock(tmp_path, ros_env, ros_processes):
    bag = tmp_path / "play_bag"
    last_ns = _write_play_bag(bag)
    listener = ros_processes([str(PEERS / "bag_peer.py"), "listen", "3", str(last_ns)], ros_env)
    wait_for_output(listener, "ready", 30)
    player = ros_processes([*CLI, "play", str(bag), "--rate", "2", "--wait-for-subscribers", "20"], ros_env)
    stdout, stderr = communicate_or_dump(player, 40)
    assert player.returncode == 0, stderr
    assert "published 10 messages, skipped 3 (/unknown)" in stdout, stdout + stderr
    assert stderr.count("skipping /unknown") == 1
    out, err = listener.communicate(timeout=40)
    assert listener.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    arrivals, clocks = result["arrivals"], result["clocks"]

    images = [a for a in arrivals if a["topic"] == "image"]
    assert [a["index"] for a in images] == [0, 1, 2]
    assert all(a["exact"] for a in images), "image pixels changed"
    assert [a["stamp"] for a in images] == [T0, T0 + STEP, T0 + 2 * STEP]
    infos = [a for a in arrivals if a["topic"] == "info"]
    assert [a["stamp"] for a in infos] == [T0, T0 + STEP, T0 + 2 * STEP]
    assert infos[0]["k"] == [100.0, 0.0, 80.0, 0.0, 101.0, 60.0, 0.0, 0.0, 1.0]
    tfs = [a for a in arrivals if a["topic"] == "tf"]
    assert [round(a["x"], 6) for a in tfs] == [0.0, 0.1, 0.2]
    assert [a["stamp"] for a in tfs] == [a["stamp"] for a in infos]
    statics = [a for a in arrivals if a["topic"] == "tf_static"]
    assert [(a["child"], round(a["x"], 6)) for a in statics] == [("camera_link", 0.9)]
    # frames arrive in bag order (0.25 s apart at --rate 2), never interleaved
    frame_of = [(a["stamp"] - T0) // STEP for a in sorted(arrivals, key=lambda a: a["t"]) if a["topic"] != "tf_static"]
    assert frame_of == sorted(frame_of)
    gaps = [b["t"] - a["t"] for a, b in zip(images, images[1:])]
    assert all(0.15 < gap < 0.5 for gap in gaps), gaps

    assert clocks == sorted(clocks), "/clock went backwards"
    assert max(clocks) == last_ns
    assert min(clocks) < T0 + STEP  # the clock ran before frame 1 ...
    assert any(T0 + 2_000_000 < c < T0 + STEP for c in clocks)  # ... and ticked between messages


def test_play_loop_stops_on_sigint(tmp_path, ros_env, ros_processes):
    bag = tmp_path / "loop_bag"
    _write_play_bag(bag)
    player = ros_processes([*CLI, "play", str(bag), "--rate", "4", "--loop", "--no-clock",
                            "--topics", "/tf,/camera/color/camera_info"], ros_env)
    wait_for_output(player, "playing", 30)
    time.sleep(1.5)  # a pass is 0.25 s at --rate 4
    player.send_signal(signal.SIGINT)
    stdout, stderr = communicate_or_dump(player, 20)
    assert player.returncode == 0, stderr
    published = int(stdout.split("published ")[1].split()[0])
    assert published >= 3 * 6, stdout  # several passes of 3 /tf + 3 camera_info
    assert "skipping" not in stderr  # /unknown was not asked for


def test_sigusr1_prints_where_a_running_command_waits_and_it_goes_on(tmp_path, ros_env, ros_processes):
    # A command that seems stuck tells where it waits (every thread's stack on stderr) and is not
    # stopped by asking: the recorder still records and stops cleanly on SIGINT afterwards.
    recorder = ros_processes([*CLI, "record", str(tmp_path / "usr1"), "--topics", "/tf"], ros_env)
    wait_for_output(recorder, "recording to", 30)
    recorder.send_signal(signal.SIGUSR1)
    time.sleep(1.0)
    assert recorder.poll() is None, "SIGUSR1 stopped the command"
    recorder.send_signal(signal.SIGINT)
    stdout, stderr = communicate_or_dump(recorder, 20)
    assert recorder.returncode == 0, stderr
    assert "most recent call first" in stderr and "instascene_ros/ros/bag.py" in stderr, stderr
