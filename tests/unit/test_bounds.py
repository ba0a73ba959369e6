"""`CatalogLimits` and its checks on values: the defaults take the largest real records refit publishes;
the limits themselves are validated."""

from __future__ import annotations

import dataclasses

import pytest

from refit.catalog import bounds, wire
from refit.catalog.bounds import DEFAULT_LIMITS, CatalogLimits
from refit.errors import ConfigError
from refit.types import Region
from refit_bench.trainer_sources import TrainerLayout, load_config, synthesize_sources
from tests.support import catalog_samples as samples


def test_the_defaults_take_the_largest_record_refit_publishes() -> None:
    # Kimi-K2 on one trainer rank (no expert parallelism): every routed expert's tensors in one record.
    meta, (source,) = synthesize_sources(load_config("kimi-k2"), TrainerLayout())
    assert len(source.tensors) > 40_000
    msg = wire.source_to_proto(source)
    assert msg.ByteSize() < DEFAULT_LIMITS.max_message_bytes // 16
    assert wire.source_from_proto(msg) == source
    assert bounds.check_model(meta, DEFAULT_LIMITS) == meta


@pytest.mark.parametrize(
    "change", [{"max_dims": 0}, {"max_world_size": -1}, {"max_version": 2**53}, {"max_name_chars": True}]
)
def test_limits_are_validated(change: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=f"CatalogLimits.{next(iter(change))}"):
        CatalogLimits(**change)  # type: ignore[arg-type]


def test_a_record_built_locally_is_checked_like_one_from_the_wire() -> None:
    good = samples.source(0, tp_size=2)
    assert bounds.check_source(good, DEFAULT_LIMITS) is good
    small = dataclasses.replace(DEFAULT_LIMITS, max_tensors_per_record=2)
    with pytest.raises(ConfigError, match=r"source\.tensors: 3 entries, over the limit of 2"):
        bounds.check_source(good, small)
    # A region reaching past the end of the 64-bit address space.
    wraps = dataclasses.replace(good, regions=(Region(index=0, addr=2**64 - 8, nbytes=2**20), good.regions[1]))
    with pytest.raises(ConfigError, match=r"source\.regions\[0\]: .* wraps past the end of the address space"):
        bounds.check_source(wraps, DEFAULT_LIMITS)


def test_refusals_never_echo_the_input_whole() -> None:
    msg = wire.source_to_proto(samples.source(0))
    msg.tensors[1].name = "x" * 500
    msg.tensors[1].byte_offset = 2**30
    with pytest.raises(ConfigError) as caught:
        wire.source_from_proto(msg)
    assert "past the end of region 0" in str(caught.value) and len(str(caught.value)) < 300


def test_the_client_refuses_an_out_of_bounds_part_before_any_round_trip() -> None:
    from refit.catalog.client import CatalogClient
    from tests.support import ports

    small = dataclasses.replace(DEFAULT_LIMITS, max_agent_metadata_bytes=4)
    # Nothing listens there: a ConfigError (not CatalogUnavailableError) proves no call was made.
    with (
        ports.closed_port() as port,
        CatalogClient(f"127.0.0.1:{port}", timeout_s=5.0, limits=small) as client,
        pytest.raises(ConfigError, match=r"source\.agent_metadata: 9 bytes, over the limit of 4"),
    ):
        client.publish(name="m", version=1, world_size=1, model=samples.MODEL, source=samples.source(0))
