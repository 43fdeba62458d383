"""`instascene play BAG` and `instascene record BAG`: rosbag2 replay and recording (no rosbag2_py needed)."""
from __future__ import annotations

import argparse

from instascene_ros.ros.bag import DEFAULT_RECORD_TOPICS  # stdlib-only module: cheap at parse time


def _topic_list(text: str) -> list[str]:
    topics = [part.strip() for part in text.split(",") if part.strip()]
    if not topics:
        raise argparse.ArgumentTypeError("expected one or more topic names, comma separated")
    return topics


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def add_parser(subparsers) -> None:
    play = subparsers.add_parser(
        "play", help="replay a rosbag2 bag (MCAP or sqlite3) with its timing and /clock",
        description="Publish every message of a rosbag2 bag (a bag folder, or a .mcap / .db3 file) on its topic "
                    "with the recorded timing, scaled by --rate. /clock (rosgraph_msgs/Clock) follows the bag's "
                    "timestamps, so nodes started with use_sim_time:=true run on bag time. /tf_static is "
                    "published transient-local (latched). Topics whose message type is not installed are "
                    "skipped with a warning.",
        epilog="example: instascene play recordings/kitchen --rate 0.5 --topics /camera/color/image_raw,/tf",
    )
    play.add_argument("bag", help="rosbag2 bag folder (with metadata.yaml) or a single .mcap / .db3 file")
    play.add_argument("--rate", type=_positive, default=1.0,
                      help="playback speed factor: 2 = twice as fast (default: 1)")
    play.add_argument("--loop", action="store_true", help="play again from the start until Ctrl-C")
    play.add_argument("--no-clock", action="store_true", help="do not publish /clock")
    play.add_argument("--topics", type=_topic_list, default=None, metavar="T1,T2",
                      help="play only these topics, comma separated (default: all topics of the bag)")
    play.add_argument("--delay", type=_non_negative, default=0.0, metavar="S",
                      help="seconds to wait before the first message, to let subscribers connect (default: 0)")
    play.add_argument("--wait-for-subscribers", type=_non_negative, default=0.0, metavar="S",
                      help="wait up to S seconds until every played topic has a subscriber (default: 0, no wait)")
    play.set_defaults(run=run_play)

    record = subparsers.add_parser(
        "record", help="record topics into a rosbag2 bag (MCAP or sqlite3)",
        description="Subscribe to the given topics (types and QoS are taken from their publishers; topics may "
                    "appear later) and write every message's bytes, as received, into a new rosbag2 bag folder. "
                    "Stops on Ctrl-C, after --duration or --max-messages; the bag is closed properly either "
                    "way (MCAP summary and metadata.yaml written), so a recording cut by Ctrl-C stays readable.",
        epilog="example: instascene record recordings/kitchen --duration 30",
    )
    record.add_argument("bag", help="bag folder to create (must not exist)")
    record.add_argument("--topics", nargs="+", default=list(DEFAULT_RECORD_TOPICS), metavar="T",
                        help="topics to record, space or comma separated (default: "
                             + " ".join(DEFAULT_RECORD_TOPICS) + ")")
    record.add_argument("--duration", type=_positive, default=None, metavar="S",
                        help="stop after S seconds (default: until Ctrl-C)")
    record.add_argument("--max-messages", type=int, default=None, metavar="N",
                        help="stop after N messages in total (default: no limit)")
    record.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap",
                        help="storage plugin: mcap or sqlite3 (default: mcap)")
    record.set_defaults(run=run_record)


def run_play(args) -> int:
    from instascene_ros.ros.bag import BagError, play

    try:
        stats = play(args.bag, rate=args.rate, loop=args.loop, publish_clock=not args.no_clock, topics=args.topics,
                     delay_s=args.delay, wait_for_subscribers_s=args.wait_for_subscribers)
    except BagError as error:
        print(f"instascene play: {error}")
        return 2
    print(f"instascene play: published {stats['published']} messages, skipped {stats['skipped']}"
          + (f" ({', '.join(sorted(stats['skipped_topics']))})" if stats["skipped_topics"] else ""), flush=True)
    return 0


def run_record(args) -> int:
    from instascene_ros.ros.bag import BagError, record

    topics = [t for item in args.topics for t in item.split(",") if t.strip()]
    if args.max_messages is not None and args.max_messages <= 0:
        print("instascene record: --max-messages must be positive")
        return 2
    try:
        stats = record(args.bag, topics, duration_s=args.duration, max_messages=args.max_messages,
                       storage=args.storage)
    except BagError as error:
        print(f"instascene record: {error}")
        return 2
    counts = ", ".join(f"{topic}: {count}" for topic, count in stats["topics"].items()) or "no topics seen"
    print(f"instascene record: wrote {stats['messages']} messages to {stats['path']} ({counts})", flush=True)
    return 0
