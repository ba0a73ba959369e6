"""Pure logic of a refit of Megatron's dynamic inference engine: what a refit does to the engine's
caches in each KV-cache mode (`cache_policy`), and which weight version produced each generated
token (`token_versions`). No megatron-core import: these take plain values.

**Per-token versions.** megatron-core (0.19) records weight versions itself: an engine given a
*generation epoch* (`InferenceClient.set_generation_epoch(e)`) stamps every request it holds with a
boundary `(start, e)` in `request.policy_epoch`, a sparse list of `(start_token_index, epoch)` pairs
over the request's whole sequence (prompt, then generated tokens). `start` is `len(prompt) +
len(generated) - 1` when the stamp is made: the last token already in the sequence, whose forward
pass (with the new weights) produces the next token. A request added later starts with `[(0, e)]`.
So the forward pass at position `p` ran the epoch of the last boundary with `start <= p`, and the
generated token at position `q` (sampled from the forward at `q - 1`) has that epoch of `q - 1`. The
refit driver uses the catalog version as the epoch, so `token_versions` gives, for each generated
token, the catalog version of the weights that produced it (as vLLM's `weight_versions` does).
`kv_cache_epoch` has the same form and says which weights computed each position's KV entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from refit.errors import ConfigError

# megatron-core's KVCacheManagementMode values (megatron.core.inference.config, 0.19.2)
PERSIST, OFFLOAD, RECOMPUTE = "persist", "offload", "recompute"
KV_MODES = (PERSIST, OFFLOAD, RECOMPUTE)


@dataclass(frozen=True, kw_only=True, slots=True)
class CachePolicy:
    """What a refit's suspend -> install -> resume does to the engine's caches, in one KV-cache mode.

    Attributes:
        kv_mode: the engine's `kv_cache_management_mode` ("persist", "offload" or "recompute").
        recomputes_kv: requests in flight are checkpointed at suspend and prefilled again at resume,
            with the new weights (Megatron's RECOMPUTE mode), so no KV entry of the old weights is used.
        drops_prefix_cache: the KV block allocator (and its prefix-cache hash table) is reset at resume.
        recaptures_cuda_graphs: Megatron deletes its CUDA graphs at suspend and captures them again at
            resume (inside the stall); otherwise the graphs captured at start-up are replayed, which
            is valid because the install copies into the parameters' existing storage.
    """

    kv_mode: str
    recomputes_kv: bool
    drops_prefix_cache: bool
    recaptures_cuda_graphs: bool


def cache_policy(
    kv_mode: str, *, prefix_caching: bool, static_kv_memory_pointers: bool, keep_stale_kv: bool = False
) -> CachePolicy:
    """The cache policy of a refit in `kv_mode`; ConfigError for a combination that would serve stale state.

    * "recompute": Megatron frees the KV cache at suspend and rebuilds it at resume, re-prefilling
      every request in flight, and resets the block allocator (so the prefix cache) as it does.
    * "persist" / "offload": suspend and resume keep the KV cache (offload copies it to the host and
      back) and the block allocator. Requests in flight then continue on KV entries computed with the
      old weights (`kv_cache_epoch` records it): allowed only with `keep_stale_kv=True`. The prefix
      cache would keep serving old-weight blocks to new requests, and Megatron offers no call that
      drops it alone while requests hold blocks: refused with prefix caching on.
    """
    mode = str(getattr(kv_mode, "value", kv_mode)).lower()
    if mode not in KV_MODES:
        raise ConfigError(f"unknown kv_cache_management_mode {kv_mode!r}; known: {list(KV_MODES)}")
    if mode == RECOMPUTE:
        recapture = not static_kv_memory_pointers
        return CachePolicy(kv_mode=mode, recomputes_kv=True, drops_prefix_cache=True, recaptures_cuda_graphs=recapture)
    if prefix_caching:
        raise ConfigError(
            f"kv_cache_management_mode={mode!r} with prefix caching would keep serving KV blocks computed with "
            "the old weights after a refit (suspend/resume keep the block allocator); use "
            "kv_cache_management_mode='recompute', which Megatron resets at resume"
        )
    if not keep_stale_kv:
        raise ConfigError(
            f"kv_cache_management_mode={mode!r} keeps the KV cache across suspend/resume: requests in flight "
            "would continue on KV entries of the old weights. Use kv_cache_management_mode='recompute', or "
            "pass keep_stale_kv=True to accept that (request.kv_cache_epoch records it)"
        )
    return CachePolicy(kv_mode=mode, recomputes_kv=False, drops_prefix_cache=False, recaptures_cuda_graphs=False)


def _boundaries(epochs: Sequence[Sequence[int]] | None, what: str) -> list[tuple[int, int]]:
    if not epochs:
        raise ConfigError(
            f"the request carries no {what}: the engine had no generation epoch when it was added "
            "(call MegatronRefitter.mark_version(v) before serving, or refit once)"
        )
    out = []
    for pair in epochs:
        if len(pair) != 2:
            raise ConfigError(f"{what} entries must be (start, epoch) pairs, got {pair!r}")
        start, epoch = int(pair[0]), int(pair[1])
        if start < 0 or (out and start < out[-1][0]):
            raise ConfigError(f"{what} boundaries must start at >= 0 and never go back, got {list(epochs)!r}")
        out.append((start, epoch))
    if out[0][0] != 0:
        raise ConfigError(f"{what} must begin at position 0, got {list(epochs)!r}")
    return out


def position_versions(epochs: Sequence[Sequence[int]] | None, length: int, *, what: str = "policy_epoch") -> list[int]:
    """The epoch of the forward pass (policy_epoch) or KV entry (kv_cache_epoch) at each of `length` positions."""
    bounds = _boundaries(epochs, what)
    out, k = [], 0
    for pos in range(length):
        # Several boundaries at one position (refits with no token in between): the last one holds.
        while k + 1 < len(bounds) and bounds[k + 1][0] <= pos:
            k += 1
        out.append(bounds[k][1])
    return out


def token_versions(policy_epoch: Sequence[Sequence[int]] | None, *, prompt_len: int, generated_len: int) -> list[int]:
    """The weight version of each generated token: the epoch of the forward pass at the position before it."""
    if prompt_len < 1 or generated_len < 0:
        raise ConfigError(f"prompt_len must be >= 1 and generated_len >= 0, got {prompt_len} and {generated_len}")
    forward = position_versions(policy_epoch, prompt_len + generated_len - 1)
    return forward[prompt_len - 1 :]


def prompt_length(request: object) -> int:
    """The prompt length of a megatron-core request: `prompt_tokens`, or `prompt_length` when the
    request came back through the coordinator (it drops the prompt tensor unless asked to return it)."""
    prompt = getattr(request, "prompt_tokens", None)
    if prompt is not None:
        return len(prompt)
    length = getattr(request, "prompt_length", None)
    if length is None:
        raise ConfigError(f"{type(request).__name__} has neither prompt_tokens nor prompt_length")
    return int(length)


def request_token_versions(request: object) -> list[int]:
    """`token_versions` of a (merged) megatron-core `DynamicInferenceRequest`, as `generate` returns it."""
    generated = getattr(request, "generated_tokens", None)
    if generated is None:
        raise ConfigError(f"{type(request).__name__} has no generated_tokens")
    epochs = getattr(request, "policy_epoch", None)
    return token_versions(epochs, prompt_len=prompt_length(request), generated_len=len(generated))


__all__ = [
    "KV_MODES",
    "OFFLOAD",
    "PERSIST",
    "RECOMPUTE",
    "CachePolicy",
    "cache_policy",
    "position_versions",
    "prompt_length",
    "request_token_versions",
    "token_versions",
]
