"""Values the catalog returns beyond `refit.types`: what one `Resolve` call answers."""

from __future__ import annotations

from dataclasses import dataclass

from refit.errors import ConfigError
from refit.types import SourceRecord, VersionInfo


@dataclass(frozen=True, kw_only=True, slots=True)
class Resolved:
    """A version and its sources, read together in one catalog round trip.

    `layout_digest` identifies what a plan depends on (the model and, per rank, its coordinates and
    tensor descriptors; not the regions' addresses nor the NIXL agents); it is "" until every rank has
    published. With `tensors_omitted` (the caller's `known_layout` matched it) every source has no
    tensor descriptors: the caller's cached plan, made for the same layout digest, stands for them.
    """

    info: VersionInfo
    sources: tuple[SourceRecord, ...]  # sorted by rank
    layout_digest: str
    tensors_omitted: bool

    def __post_init__(self) -> None:
        if self.tensors_omitted and not self.layout_digest:
            raise ConfigError(f"{self.info.name!r} v{self.info.version}: tensors omitted without a layout digest")
        if self.tensors_omitted and any(s.tensors for s in self.sources):
            raise ConfigError(f"{self.info.name!r} v{self.info.version}: tensors omitted, yet a source has some")
