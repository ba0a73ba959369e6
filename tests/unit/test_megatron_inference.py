"""The CPU-testable parts of the refit of Megatron's dynamic inference engine (refit.megatron_inference).

The engine itself needs CUDA and FlashAttention (tests/gpu/test_megatron_dynamic.py). Here: the
per-token versions read from Megatron's epoch boundaries, against an independent simulation of how a
dynamic engine stamps them (megatron-core 0.19.2, `DynamicInferenceEngine.schedule_requests` on
SET_GENERATION_EPOCH: boundary `(len(prompt) + len(generated) - 1, epoch)` for every request held;
`(0, epoch)` for a request added later); the cache-policy rules; the install outcome and the undo
steps of the driver. With megatron-core >= 0.19 installed (Python 3.12), also Megatron's own request
objects through a RECOMPUTE checkpoint, and the internals `refit.compat.megatron_inference` reads.
"""

from __future__ import annotations

import importlib.util

import pytest

from refit.errors import ConfigError
from refit.megatron_inference.agree import Agreement
from refit.megatron_inference.driver import install_outcome, undo_steps
from refit.megatron_inference.versions import (
    KV_MODES,
    cache_policy,
    position_versions,
    request_token_versions,
    token_versions,
)


def simulate(prompt_len: int, steps: int, refits: dict[int, int], *, start_version: int = 1):
    """An engine generating one token per step; before step s in `refits` it is refitted to `refits[s]`.

    Returns (the version each token was generated with, the boundaries stamped by Megatron's rule).
    """
    version = start_version
    boundaries = [(0, version)]
    truth = []
    for step in range(steps):  # before step s the request holds s generated tokens
        if step in refits:
            version = refits[step]
            boundaries.append((prompt_len + step - 1, version))
        truth.append(version)  # this step's forward (new weights) produces the next token
    return truth, boundaries


@pytest.mark.parametrize(
    ("prompt_len", "steps", "refits"),
    [
        (5, 8, {}),
        (5, 8, {3: 2}),
        (1, 6, {1: 2, 4: 3}),
        (7, 5, {0: 4}),  # refitted before the first token: every token is v4
        (4, 9, {2: 2, 8: 3}),  # the last token alone is v3
        (3, 6, {5: 9}),
    ],
)
def test_token_versions_follow_the_stamps(prompt_len: int, steps: int, refits: dict[int, int]) -> None:
    truth, boundaries = simulate(prompt_len, steps, refits)
    assert token_versions(boundaries, prompt_len=prompt_len, generated_len=steps) == truth


def test_refits_with_no_token_between_them_report_the_last() -> None:
    # Two refits while paused (no step in between) stamp the same position; the later one holds.
    got = token_versions([(0, 1), (6, 2), (6, 3)], prompt_len=5, generated_len=4)
    assert got == [1, 1, 3, 3]


def test_a_request_added_after_a_refit_reports_that_version_throughout() -> None:
    assert token_versions([(0, 5)], prompt_len=3, generated_len=4) == [5, 5, 5, 5]
    assert token_versions([[0, 5]], prompt_len=3, generated_len=0) == []  # msgpack turns pairs into lists


