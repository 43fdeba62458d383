"""rosbag2 record and replay without rosbag2_py: rclpy talks to the graph, `rosbags` reads/writes files.

`record(bag, topics)` subscribes with raw (serialized) subscriptions and writes the bytes exactly as
received into an MCAP or sqlite3 rosbag2 bag. `play(bag)` publishes each message's bytes with the
bag's timing (scaled by `rate`) and publishes /clock from the bag's timestamps, so nodes with
`use_sim_time:=true` follow the bag. Bags are version 9 (what Kilted's `ros2 bag` writes) and are
read by `ros2 bag` on a full ROS install as well as by `rosbags`.

Message definitions (needed in a bag's metadata) come from the rosbags typestore of the nearest ROS
distro; types it lacks (our `instascene_ros/msg/*`, ...) are registered from the .msg files of this
package and of `<prefix>/share/<pkg>/msg/` under the venv and AMENT_PREFIX_PATH.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger("instascene.bag")

DEFAULT_RECORD_TOPICS = (
    "/camera/color/image_raw",
    "/camera/color/camera_info",
    "/camera/aligned_depth_to_color/image_raw",
    "/tf",
    "/tf_static",
)
STORAGES = ("mcap", "sqlite3")
BAG_VERSION = 9
PACKAGE_NAME = "instascene_ros"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
CLOCK_HZ = 40.0  # /clock updates between messages, like `ros2 bag play --clock 40`
_PREFERRED_STORES = ("ROS2_KILTED", "ROS2_JAZZY", "ROS2_IRON", "ROS2_HUMBLE")


class BagError(RuntimeError):
    """A bag that cannot be written or read (bad path, unknown storage, ...)."""


# --------------------------------------------------------------------------------------------- types

def msg_search_dirs() -> list[tuple[str, Path]]:
    """(package, msg folder) pairs, first one wins: this package's msg/, then every share/<pkg>/msg."""
    found: list[tuple[str, Path]] = []
    if (PACKAGE_ROOT / "msg").is_dir():
        found.append((PACKAGE_NAME, PACKAGE_ROOT / "msg"))
    prefixes = [Path(sys.prefix)]
    prefixes += [Path(p) for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    seen = set()
    for prefix in prefixes:
        share = prefix / "share"
        if share in seen or not share.is_dir():
            continue
        seen.add(share)
        for msg_dir in sorted(share.glob("*/msg")):
            found.append((msg_dir.parent.name, msg_dir))
    return found


def make_typestore():
    """A rosbags typestore for the distro closest to Kilted, plus the types it lacks from .msg files.

    Only types missing from the store are read from disk (never redefining a store's type).
    """
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = next(getattr(Stores, name) for name in _PREFERRED_STORES if hasattr(Stores, name))
    typestore = get_typestore(store)
    missing: dict = {}
    for package, msg_dir in msg_search_dirs():
        for path in sorted(msg_dir.glob("*.msg")):
            name = f"{package}/msg/{path.stem}"
            if name in typestore.fielddefs or name in missing:
                continue
            try:
                missing.update(get_types_from_msg(path.read_text(), name))
            except Exception as error:  # a .msg rosbags cannot parse: that type just stays unknown
                log.debug("cannot parse %s: %s", path, error)
    if missing:
        try:
            typestore.register(missing)
        except Exception:  # register one by one so one bad definition does not hide the others
            for name, definition in missing.items():
                with contextlib.suppress(Exception):
                    typestore.register({name: definition})
    return typestore


def message_class(type_name: str):
    """The rclpy message class of 'pkg/msg/Name' (or 'pkg/Name'); None when it cannot be imported."""
    parts = type_name.split("/")
    if len(parts) == 3:
        package, interface, name = parts
    elif len(parts) == 2:
        (package, name), interface = parts, "msg"
    else:
        return None
    try:
        return getattr(importlib.import_module(f"{package}.{interface}"), name)
    except (ImportError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------- plumbing

class _StopFlag:
    """SIGINT/SIGTERM (or `external.set()` from another thread) set a flag instead of raising, so a
    bag is never left half-written. The handler only flips a bool: nothing that could deadlock."""

    def __init__(self, external: Optional[threading.Event] = None, second_sigint_raises: bool = True):
        self.stopped = False
        self.second_sigint_raises = second_sigint_raises
        self.external = external
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stopped and signum == signal.SIGINT and self.second_sigint_raises:  # the user insists
            raise KeyboardInterrupt
        self.stopped = True

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False

    def __bool__(self):
        return self.stopped or (self.external is not None and self.external.is_set())

    def sleep(self, seconds: float) -> bool:
        """Sleep in short steps unless stopped; True when stopped."""
        end = time.monotonic() + seconds
        while not self:
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(remaining, 0.02))
        return True


@contextlib.contextmanager
def _rclpy_session():
    """rclpy initialised for the duration (without rclpy's signal handlers), unless it already was."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    owned = not rclpy.ok()
    if owned:
        rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    try:
        yield
    finally:
        if owned:
            rclpy.try_shutdown()


def _storage_plugin(storage: str):
    from rosbags.rosbag2 import StoragePlugin

    try:
        return {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    except KeyError:
        raise BagError(f"unknown storage '{storage}' (expected one of {', '.join(STORAGES)})") from None


def _duration_to_qos_time(duration):
    from rosbags.interfaces import QosTime

    sec, nsec = divmod(int(duration.nanoseconds), 1_000_000_000)
    return QosTime(sec=sec, nsec=nsec)


def _bag_qos(profile):
    """rclpy QoSProfile (from the graph) -> rosbags Qos for the bag's offered_qos_profiles."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability

    return Qos(history=QosHistory(int(profile.history)), depth=int(profile.depth),
               reliability=QosReliability(int(profile.reliability)),
               durability=QosDurability(int(profile.durability)),
               deadline=_duration_to_qos_time(profile.deadline), lifespan=_duration_to_qos_time(profile.lifespan),
               liveliness=QosLiveliness(int(profile.liveliness)),
               liveliness_lease_duration=_duration_to_qos_time(profile.liveliness_lease_duration),
               avoid_ros_namespace_conventions=bool(profile.avoid_ros_namespace_conventions))


# ------------------------------------------------------------------------------------------- record

def _recorder_qos(profiles):
    """A subscription QoS that matches every publisher: reliable / transient-local only if all offer it."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    reliable = bool(profiles) and all(p.reliability == ReliabilityPolicy.RELIABLE for p in profiles)
    latched = bool(profiles) and all(p.durability == DurabilityPolicy.TRANSIENT_LOCAL for p in profiles)
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


def record(bag_path, topics: Optional[Sequence[str]] = None, duration_s: Optional[float] = None,
           max_messages: Optional[int] = None, storage: str = "mcap", discovery_period_s: float = 0.5,
           stop=None) -> dict:
    """Record `topics` into a new rosbag2 bag at `bag_path` until SIGINT/SIGTERM, `duration_s` or
    `max_messages` (whichever first). Topics may appear at any time; the graph is polled every
    `discovery_period_s`. `stop` (optional, a threading.Event) ends the recording from another thread.

    Returns {"path", "messages", "topics": {topic: count}, "types": {topic: type}, "skipped": {topic: why}}.
    The bag is always closed properly (metadata.yaml and the MCAP summary written), also on Ctrl-C.
    """
    import rclpy
    from rclpy.node import Node
    from rosbags.rosbag2 import Writer, WriterError

    bag_path = Path(bag_path)
    if bag_path.exists():
        raise BagError(f"{bag_path} exists already; not overwriting")
    plugin = _storage_plugin(storage)
    wanted = list(dict.fromkeys(topics or DEFAULT_RECORD_TOPICS))
    typestore = make_typestore()
    writer = Writer(bag_path, version=BAG_VERSION, storage_plugin=plugin)

    counts: dict[str, int] = {}
    types: dict[str, str] = {}
    skipped: dict[str, str] = {}
    total = [0]
    # never raise from the handler here: an exception inside a write could break the bag
    with _StopFlag(stop, second_sigint_raises=False) as stop_flag, _rclpy_session():
        node = Node("instascene_bag_recorder")
        wanted = [node.resolve_topic_name(topic) for topic in wanted]
        subscriptions = {}
        try:
            writer.open()
        except (WriterError, OSError) as error:
            node.destroy_node()
            raise BagError(str(error)) from None

        def make_callback(topic, connection):
            def on_message(data: bytes) -> None:
                if max_messages is not None and total[0] >= max_messages:
                    return
                writer.write(connection, node.get_clock().now().nanoseconds, data)
                counts[topic] += 1
                total[0] += 1
            return on_message

        def discover() -> None:
            graph = dict(node.get_topic_names_and_types())
            for topic in wanted:
                if topic in subscriptions or topic in skipped or topic not in graph:
                    continue
                publishers = node.get_publishers_info_by_topic(topic)
                if not publishers:
                    continue  # only subscribers so far: wait for a publisher (its QoS matters)
                type_name = publishers[0].topic_type
                if len({p.topic_type for p in publishers}) > 1:
                    log.warning("%s has publishers of several types; recording %s only", topic, type_name)
                cls = message_class(type_name)
                if cls is None:
                    skipped[topic] = f"type {type_name} cannot be imported"
                    log.warning("not recording %s: %s", topic, skipped[topic])
                    continue
                if type_name not in typestore.fielddefs:
                    skipped[topic] = f"no message definition (.msg) found for {type_name}"
                    log.warning("not recording %s: %s", topic, skipped[topic])
                    continue
                graph_hash = str(publishers[0].topic_type_hash)
                store_hash = typestore.hash_rihs01(type_name)
                if graph_hash.startswith("RIHS01_") and graph_hash != store_hash:
                    log.warning("%s: the publisher's type hash differs from the bag's .msg definition of %s "
                                "(different message version?)", topic, type_name)
                msgdef, _ = typestore.generate_msgdef(type_name, ros_version=2)
                offered = []
                with contextlib.suppress(Exception):
                    offered = [_bag_qos(p.qos_profile) for p in publishers]
                rihs01 = graph_hash if graph_hash.startswith("RIHS01_") else store_hash
                connection = writer.add_connection(topic, type_name, msgdef=msgdef, rihs01=rihs01,
                                                   offered_qos_profiles=offered)
                counts[topic], types[topic] = 0, type_name
                qos = _recorder_qos([p.qos_profile for p in publishers])
                subscriptions[topic] = node.create_subscription(cls, topic, make_callback(topic, connection), qos,
                                                                raw=True)
                log.info("recording %s [%s]", topic, type_name)

        start = time.monotonic()
        next_discovery = start
        log.info("recording to %s (%s): %s", bag_path, storage, " ".join(wanted))
        try:
            while not stop_flag:
                now = time.monotonic()
                if duration_s is not None and now - start >= duration_s:
                    break
                if max_messages is not None and total[0] >= max_messages:
                    break
                if now >= next_discovery and len(subscriptions) + len(skipped) < len(wanted):
                    discover()
                    next_discovery = now + discovery_period_s
                rclpy.spin_once(node, timeout_sec=0.05)
            # write what already arrived (acknowledged to its publisher) before closing
            drain_end = time.monotonic() + 1.0
            while time.monotonic() < drain_end and (max_messages is None or total[0] < max_messages):
                before = total[0]
                rclpy.spin_once(node, timeout_sec=0.01)
                if total[0] == before:
                    break
        except KeyboardInterrupt:  # rclpy's handler, if the caller initialised rclpy with it
            pass
        finally:
            for subscription in subscriptions.values():
                node.destroy_subscription(subscription)
            writer.close()
            node.destroy_node()
    missing = [topic for topic in wanted if topic not in subscriptions and topic not in skipped]
    if missing:
        log.warning("never saw a publisher on: %s", " ".join(missing))
    log.info("wrote %d messages to %s", total[0], bag_path)
    return {"path": str(bag_path), "messages": total[0], "topics": counts, "types": types, "skipped": skipped}


# --------------------------------------------------------------------------------------------- play

def _player_qos(topic: str, offered):
    """Reliable KEEP_LAST; transient-local for /tf_static and for topics whose recorded publishers all were."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from rosbags.interfaces import QosDurability

    latched = topic == "/tf_static" or (bool(offered) and all(
        getattr(q, "durability", None) == QosDurability.TRANSIENT_LOCAL for q in offered))
    return QoSProfile(depth=100 if latched else 10, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


def play(bag_path, rate: float = 1.0, loop: bool = False, publish_clock: bool = True,
         topics: Optional[Sequence[str]] = None, delay_s: float = 0.0, wait_for_subscribers_s: float = 0.0,
         stop=None) -> dict:
    """Publish a rosbag2 bag (a folder with metadata.yaml, or a .mcap / .db3 file) with its timing.

    `rate` scales playback speed (2.0 = twice as fast); `loop` repeats until SIGINT. /clock
    (rosgraph_msgs/Clock) follows the bag's timestamps at ~40 Hz and right before each message.
    `topics` restricts playback; `delay_s` waits before the first message; `wait_for_subscribers_s`
    waits (at most that long) until every played topic has a subscriber. Messages whose type has no
    importable rclpy class are skipped, with one warning per topic.

    Returns {"published", "skipped", "skipped_topics": {topic: count}, "loops", "topics": {topic: count}}.
    """
    from rclpy.duration import Duration
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosbags.rosbag2 import Reader

    if not rate > 0:
        raise BagError("rate must be positive")
    bag_path = Path(bag_path)
    if not bag_path.exists():
        raise BagError(f"{bag_path} does not exist")
    try:
        reader = Reader(bag_path)
        reader.open()
    except Exception as error:
        raise BagError(f"cannot read {bag_path}: {error}") from None

    def absolute(topic: str) -> str:
        return topic if topic.startswith("/") else "/" + topic

    wanted = None if not topics else {absolute(t) for t in topics}
    stats = {"published": 0, "skipped": 0, "skipped_topics": {}, "loops": 0, "topics": {}}
    try:
        connections = [c for c in reader.connections if wanted is None or absolute(c.topic) in wanted]
        if wanted:
            for topic in sorted(wanted - {absolute(c.topic) for c in reader.connections}):
                log.warning("topic %s is not in the bag", topic)
        with _StopFlag(stop) as stop_flag, _rclpy_session():
            def stopped() -> bool:
                return bool(stop_flag)

            node = Node("instascene_bag_player")
            publishers: dict[int, object] = {}  # connection id -> publisher
            by_topic: dict[str, tuple[str, object]] = {}
            unplayable: dict[int, str] = {}  # connection id -> topic (counted as skipped)
            for connection in connections:
                topic, type_name = connection.topic, connection.msgtype
                serialization = getattr(connection.ext, "serialization_format", "cdr")
                reason = None
                if topic in by_topic and by_topic[topic][0] != type_name:
                    reason = f"type {type_name} differs from {by_topic[topic][0]} already played on this topic"
                elif serialization != "cdr":
                    reason = f"serialization '{serialization}' is not cdr"
                elif topic not in by_topic and message_class(type_name) is None:
                    reason = f"type {type_name} cannot be imported"
                if reason:
                    if topic not in stats["skipped_topics"]:
                        log.warning("skipping %s: %s", topic, reason)
                    stats["skipped_topics"].setdefault(topic, 0)
                    unplayable[connection.id] = topic
                    continue
                if topic not in by_topic:
                    offered = getattr(connection.ext, "offered_qos_profiles", [])
                    publisher = node.create_publisher(message_class(type_name), topic, _player_qos(topic, offered))
                    by_topic[topic] = (type_name, publisher)
                    stats["topics"][topic] = 0
                publishers[connection.id] = by_topic[topic][1]
            clock_pub = None
            if publish_clock:
                from rosgraph_msgs.msg import Clock
                clock_qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
                clock_pub = node.create_publisher(Clock, "/clock", clock_qos)

            def send_clock(stamp_ns: int) -> None:
                if clock_pub is not None:
                    msg = Clock()
                    msg.clock.sec, msg.clock.nanosec = divmod(int(stamp_ns), 1_000_000_000)
                    clock_pub.publish(msg)

            if wait_for_subscribers_s > 0 and by_topic:
                deadline = time.monotonic() + wait_for_subscribers_s
                while not stopped() and time.monotonic() < deadline:
                    if all(pub.get_subscription_count() > 0 for _, pub in by_topic.values()):
                        break
                    stop_flag.sleep(0.05)
                else:
                    if not stopped():
                        lonely = [t for t, (_, pub) in by_topic.items() if pub.get_subscription_count() == 0]
                        log.warning("no subscriber after %.1f s on: %s", wait_for_subscribers_s, " ".join(lonely))
            if delay_s > 0:
                stop_flag.sleep(delay_s)

            playable = [c for c in connections if c.id not in unplayable]
            log.info("playing %s at %gx: %d topics, %d messages%s", bag_path, rate, len(by_topic),
                     sum(c.msgcount for c in playable), ", looping" if loop else "")
            if not playable:
                log.warning("nothing to play in %s", bag_path)
            clock_period = 1.0 / CLOCK_HZ
            while not stopped() and playable:
                first_ns = None
                wall_start = time.monotonic()
                for connection_id, topic in unplayable.items():  # counted, never read
                    count = next(c.msgcount for c in connections if c.id == connection_id)
                    stats["skipped"] += count
                    stats["skipped_topics"][topic] += count
                for connection, stamp_ns, raw in reader.messages(connections=playable):
                    if stopped():
                        break
                    if first_ns is None:
                        first_ns = stamp_ns
                        send_clock(first_ns)
                    target = wall_start + (stamp_ns - first_ns) / 1e9 / rate
                    while True:  # wait for the message's time, keeping /clock going
                        remaining = target - time.monotonic()
                        if remaining <= 0 or stopped():
                            break
                        if stop_flag.sleep(min(remaining, clock_period)):
                            break
                        if clock_pub is not None and remaining > clock_period:
                            elapsed = time.monotonic() - wall_start
                            send_clock(first_ns + min(int(elapsed * rate * 1e9), stamp_ns - first_ns))
                    if stopped():
                        break
                    send_clock(stamp_ns)
                    publishers[connection.id].publish(bytes(raw))
                    stats["published"] += 1
                    stats["topics"][connection.topic] += 1
                stats["loops"] += 1
                if not loop:
                    break
            # let reliable subscribers acknowledge the last messages before the publishers vanish
            deadline = time.monotonic() + 2.0
            for _, publisher in by_topic.values():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or stopped():
                    break
                publisher.wait_for_all_acked(Duration(nanoseconds=int(remaining * 1e9)))
            node.destroy_node()
    finally:
        reader.close()
    log.info("published %d messages (%d skipped) in %d pass(es)", stats["published"], stats["skipped"],
             stats["loops"])
    return stats
