"""`Resolve` end to end: CatalogClient.resolve -> real gRPC server -> memory store or a real Redis.

A version's state and sources in one round trip, and the layout digest that lets a receiver with a
cached plan receive its sources without tensor descriptors. Every test runs over both stores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import redis

from refit.catalog.client import CatalogClient, Resolved
from refit.errors import ConfigError, VersionNotFoundError
from refit.types import Region, Role, SourceRecord, TensorDesc, VersionState
from refit_server import CatalogServer
from tests.support import catalog_samples as samples

MODEL = samples.MODEL
WORLD = 2


def publish(client: CatalogClient, version: int, sources: list[SourceRecord], *, world_size: int = WORLD, model=MODEL):
    for s in sources:
        client.publish(name="m", version=version, world_size=world_size, model=model, source=s)


def parts(**source_kwargs: object) -> list[SourceRecord]:
    return [samples.source(r, tp_size=WORLD, **source_kwargs) for r in range(WORLD)]  # type: ignore[arg-type]


def moved(source: SourceRecord, by: int) -> SourceRecord:
    """The same part registered elsewhere: what a restarted trainer publishes."""
    regions = tuple(dataclasses.replace(g, addr=g.addr + by) for g in source.regions)
    return dataclasses.replace(source, regions=regions)


def with_tensor(source: SourceRecord, index: int, **changes: object) -> SourceRecord:
    tensors = list(source.tensors)
    tensors[index] = dataclasses.replace(tensors[index], **changes)
    return dataclasses.replace(source, tensors=tuple(tensors))


def heads(sources: list[SourceRecord]) -> tuple[SourceRecord, ...]:
    return tuple(dataclasses.replace(s, tensors=()) for s in sources)


# --- the layout digest ------------------------------------------------------------------------------


def test_digest_ignores_agents_and_region_addresses(catalog_client: CatalogClient) -> None:
    publish(catalog_client, 1, parts())
    # Version 2: other agents, other NIXL metadata, every region at another address, ranks published in
    # the other order; the plan-relevant content is the same.
    v2 = [moved(s, 2**32) for s in parts(metadata=b"restarted")]
    v2 = [dataclasses.replace(s, agent_name=f"new-{s.rank}") for s in v2]
    publish(catalog_client, 2, v2[::-1])
    one, two = catalog_client.resolve(name="m", version=1), catalog_client.resolve(name="m", version=2)
    assert len(one.layout_digest) == 40 and one.layout_digest == two.layout_digest
    assert two.sources == tuple(v2) and two.sources != one.sources


# Each case changes one thing a plan depends on; the digest must change with it.
CHANGES: dict[str, Callable[[SourceRecord], SourceRecord]] = {
    "name": lambda s: with_tensor(s, 2, name="decoder.final_layernorm.bias"),
    "role": lambda s: with_tensor(s, 0, role=Role.COLUMN),
    "dtype": lambda s: with_tensor(s, 2, dtype="bfloat16"),
    "local and global shape": lambda s: with_tensor(s, 2, local_shape=(32,), global_shape=(32,)),
    "partition stride": lambda s: with_tensor(s, 0, partition_stride=1),
    "offset": lambda s: with_tensor(s, 0, offset=0 if s.tensors[0].offset else 64),
    "region index": lambda s: with_tensor(s, 2, region=0, byte_offset=0),
    "byte offset": lambda s: with_tensor(s, 2, byte_offset=256),
    "tensor order": lambda s: dataclasses.replace(s, tensors=s.tensors[::-1]),
    "a tensor less": lambda s: dataclasses.replace(s, tensors=s.tensors[:2]),
    "coords": lambda s: dataclasses.replace(s, coords=dataclasses.replace(s.coords, dp_size=4, dp_rank=0)),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_digest_changes_with_what_a_plan_depends_on(catalog_client: CatalogClient, change: str) -> None:
    publish(catalog_client, 1, parts())
    base = parts()
    base[1] = CHANGES[change](base[1])
    publish(catalog_client, 2, base)
    one, two = catalog_client.resolve(name="m", version=1), catalog_client.resolve(name="m", version=2)
    assert two.sources[1] == base[1]  # the change reached the catalog as published
    assert one.layout_digest and two.layout_digest and one.layout_digest != two.layout_digest


def test_digest_changes_with_the_model_and_with_the_rank_of_a_part(catalog_client: CatalogClient) -> None:
    publish(catalog_client, 1, parts())
    publish(catalog_client, 2, parts(), model=samples.model(vocab_size=99))
    # Ranks 0 and 1 hold each other's tensors and coords: the same multiset of parts, another layout.
    a, b = parts()
    swapped = [dataclasses.replace(b, rank=0, agent_name="x0"), dataclasses.replace(a, rank=1, agent_name="x1")]
    publish(catalog_client, 3, swapped)
    digests = [catalog_client.resolve(name="m", version=v).layout_digest for v in (1, 2, 3)]
    assert all(digests) and len(set(digests)) == 3


def test_digest_is_set_when_the_last_rank_publishes_and_follows_a_republish(catalog_client: CatalogClient) -> None:
    publish(catalog_client, 1, parts()[:1])
    staging = catalog_client.resolve(name="m", version=1)
    assert staging.info.state is VersionState.STAGING and staging.layout_digest == ""
    assert staging.sources == tuple(parts()[:1]) and not staging.tensors_omitted
    publish(catalog_client, 1, parts()[1:])
    ready = catalog_client.resolve(name="m", version=1)
    assert ready.info.state is VersionState.READY and ready.layout_digest
    # The same agent replaces its READY part with another layout: the digest follows.
    changed = with_tensor(parts()[0], 2, byte_offset=16)
    publish(catalog_client, 1, [changed])
    after = catalog_client.resolve(name="m", version=1, known_layout=ready.layout_digest)
    assert after.layout_digest not in ("", ready.layout_digest)
    assert not after.tensors_omitted and after.sources[0] == changed


# --- resolve ----------------------------------------------------------------------------------------


def test_resolve_newest_ready_and_a_given_version(catalog_client: CatalogClient) -> None:
    publish(catalog_client, 1, parts())
    v2 = [moved(s, 4096) for s in parts()]
    publish(catalog_client, 2, v2)
    publish(catalog_client, 3, parts()[:1])  # STAGING: newer, but not READY
    newest = catalog_client.resolve(name="m")
    assert isinstance(newest, Resolved)
    assert newest.info == catalog_client.get_version(name="m", version=2)
    assert newest.info.state is VersionState.READY and newest.info.published_ranks == (0, 1)
    assert newest.sources == tuple(v2) == tuple(catalog_client.get_sources(name="m", version=2))
    assert not newest.tensors_omitted
    given = catalog_client.resolve(name="m", version=1)
    assert given.info == catalog_client.get_version(name="m", version=1) and given.sources == tuple(parts())
    staging = catalog_client.resolve(name="m", version=3)
    assert staging.info.state is VersionState.STAGING and staging.info.missing_ranks == (1,)
    # Retired versions are still resolvable by number (the receiver's READY re-check sees RETIRED) ...
    catalog_client.retire(name="m", version=2)
    retired = catalog_client.resolve(name="m", version=2)
    assert retired.info.state is VersionState.RETIRED and retired.sources == tuple(v2)
    # ... but never the newest READY one.
    assert catalog_client.resolve(name="m").info.version == 1


def test_tensors_are_omitted_iff_the_known_layout_matches(catalog_client: CatalogClient) -> None:
    publish(catalog_client, 1, parts())
    v2 = [moved(s, 8192) for s in parts(metadata=b"v2")]
    publish(catalog_client, 2, v2)
    other = parts()
    other[0] = with_tensor(other[0], 2, byte_offset=64)
    publish(catalog_client, 3, other)
    digest = catalog_client.resolve(name="m", version=1).layout_digest
    # A plan cached for version 1 serves version 2: only the regions and agents come.
    small = catalog_client.resolve(name="m", version=2, known_layout=digest)
    assert small.tensors_omitted and small.layout_digest == digest
    assert small.sources == heads(v2) and small.info == catalog_client.get_version(name="m", version=2)
    assert all(s.regions and s.agent_metadata == b"v2" for s in small.sources)
    # Newest READY is version 3, whose layout differs: everything comes.
    newest = catalog_client.resolve(name="m", known_layout=digest)
    assert newest.info.version == 3 and not newest.tensors_omitted and newest.sources == tuple(other)
    for known in ("", digest[:-1], digest.upper(), "0" * 40):
        full = catalog_client.resolve(name="m", version=2, known_layout=known)
        assert not full.tensors_omitted and full.sources == tuple(v2), known


def test_resolve_errors(catalog_client: CatalogClient) -> None:
    with pytest.raises(VersionNotFoundError, match="no READY version"):
        catalog_client.resolve(name="nobody")
    with pytest.raises(VersionNotFoundError, match="no version 7"):
        catalog_client.resolve(name="nobody", version=7)
    publish(catalog_client, 1, parts()[:1])  # STAGING only
    with pytest.raises(VersionNotFoundError, match="no READY version"):
        catalog_client.resolve(name="m")
    with pytest.raises(VersionNotFoundError, match="no version 2"):
        catalog_client.resolve(name="m", version=2)
    publish(catalog_client, 1, parts()[1:])
    catalog_client.retire(name="m", version=1)
    with pytest.raises(VersionNotFoundError, match="no READY version"):
        catalog_client.resolve(name="m")
    with pytest.raises(ConfigError, match="version must be >= 0"):
        catalog_client.resolve(name="m", version=-1)
    with pytest.raises(ConfigError, match="non-empty"):
        catalog_client.resolve(name="")
    with pytest.raises(ConfigError):
        catalog_client.resolve(name="m", version="1")  # type: ignore[arg-type]


def test_large_sources_resolve_whole_and_small(catalog_client: CatalogClient) -> None:
    # Thousands of descriptors per rank, as a big model's records carry.
    norms = [
        TensorDesc(name=f"decoder.layers.{i}.norm.weight", role=Role.REPLICATED, dtype="float32",
                   local_shape=(64,), global_shape=(64,), byte_offset=256 * i)
        for i in range(4000)
    ]  # fmt: skip
    big = [
        SourceRecord(rank=r, coords=samples.source(r, tp_size=WORLD).coords, agent_name=f"a{r}", agent_metadata=b"m",
                     regions=(Region(index=0, addr=1 << 40, nbytes=256 * 4000),), tensors=tuple(norms))
        for r in range(WORLD)
    ]  # fmt: skip
    publish(catalog_client, 1, big)
    full = catalog_client.resolve(name="m")
    assert full.sources == tuple(big)
    small = catalog_client.resolve(name="m", known_layout=full.layout_digest)
    assert small.tensors_omitted and small.sources == heads(big)


# --- both stores agree; Redis records from before digests ----------------------------------------------


@pytest.mark.redis
def test_memory_and_redis_give_the_same_digest(redis_url: str) -> None:
    digests = []
    for store in ("memory", redis_url):
        with CatalogServer(store=store, port=0).start() as server, CatalogClient(server.address) as client:
            publish(client, 1, parts())
            publish(client, 2, [with_tensor(s, 0, byte_offset=2) for s in parts()])
            digests.append([client.resolve(name="m", version=v).layout_digest for v in (1, 2)])
    assert digests[0] == digests[1] and digests[0][0] != digests[0][1]


@pytest.mark.redis
def test_redis_version_from_before_digests_resolves_whole(redis_url: str) -> None:
    with CatalogServer(store=redis_url, port=0).start() as server, CatalogClient(server.address) as client:
        publish(client, 1, parts())
        digest = client.resolve(name="m", version=1).layout_digest
        # What an older catalog left in Redis: no layout field, no layouts or heads hashes.
        url, prefix = redis_url.split("?prefix=")
        key = f"{prefix}:m:m:v:1"  # the key layout of refit_server/stores/lua.py
        with redis.Redis.from_url(url) as raw:
            assert raw.hdel(key, "layout") == 1 and raw.delete(f"{key}:layouts", f"{key}:heads") == 2
        old = client.resolve(name="m", known_layout=digest)
        assert old.layout_digest == "" and not old.tensors_omitted and old.sources == tuple(parts())
        # A part republished into it does not make a digest over only the ranks that have one.
        publish(client, 1, parts()[:1])
        assert client.resolve(name="m", known_layout=digest).layout_digest == ""
