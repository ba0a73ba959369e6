"""CUDA graph capture for refit's repeated GPU work: a streamed chunk's copies (`refit.copies`) and a
batch of digests (`refit.plan.digest_batch`), each issued again every refit of an unchanged plan."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def capture(work: Callable[[], None], *, pool: object | None = None) -> torch.cuda.CUDAGraph | None:
    """`work`'s ops captured on the current (side) stream as a CUDA graph, its memory in `pool` when
    given; None where capture fails, and the caller then runs the work op by op."""
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: NIXL's and UCX's threads keep driving transfers on their own streams meanwhile.
        with torch.no_grad():
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                work()
            finally:
                graph.capture_end()
    except RuntimeError:
        logger.debug("a CUDA graph capture failed; the work runs op by op", exc_info=True)
        return None
    return graph
