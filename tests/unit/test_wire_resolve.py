"""`Resolved` and the layout encodings through `refit.catalog.wire`, without a server."""

from __future__ import annotations

import dataclasses

import pytest

from refit.catalog import wire
from refit.catalog.values import Resolved
from refit.errors import ConfigError
from refit.proto import catalog_pb2 as pb
from refit.types import VersionInfo, VersionState
from tests.support import catalog_samples as samples

INFO = VersionInfo(name="m", version=3, state=VersionState.READY, world_size=2, published_ranks=(0, 1),
                   model=samples.MODEL, created_at=1.5, ready_at=2.5)  # fmt: skip


def test_resolved_round_trips_whole_and_without_tensors() -> None:
    sources = tuple(samples.source(r, tp_size=2) for r in range(2))
    whole = Resolved(info=INFO, sources=sources, layout_digest="ab" * 20, tensors_omitted=False)
    assert wire.resolved_from_proto(wire.resolved_to_proto(whole)) == whole
    heads = tuple(dataclasses.replace(s, tensors=()) for s in sources)
    small = Resolved(info=INFO, sources=heads, layout_digest="ab" * 20, tensors_omitted=True)
    msg = wire.resolved_to_proto(small)
    assert wire.resolved_from_proto(pb.ResolveResponse.FromString(msg.SerializeToString())) == small
    # Sources come back sorted by rank whatever order the message carries them in.
    msg.sources.reverse()
    assert wire.resolved_from_proto(msg).sources == heads


def test_inconsistent_resolved_is_refused() -> None:
    source = samples.source(0)
    with pytest.raises(ConfigError, match="tensors omitted, yet"):
        Resolved(info=INFO, sources=(source,), layout_digest="x", tensors_omitted=True)
    with pytest.raises(ConfigError, match="without a layout digest"):
        Resolved(info=INFO, sources=(dataclasses.replace(source, tensors=()),), layout_digest="", tensors_omitted=True)
    with pytest.raises(ConfigError, match="without version info"):
        wire.resolved_from_proto(pb.ResolveResponse())


def test_source_encodings() -> None:
    source = samples.source(1, tp_size=2)
    record, head, digest = wire.source_encodings(source)
    assert wire.source_from_bytes(record) == source
    assert wire.source_from_bytes(head) == dataclasses.replace(source, tensors=())
    # The digest covers rank, coords and tensors; not the regions' addresses nor the agent.
    moved = dataclasses.replace(
        source,
        agent_name="other",
        agent_metadata=b"other",
        regions=tuple(dataclasses.replace(g, addr=g.addr + 4096) for g in source.regions),
    )
    assert wire.source_encodings(moved)[2] == digest and len(digest) == 64
    assert wire.source_encodings(dataclasses.replace(source, rank=3))[2] != digest
    assert wire.source_encodings(dataclasses.replace(source, tensors=source.tensors[:2]))[2] != digest
