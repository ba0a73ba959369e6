"""`refit.ahead.confirm`: what the catalog's answer must say for a pull begun ahead of it to stand.

Pure values (no NIXL, no catalog): the answer is a `Resolved` built here, the plan an empty one that
reads trainer ranks 0 and 1. The end-to-end path (real trainers, NIXL, catalog) is
tests/integration/test_refit_ahead.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from refit.ahead import AheadMissed, confirm
from refit.catalog.values import Resolved
from refit.errors import CatalogUnavailableError
from refit.plan.records import Plan
from refit.types import VersionInfo, VersionState
from tests.support import catalog_samples as samples

PLAN = Plan(targets=(), pieces=(), reads=(), staging_bytes=0, bytes_by_rank={0: 10, 1: 10})  # reads ranks 0, 1


def answer(version: int = 5, *, state: VersionState = VersionState.READY, **changes: object) -> Resolved:
    sources = tuple(
        dataclasses.replace(samples.source(r, tp_size=2), tensors=(), fence_addr=4096 + 8 * r) for r in range(2)
    )
    fields: dict = {
        "info": VersionInfo(
            name="m", version=version, state=state, world_size=2, published_ranks=(0, 1), model=samples.MODEL
        ),
        "sources": sources,
        "layout_digest": "L",
        "tensors_omitted": True,
    }
    fields.update(changes)
    return Resolved(**fields)


def check(got: Resolved, *, version: int = 5, fits: bool = True) -> Resolved:
    return confirm(lambda: got, prev=answer(4), plan=PLAN, version=version, fits=lambda r: fits)


def test_an_answer_that_matches_the_pull_stands() -> None:
    got = answer()
    assert check(got) is got
    assert [s.rank for s in PLAN.sources_read(got.sources)] == [0, 1]


@pytest.mark.parametrize(
    ("got", "why"),
    [
        (answer(6), "newest READY version is v6"),  # a newer version became READY meanwhile
        (answer(state=VersionState.RETIRED), "not READY"),
        (answer(layout_digest="M"), "layout"),
        (answer(tensors_omitted=False, sources=answer().sources), "layout"),
        (answer(info=dataclasses.replace(answer().info, dead_ranks=(1,))), r"rank\(s\) \[1\] are dead"),
        (
            answer(sources=(answer().sources[0], dataclasses.replace(answer().sources[1], agent_name="restarted"))),
            "not where the pull read them",
        ),
        (
            answer(sources=(answer().sources[0], dataclasses.replace(answer().sources[1], fence_addr=8))),
            "not where the pull read them",
        ),
    ],
)
def test_an_answer_that_differs_names_why(got: Resolved, why: str) -> None:
    with pytest.raises(AheadMissed, match=why):
        check(got)


def test_a_plan_that_no_longer_fits_and_a_failed_answer_are_misses() -> None:
    with pytest.raises(AheadMissed, match="layout"):
        check(answer(), fits=False)

    def failed() -> Resolved:
        raise CatalogUnavailableError("gone")

    with pytest.raises(AheadMissed, match="answer failed: gone"):
        confirm(failed, prev=answer(4), plan=PLAN, version=5, fits=lambda r: True)
