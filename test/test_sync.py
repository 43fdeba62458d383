"""ApproximateSync: pairing policy for image + camera_info + depth + late masks."""
from instascene_ros.ros.sync import ApproximateSync, SyncConfig


def make(required=("camera_info",), optional=("mask",), **config):
    frames, drops = [], []
    sync = ApproximateSync(list(required), list(optional), frames.append, drops.append, SyncConfig(**config))
    return sync, frames, drops


def test_waits_for_a_late_mask_and_pairs_the_closest():
    sync, frames, drops = make(slop_s=0.01, max_wait_s=1.0)
    sync.add("camera_info", 1.0, "info1")
    sync.add_image(1.0, "img1")
    assert frames == []  # waiting for the mask
    sync.add("mask", 0.995, "mask_close")
    assert [f.image for f in frames] == ["img1"]
    assert frames[0].others == {"camera_info": "info1", "mask": "mask_close"}


def test_optional_stream_may_be_missing_after_the_wait():
    sync, frames, drops = make(slop_s=0.01, max_wait_s=0.5)
    sync.add("camera_info", 1.0, "info1")
    sync.add_image(1.0, "img1")
    sync.add("camera_info", 1.2, "info2")
    sync.add_image(1.2, "img2")
    assert frames == []
    sync.add("camera_info", 1.6, "info3")  # 0.6 s later: img1 has waited long enough, img2 not yet
    assert [f.image for f in frames] == ["img1"] and "mask" not in frames[0].others
    assert drops == []


def test_required_stream_missing_is_a_counted_drop():
    sync, frames, drops = make(slop_s=0.01, max_wait_s=0.2)
    sync.add_image(1.0, "img1")
    sync.add("camera_info", 1.5, "late_info")
    assert frames == [] and len(drops) == 1 and "no camera_info" in drops[0]
    assert sync.drops[drops[0]] == 1


def test_duplicate_and_out_of_order_images_are_dropped():
    sync, frames, drops = make(optional=())
    sync.add("camera_info", 2.0, "info")
    sync.add_image(2.0, "img")
    sync.add_image(2.0, "img_again")
    sync.add_image(1.0, "img_old")
    assert [f.image for f in frames] == ["img"]
    assert sync.drops["out-of-order or duplicate image stamp"] == 2


def test_queues_are_bounded():
    sync, frames, drops = make(queue_size=5, max_wait_s=100.0)
    for i in range(20):
        sync.add_image(float(i), i)
    assert len(sync._pending) == 5
    assert sum(sync.drops.values()) == 15