def test_kv_positions_follow_the_same_boundaries() -> None:
    # kv_cache_epoch: the KV entry at each position; the last token before a refit is fed (and its KV
    # computed) with the new weights.
    assert position_versions([(0, 1), (4, 2)], 6, what="kv_cache_epoch") == [1, 1, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("epochs", "match"),
    [
        (None, "no policy_epoch"),
        ([], "no policy_epoch"),
        ([(1, 1)], "begin at position 0"),
        ([(0, 1), (5, 2), (3, 3)], "never go back"),
        ([(0, 1, 2)], "pairs"),
    ],
)
def test_malformed_epochs_are_refused(epochs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        token_versions(epochs, prompt_len=4, generated_len=3)


def test_lengths_are_checked() -> None:
    with pytest.raises(ConfigError, match="prompt_len"):
        token_versions([(0, 1)], prompt_len=0, generated_len=3)
    with pytest.raises(ConfigError, match="generated_tokens"):
        request_token_versions(object())

    class Returned:  # what a request without its prompt tensor carries
        prompt_tokens, prompt_length, generated_tokens, policy_epoch = None, 4, [1, 2], [(0, 7)]

    assert request_token_versions(Returned()) == [7, 7]
    Returned.prompt_length = None
    with pytest.raises(ConfigError, match="prompt_length"):
        request_token_versions(Returned())


class _Mode:
    """An enum member as megatron-core's KVCacheManagementMode is (a str enum with `.value`)."""

    value = "RECOMPUTE"


def test_cache_policy_recompute_drops_kv_and_prefix_cache() -> None:
    p = cache_policy("recompute", prefix_caching=True, static_kv_memory_pointers=False)
    assert p.recomputes_kv and p.drops_prefix_cache and p.recaptures_cuda_graphs
    assert not cache_policy(_Mode(), prefix_caching=False, static_kv_memory_pointers=True).recaptures_cuda_graphs


@pytest.mark.parametrize("mode", ["persist", "offload"])
def test_cache_policy_refuses_stale_state_unless_accepted(mode: str) -> None:
    with pytest.raises(ConfigError, match="prefix caching"):
        cache_policy(mode, prefix_caching=True, static_kv_memory_pointers=False, keep_stale_kv=True)
    with pytest.raises(ConfigError, match="keep_stale_kv"):
        cache_policy(mode, prefix_caching=False, static_kv_memory_pointers=False)
    p = cache_policy(mode, prefix_caching=False, static_kv_memory_pointers=False, keep_stale_kv=True)
    assert p.kv_mode == mode and not (p.recomputes_kv or p.drops_prefix_cache or p.recaptures_cuda_graphs)
    with pytest.raises(ConfigError, match="unknown kv_cache_management_mode"):
        cache_policy("unified", prefix_caching=False, static_kv_memory_pointers=False)


def _agreed(any_failed: bool, all_failed: bool) -> Agreement:
    return Agreement(any_failed=any_failed, all_failed=all_failed, min_version=2, max_version=2)


def test_install_outcome() -> None:
    assert install_outcome(_agreed(False, False), torn=False) == "ok"
    assert install_outcome(_agreed(True, True), torn=False) == "failed"  # every rank refused before writing
    assert install_outcome(_agreed(True, False), torn=False) == "torn"  # ranks on different versions
    assert install_outcome(_agreed(True, True), torn=True) == "torn"  # this rank's streamed install broke off


def test_undo_steps() -> None:
    assert undo_steps([]) == []
    assert undo_steps(["pause"]) == ["unpause"]
    assert undo_steps(["pause", "suspend"]) == ["resume", "unpause"]
    assert undo_steps(["pause", "suspend", "resume"]) == ["unpause"]
    assert undo_steps(["pause", "suspend", "resume", "unpause"]) == []


# -- against megatron-core >= 0.19 (the dynamic engine's request objects and facade) ------------------

_HAS_019 = importlib.util.find_spec("megatron") is not None and (
    importlib.util.find_spec("megatron.core.inference.apis") is not None
)
needs_019 = pytest.mark.skipif(
    not _HAS_019, reason="needs megatron-core >= 0.19 (Python 3.12); the pinned 0.16.1 has no MegatronLLM"
)


@needs_019
def test_versions_through_a_recompute_checkpoint_of_real_megatron_requests() -> None:
    import torch
    from megatron.core.inference.inference_request import DynamicInferenceRequest, DynamicInferenceRequestRecord
    from megatron.core.inference.sampling_params import SamplingParams

    prompt_len, steps, refit_at = 6, 10, 4
    truth, boundaries = simulate(prompt_len, steps, {refit_at: 2})
    request = DynamicInferenceRequest(
        request_id=3,
        prompt_tokens=torch.arange(10, 10 + prompt_len),
        sampling_params=SamplingParams(num_tokens_to_generate=steps),
        policy_epoch=[boundaries[0]],
    )
    record = DynamicInferenceRequestRecord.from_request(request)
    request.generated_tokens = list(range(100, 100 + refit_at))
    # Suspend in RECOMPUTE mode checkpoints the request (prompt + tokens so far become the new prompt),
    # then the engine stamps the new epoch on the record's last request, as schedule_requests does.
    record.checkpoint()
    last = record[-1]
    assert len(last.prompt_tokens) == prompt_len + refit_at and last.kv_cache_epoch is None
    last.policy_epoch.append((len(last.prompt_tokens) + len(last.generated_tokens) - 1, 2))
    last.generated_tokens = list(range(200, 200 + steps - refit_at))
    merged = record.merge()
    assert len(merged.prompt_tokens) == prompt_len and len(merged.generated_tokens) == steps
    assert request_token_versions(merged) == truth
    # Through the coordinator, as `generate` returns it: the prompt tensor is dropped, its length kept.
    returned = DynamicInferenceRequest.deserialize(merged.serialize())
    assert returned.prompt_tokens is None and returned.prompt_length == prompt_len
    assert request_token_versions(returned) == truth


@needs_019
def test_the_dynamic_engine_internals_refit_reads_are_there() -> None:
    import dataclasses

    from megatron.core.inference.apis import MegatronAsyncLLM, MegatronLLM
    from megatron.core.inference.apis._llm_base import _CoordinatorRuntime, _EventLoopManager
    from megatron.core.inference.config import InferenceConfig, KVCacheManagementMode
    from megatron.core.inference.inference_client import InferenceClient

    assert sorted(m.value for m in KVCacheManagementMode) == sorted(KV_MODES)
    fields = {f.name for f in dataclasses.fields(InferenceConfig)}
    assert {"kv_cache_management_mode", "enable_prefix_caching", "static_kv_memory_pointers"} <= fields
    for cls in (MegatronLLM, MegatronAsyncLLM):
        for name in ("engine", "context", "controller", "is_primary_rank"):
            assert isinstance(getattr(cls, name), property), (cls.__name__, name)
        for name in ("pause", "unpause", "suspend", "resume", "generate", "shutdown"):
            assert callable(getattr(cls, name)), (cls.__name__, name)
    assert isinstance(_CoordinatorRuntime.client, property)
    assert callable(_EventLoopManager.submit) and callable(InferenceClient.set_generation_epoch)


def test_quantized_inference_is_recognised_on_a_real_gpt_model() -> None:
    import dataclasses

    from refit.compat.megatron_inference import quantized_weights
    from tests.support import engine_ops
    from tests.support import hf_models as hm

    with engine_ops.one_process_world():
        model = engine_ops.gpt_model(hm.LLAMA_GQA)
        assert quantized_weights(model) is None  # bf16/fp32 parameters are what it computes from
        model.config = dataclasses.replace(model.config, fp8="hybrid")
        assert quantized_weights(model) == "fp8='hybrid'"
