"""Pipeline persistence: atomic saves, corrupt or foreign files refused without touching the map."""
import pickle

import pytest
import torch

from instascene_ros.core.pipeline import Pipeline


def test_corrupt_and_foreign_maps_are_refused_and_nothing_changes(tmp_path):
    pipeline = Pipeline()
    mapper, tracker, version = pipeline.mapper, pipeline.tracker, pipeline.snapshot.map_version
    corrupt = tmp_path / "corrupt.instascene"
    corrupt.write_bytes(b"\x00not a map at all")
    foreign = tmp_path / "foreign.instascene"
    torch.save({"weights": torch.zeros(3)}, foreign)
    for path, reason in ((corrupt, "not a readable map"), (foreign, "not an instascene map")):
        with pytest.raises(ValueError, match=reason):
            pipeline.load(str(path))
        assert pipeline.mapper is mapper and pipeline.tracker is tracker
        assert pipeline.snapshot.map_version == version
    with pytest.raises(FileNotFoundError):
        pipeline.load(str(tmp_path / "missing.instascene"))


def test_save_is_atomic_and_round_trips(tmp_path):
    pipeline = Pipeline()
    path = tmp_path / "maps" / "a.instascene"
    pipeline.save(str(path))
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    other = Pipeline()
    version, n_gaussians, n_instances = other.load(str(path))
    assert (n_gaussians, n_instances) == (0, 0) and version >= pipeline.snapshot.map_version
    # a failing write leaves the previous file intact
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("cannot pickle this")

    pipeline.forgotten = {Unpicklable()}
    with pytest.raises(Exception):
        pipeline.save(str(path))
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
