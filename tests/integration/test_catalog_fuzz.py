"""Fuzzing a live catalog: hypothesis drives a real gRPC server (memory store and a real Redis) with a mix
of valid and invalid Claim, Release, Publish, Retire, GetVersion, GetState, Latest, ListVersions,
GetSources, Resolve and Ping calls, plus raw bytes that are no message at all.

Every answer must be a status the catalog means (never UNKNOWN, INTERNAL or UNAVAILABLE: no crash, and
the server keeps answering); a request built to break one bound must be INVALID_ARGUMENT naming the
field, with the catalog unchanged. After every step the catalog's versions must keep its invariants:
a version disappears only once retired (retention, `keep_retired`) and never comes back, its world
size, model and creation time never change, its published ranks only grow, READY exactly when every
rank 0..world_size-1 published, RETIRED and FAILED are final (nor READY back to STAGING); reads of
READY versions give every rank, and Resolve gives the newest READY one.

`make test` runs a slice (`CI_REQUESTS` per store); `make soak` the campaign (`SOAK_REQUESTS` per store,
over 10,000 in total). Needs the `hypothesis` package (the test extra).
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from refit.proto import catalog_pb2 as pb
from refit.proto import catalog_pb2_grpc as pb_grpc
from refit_server import CatalogServer
from tests.support import catalog_samples as samples
from tests.support.catalog_mutations import PUBLISH_MUTATIONS, SMALL_LIMITS, publish_request

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test  # noqa: E402

CI_REQUESTS = int(os.environ.get("REFIT_FUZZ_REQUESTS", "2500"))  # per store, in `make test`
SOAK_REQUESTS = 10_000  # per store: 20,000 over both

# Statuses the catalog answers on purpose; anything else (UNKNOWN, INTERNAL, UNAVAILABLE) is a failure.
MEANT = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # a message over max_message_bytes
}
READY, STAGING, RETIRED = pb.VERSION_STATE_READY, pb.VERSION_STATE_STAGING, pb.VERSION_STATE_RETIRED
FAILED = pb.VERSION_STATE_FAILED
METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["Catalog"].methods]
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


class Campaign:
    """The live server's stub for a whole run, and the count of requests sent."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.CatalogStub(self.channel)
        self.raw = {m: self.channel.unary_unary(f"/refit.v1.Catalog/{m}") for m in METHODS}
        self.requests = 0  # what the fuzzer sent (the invariant checks' reads are not counted)
        self.answers: Counter[tuple[str, str]] = Counter()  # (method, status) of every counted request
        self.ready = 0  # versions seen READY by the invariant checks

    def call(self, method: str, request: Any, *, counted: bool = True) -> tuple[grpc.StatusCode, Any, str]:
        self.requests += counted
        try:
            caller: Callable[..., Any] = self.raw[method] if isinstance(request, bytes) else getattr(self.stub, method)
            code, reply, details = grpc.StatusCode.OK, caller(request, timeout=10.0), ""
        except grpc.RpcError as exc:
            code, reply, details = exc.code(), None, exc.details() or ""
            assert code in MEANT, f"{method} answered {code.name}: {details}"
        if counted:
            self.answers[method, code.name] += 1
        return code, reply, details


# --- strategies ------------------------------------------------------------------------------------------

versions = st.one_of(st.integers(0, 3), st.sampled_from([-1, 2**53 - 1, 2**53, -(2**63), 2**63 - 1]))
ranks = st.one_of(st.integers(0, 3), st.sampled_from([-1, 63, 64, 2**31, -(2**63), 2**63 - 1]))
world_sizes = st.one_of(st.integers(1, 3), st.sampled_from([0, -1, 64, 65, 2**62]))
odd_names = st.one_of(st.just(""), st.text(max_size=80), st.just("n" * (SMALL_LIMITS.max_name_chars + 1)))
agents = st.one_of(st.sampled_from(["agent-0", "agent-1", "agent-2", "intruder"]), st.text(max_size=40))
layouts = st.one_of(st.just(""), st.text(max_size=70))


