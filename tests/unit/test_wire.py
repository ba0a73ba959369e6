"""refit.catalog.wire: proto <-> refit.types round trips, rejection of invalid protos, and the generated
modules matching the .proto: the schema and the service with any installed grpcio-tools, and byte for byte
what scripts/gen_proto.sh produces when the installed version is the one that generated them."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2

from refit.catalog import wire
from refit.errors import ConfigError
from refit.proto import catalog_pb2 as pb
from refit.proto import catalog_pb2_grpc as pb_grpc
from refit.types import Claim, ParallelCoords, Region, Role, VersionInfo, VersionState
from tests.support import catalog_samples as samples

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "refit" / "proto"
GENERATED = ("catalog_pb2.py", "catalog_pb2_grpc.py", "catalog_pb2.pyi")
PROTO_FILE = "refit/proto/catalog.proto"  # relative to proto/, the -I root of scripts/gen_proto.sh


def test_model_round_trip_keeps_every_field() -> None:
    m = samples.model(tied_embeddings=True, qk_layernorm=True, gated_linear_unit=False, num_experts=8)
    assert wire.model_from_proto(wire.model_to_proto(m)) == m
    assert wire.model_from_bytes(wire.model_to_bytes(m)) == m


def test_equal_models_serialize_to_equal_bytes() -> None:
    # The Redis store compares models as byte strings inside Lua.
    assert wire.model_to_bytes(samples.model()) == wire.model_to_bytes(samples.model())
    assert wire.model_to_bytes(samples.model()) != wire.model_to_bytes(samples.model(hidden_size=128))


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_source_round_trip(tp_size: int) -> None:
    s = samples.source(tp_size - 1, tp_size=tp_size, metadata=bytes(range(256)))
    msg = wire.source_to_proto(s)
    assert isinstance(msg, pb.SourceRecord)
    back = wire.source_from_proto(msg)
    assert back == s
    assert isinstance(back.tensors, tuple) and isinstance(back.tensors[0].local_shape, tuple)
    assert wire.source_from_bytes(wire.source_to_bytes(s)) == s


def test_the_version_word_address_survives_and_the_head_keeps_it() -> None:
    s = dataclasses.replace(samples.source(0), fence_addr=2**64 - 8)
    assert wire.source_from_proto(wire.source_to_proto(s)).fence_addr == 2**64 - 8
    _, head, _ = wire.source_encodings(s)  # what a Resolve with a known layout sends
    assert wire.source_from_bytes(head).fence_addr == 2**64 - 8
    with pytest.raises(ConfigError, match="fence_addr"):
        dataclasses.replace(s, fence_addr=-1)


def test_replicated_partition_dim_minus_one_survives() -> None:
    norm = samples.source(0).tensors[2]
    assert norm.partition_dim == -1
    assert wire.tensor_from_proto(wire.tensor_to_proto(norm)) == norm


def test_large_addresses_survive() -> None:
    r = Region(index=3, addr=2**64 - 4096, nbytes=2**40, device="cuda", device_id=7)
    assert wire.region_from_proto(wire.region_to_proto(r)) == r


@pytest.mark.parametrize("state", list(VersionState))
def test_version_info_round_trip(state: VersionState) -> None:
    info = VersionInfo(
        name="m",
        version=2**40,
        state=state,
        world_size=4,
        published_ranks=(0, 2, 3),
        model=samples.MODEL,
        created_at=1.5,
        ready_at=2.25,
    )
    assert wire.version_from_proto(wire.version_to_proto(info)) == info


def test_claim_and_coords_round_trip() -> None:
    c = Claim(name="m", rank=5, agent_name="a", claimed_at=3.0)
    assert wire.claim_from_proto(wire.claim_to_proto(c)) == c
    coords = ParallelCoords(tp_rank=1, tp_size=2, pp_rank=2, pp_size=4, ep_rank=0, ep_size=1, dp_rank=7, dp_size=8)
    assert wire.coords_from_proto(wire.coords_to_proto(coords)) == coords
    moe = ParallelCoords(tp_size=2, ep_rank=3, ep_size=4, etp_rank=1, etp_size=2, edp_rank=0, edp_size=1, dp_size=4)
    assert wire.coords_from_proto(wire.coords_to_proto(moe)) == moe


def test_coords_written_before_expert_fields_read_as_one_expert_group() -> None:
    msg = wire.coords_to_proto(ParallelCoords(tp_size=2, dp_size=4))
    msg.ClearField("etp_size")
    msg.ClearField("edp_size")
    assert wire.coords_from_proto(msg) == ParallelCoords(tp_size=2, dp_size=4)


def test_every_enum_member_has_a_proto_value() -> None:
    assert {wire.role_from_proto(wire.role_to_proto(r)) for r in Role} == set(Role)
    assert {wire.state_from_proto(wire.state_to_proto(s)) for s in VersionState} == set(VersionState)


def test_unspecified_role_is_rejected() -> None:
    msg = wire.tensor_to_proto(samples.source(0).tensors[0])
    msg.role = pb.ROLE_UNSPECIFIED
    with pytest.raises(ConfigError, match="ROLE_UNSPECIFIED"):
        wire.tensor_from_proto(msg)


def test_unspecified_state_is_rejected() -> None:
    msg = wire.version_to_proto(
        VersionInfo(
            name="m", version=1, state=VersionState.READY, world_size=1, published_ranks=(0,), model=samples.MODEL
        )
    )
    msg.state = pb.VERSION_STATE_UNSPECIFIED
    with pytest.raises(ConfigError, match="VERSION_STATE_UNSPECIFIED"):
        wire.version_from_proto(msg)
    with pytest.raises(ConfigError):
        wire.state_from_proto(99)


def test_invalid_values_are_rejected_by_the_dataclasses() -> None:
    msg = wire.source_to_proto(samples.source(0))
    msg.tensors[0].byte_offset = 2**30  # past the end of its region
    with pytest.raises(ConfigError, match="past the end"):
        wire.source_from_proto(msg)
    bad_model = wire.model_to_proto(samples.MODEL)
    bad_model.num_query_groups = 3  # 4 heads are not a multiple of 3 groups
    with pytest.raises(ConfigError, match="num_query_groups"):
        wire.model_from_proto(bad_model)
    empty = pb.SourceRecord(rank=0, agent_name="a")
    with pytest.raises(ConfigError, match="coords"):
        wire.source_from_proto(empty)


def test_unencodable_values_become_config_errors() -> None:
    with pytest.raises(ConfigError):
        wire.region_to_proto(Region(index=0, addr=2**64, nbytes=1))
    with pytest.raises(ConfigError, match="corrupt"):
        wire.source_from_bytes(b"\xff\xff\xff")


def _messages(protos: Iterable[descriptor_pb2.DescriptorProto]) -> Iterator[descriptor_pb2.DescriptorProto]:
    for m in protos:
        yield m
        yield from _messages(m.nested_type)


def _without_json_names(fd: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    # protoc fills in every field's derived `json_name` in a descriptor set, the generated module stores it
    # only where the .proto sets one (ours sets none): not a difference in the schema.
    for m in _messages(fd.message_type):
        for f in (*m.field, *m.extension):
            f.ClearField("json_name")
    for f in fd.extension:
        f.ClearField("json_name")
    return fd


@pytest.fixture(scope="module")
def fresh_descriptor(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    """The .proto compiled now by the installed grpcio-tools (any version), as a FileDescriptorProto."""
    pytest.importorskip("grpc_tools")  # the dev extra, which `make test` installs
    out = tmp_path_factory.mktemp("proto") / "catalog.desc"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", f"--descriptor_set_out={out}", PROTO_FILE]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=120)
    (fd,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return _without_json_names(fd)


def test_generated_pb2_describes_the_current_proto(fresh_descriptor: descriptor_pb2.FileDescriptorProto) -> None:
    # The schema itself, not the generator's bytes: runs whatever grpcio-tools is installed.
    committed = _without_json_names(descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb))
    assert committed == fresh_descriptor, "refit/proto/catalog_pb2.py is stale: run scripts/gen_proto.sh"


class _RecordingChannel:
    """Takes the place of a grpc.Channel for `CatalogStub.__init__`, which only asks it for callables."""

    def __init__(self) -> None:
        self.responses: dict[str, str] = {}

    def unary_unary(self, path: str, *, response_deserializer: Any, **_: Any) -> None:
        self.responses[path] = response_deserializer.__self__.DESCRIPTOR.full_name


class _RecordingServer:
    """Takes the place of a grpc.Server for `add_CatalogServicer_to_server`, keeping the handlers it adds."""

    def __init__(self) -> None:
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        pass  # the same handlers, pre-registered by name in recent grpcio; the generic ones are enough here


def test_generated_grpc_module_serves_every_method_of_the_proto(
    fresh_descriptor: descriptor_pb2.FileDescriptorProto,
) -> None:
    (service,) = fresh_descriptor.service
    expected = {
        f"/{fresh_descriptor.package}.{service.name}/{m.name}": (m.input_type.lstrip("."), m.output_type.lstrip("."))
        for m in service.method
        if not (m.client_streaming or m.server_streaming)
    }
    assert len(expected) == len(service.method), "streaming methods: extend this check"
    channel, server = _RecordingChannel(), _RecordingServer()
    pb_grpc.CatalogStub(channel)
    pb_grpc.add_CatalogServicer_to_server(pb_grpc.CatalogServicer(), server)
    stale = "refit/proto/catalog_pb2_grpc.py is stale: run scripts/gen_proto.sh"
    assert channel.responses == {path: types[1] for path, types in expected.items()}, stale
    for path, (request, _) in expected.items():
        found = [h.service(SimpleNamespace(method=path)) for h in server.handlers]
        (handler,) = [h for h in found if h is not None]
        assert handler.unary_unary is not None, stale
        assert handler.request_deserializer.__self__.DESCRIPTOR.full_name == request, stale


def test_regenerating_the_proto_gives_identical_files(tmp_path: Path) -> None:
    # Byte for byte, which only the generator version of the committed files can promise; the two tests above
    # check the same content with any version.
    pytest.importorskip("grpc_tools")
    from importlib.metadata import version

    committed_with = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", (PROTO_DIR / "catalog_pb2_grpc.py").read_text())
    installed = version("grpcio-tools")
    if committed_with is None or committed_with.group(1) != installed:
        pytest.skip(f"generated with grpcio-tools {committed_with and committed_with.group(1)}, installed {installed}")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, env=env, timeout=120)
    for name in GENERATED:
        fresh = (tmp_path / "refit" / "proto" / name).read_text()
        committed = (PROTO_DIR / name).read_text()
        assert fresh == committed, f"refit/proto/{name} is stale: run scripts/gen_proto.sh"