def _catalog_machine(campaign: Campaign) -> type[RuleBasedStateMachine]:
    class CatalogFuzz(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            ns = uuid.uuid4().hex[:8]  # every example has its own models
            self.names = [f"{ns}-a", f"{ns}-b"]
            self.seen: dict[tuple[str, int], pb.VersionInfo] = {}
            self.deleted: set[tuple[str, int]] = set()
            self.retired: list[tuple[str, int, bool]] = []  # Retire calls since the last invariant check
            self.digests: list[str] = []

        def _name(self, data: st.DataObject) -> str:
            return data.draw(st.one_of(st.sampled_from(self.names), odd_names), label="name")

        def _versions(self) -> dict[tuple[str, int], pb.VersionInfo]:
            now = {}
            for name in self.names:
                code, reply, details = campaign.call("ListVersions", pb.ListVersionsRequest(name=name), counted=False)
                assert code is grpc.StatusCode.OK, details
                now.update({(name, v.version): v for v in reply.versions})
            return now

        # -- writes --------------------------------------------------------------------------------

        @rule(data=st.data(), rank=ranks, agent=agents, takeover=st.booleans())
        def claim(self, data: st.DataObject, rank: int, agent: str, takeover: bool) -> None:
            campaign.call(
                "Claim", pb.ClaimRequest(name=self._name(data), rank=rank, agent_name=agent, takeover=takeover)
            )

        @rule(data=st.data(), rank=ranks, agent=agents)
        def release(self, data: st.DataObject, rank: int, agent: str) -> None:
            campaign.call("Release", pb.ReleaseRequest(name=self._name(data), rank=rank, agent_name=agent))

        @rule(
            name_index=st.integers(0, 1),
            version=st.integers(0, 3),
            world_size=st.integers(1, 3),
            rank=st.integers(0, 2),
            other_agent=st.booleans(),
            other_model=st.booleans(),
        )
        def publish(
            self, name_index: int, version: int, world_size: int, rank: int, other_agent: bool, other_model: bool
        ) -> None:
            """A well-formed part: it may still conflict, be taken, or land in a RETIRED version."""
            source = samples.source(min(rank, world_size - 1), agent="intruder" if other_agent else None)
            model = samples.model(num_layers=3) if other_model else samples.MODEL
            request = publish_request(self.names[name_index], version, world_size, model, source)
            code, _, details = campaign.call("Publish", request)
            assert code is not grpc.StatusCode.INVALID_ARGUMENT, details

        @rule(name_index=st.integers(0, 1), version=st.integers(0, 3), label=st.sampled_from(sorted(PUBLISH_MUTATIONS)))
        def publish_out_of_bounds(self, name_index: int, version: int, label: str) -> None:
            field, mutate = PUBLISH_MUTATIONS[label]
            request = publish_request(self.names[name_index], version, 2, samples.MODEL, samples.source(0, tp_size=2))
            mutate(request)
            before = self._versions()
            code, _, details = campaign.call("Publish", request)
            assert code is grpc.StatusCode.INVALID_ARGUMENT and field in details, (label, code, details)
            assert self._versions() == before, f"{label}: refused, yet the catalog changed"

        @rule(data=st.data(), version=versions, and_older=st.booleans())
        def retire(self, data: st.DataObject, version: int, and_older: bool) -> None:
            name = self._name(data)
            code, _, _ = campaign.call("Retire", pb.RetireRequest(name=name, version=version, and_older=and_older))
            if code is grpc.StatusCode.OK:
                self.retired.append((name, version, and_older))

        # -- reads ---------------------------------------------------------------------------------

        @rule(data=st.data(), version=versions, method=st.sampled_from(["GetVersion", "GetState", "GetSources"]))
        def read(self, data: st.DataObject, version: int, method: str) -> None:
            request = getattr(pb, f"{method}Request")(name=self._name(data), version=version)
            code, reply, _ = campaign.call(method, request)
            if method == "GetSources" and code is grpc.StatusCode.OK:
                ranks_ = [s.rank for s in reply.sources]
                assert ranks_ == sorted(set(ranks_))

        @rule(data=st.data(), state=st.integers(-1, 5))
        def latest(self, data: st.DataObject, state: int) -> None:
            code, _, _ = campaign.call("Latest", pb.LatestRequest(name=self._name(data), state=state))
            if state not in (READY, STAGING, RETIRED, FAILED):
                assert code is grpc.StatusCode.INVALID_ARGUMENT

        @rule(data=st.data(), has_version=st.booleans(), version=versions, known=layouts)
        def resolve(self, data: st.DataObject, has_version: bool, version: int, known: str) -> None:
            known = data.draw(st.sampled_from(self.digests), label="known") if self.digests and not known else known
            request = pb.ResolveRequest(name=self._name(data), known_layout=known)
            if has_version:
                request.version = version
            code, reply, _ = campaign.call("Resolve", request)
            if code is grpc.StatusCode.OK and reply.layout_digest:
                self.digests.append(reply.layout_digest)

        @rule(data=st.data())
        def list_versions(self, data: st.DataObject) -> None:
            every = data.draw(st.booleans(), label="every name")
            request = pb.ListVersionsRequest() if every else pb.ListVersionsRequest(name=self._name(data))
            campaign.call("ListVersions", request)

        @rule(method=st.sampled_from(METHODS), body=st.binary(max_size=200))
        def raw_bytes(self, method: str, body: bytes) -> None:
            campaign.call(method, body)

        @rule(method=st.sampled_from(["GetVersion", "GetState", "GetSources", "Retire"]), version=INT64, rank=INT64)
        def extreme_integers(self, method: str, version: int, rank: int) -> None:
            request = getattr(pb, f"{method}Request")(name=self.names[0], version=version)
            code, _, _ = campaign.call(method, request)
            if not 0 <= version <= SMALL_LIMITS.max_version:
                assert code is grpc.StatusCode.INVALID_ARGUMENT
            code, _, _ = campaign.call("Claim", pb.ClaimRequest(name=self.names[0], rank=rank, agent_name="x"))
            if not 0 <= rank < SMALL_LIMITS.max_world_size:
                assert code is grpc.StatusCode.INVALID_ARGUMENT

        # -- invariants ----------------------------------------------------------------------------

        @invariant()
        def versions_keep_their_rules(self) -> None:
            now = self._versions()

            # Retention deletes RETIRED versions (keep_retired), also one a Retire call just retired;
            # nothing else disappears, nothing comes back.
            def retired(key: tuple[str, int]) -> bool:
                return self.seen[key].state == RETIRED or any(
                    n == key[0] and (v == key[1] or (older and key[1] <= v)) for n, v, older in self.retired
                )

            gone = set(self.seen) - set(now)
            assert all(retired(k) for k in gone), f"versions disappeared: {gone}"
            self.retired.clear()
            self.deleted |= gone
            assert not self.deleted & set(now), f"deleted versions came back: {self.deleted & set(now)}"
            for key, v in now.items():
                published = list(v.published_ranks)
                assert published == sorted(set(published)) and all(0 <= r < v.world_size for r in published)
                full = published == list(range(v.world_size))
                assert v.state != READY or full, f"{key} READY with ranks {published} of {v.world_size}"
                assert v.state != STAGING or not full, f"{key} STAGING with every rank published"
                prev = self.seen.get(key)
                if prev is not None:
                    assert (v.world_size, v.model, v.created_at) == (prev.world_size, prev.model, prev.created_at)
                    assert set(prev.published_ranks) <= set(published), f"{key} lost published ranks"
                    assert prev.state != RETIRED or v.state == RETIRED, f"{key} left RETIRED"
                    assert prev.state != FAILED or v.state == FAILED, f"{key} left FAILED"
                    assert prev.state != READY or v.state in (READY, RETIRED), f"{key} went back to STAGING"
            campaign.ready += sum(v.state == READY for k, v in now.items() if k not in self.seen)
            self.seen = now

        @rule()
        def ready_reads_are_whole(self) -> None:
            now = self._versions()
            for name in self.names:
                ready = [v for (n, _), v in now.items() if n == name and v.state == READY]
                code, reply, _ = campaign.call("Resolve", pb.ResolveRequest(name=name))
                if not ready:
                    assert code is grpc.StatusCode.NOT_FOUND
                    continue
                newest = max(ready, key=lambda v: v.version)
                assert code is grpc.StatusCode.OK and reply.info.version == newest.version
                assert [s.rank for s in reply.sources] == list(range(newest.world_size))
                for v in ready:
                    code, reply, _ = campaign.call("GetSources", pb.GetSourcesRequest(name=name, version=v.version))
                    assert code is grpc.StatusCode.OK
                    assert [s.rank for s in reply.sources] == list(range(v.world_size))

    return CatalogFuzz


def run_campaign(store_url: str, requests: int) -> Campaign:
    """Fuzz a fresh catalog over `store_url` until at least `requests` requests were sent."""
    with CatalogServer(store=store_url, port=0, max_workers=4, limits=SMALL_LIMITS).start() as server:
        campaign = Campaign(server.address)
        machine = _catalog_machine(campaign)
        config = settings(
            max_examples=max(requests // 40, 5),
            stateful_step_count=50,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        try:
            while campaign.requests < requests:
                run_state_machine_as_test(machine, settings=config)
            code, _, details = campaign.call("Ping", pb.PingRequest(), counted=False)
            assert code is grpc.StatusCode.OK, details  # still serving
        finally:
            campaign.channel.close()
        return campaign


def _check_reach(campaign: Campaign, requests: int) -> None:
    """The campaign sent what it had to and reached both sides of the catalog: accepted parts that made
    versions READY, and refusals."""
    assert campaign.requests >= requests
    assert campaign.answers["Publish", "OK"] > 0 and campaign.ready > 0, campaign.answers
    assert campaign.answers["Publish", "INVALID_ARGUMENT"] > 0 and campaign.answers["Claim", "OK"] > 0


def test_fuzz_catalog(store_url: str) -> None:
    _check_reach(run_campaign(store_url, CI_REQUESTS), CI_REQUESTS)


@pytest.mark.soak
def test_fuzz_catalog_campaign(store_url: str) -> None:
    campaign = run_campaign(store_url, SOAK_REQUESTS)
    _check_reach(campaign, SOAK_REQUESTS)
    store = store_url.split("?")[0]
    print(f"fuzz campaign over {store}: {campaign.requests} requests, {campaign.ready} READY versions")
    for (method, code), n in sorted(campaign.answers.items()):
        print(f"  {method:12s} {code:20s} {n}")
