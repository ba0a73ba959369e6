"""A running `AsyncLLM` (engine TP 1) serving a stream of requests is refitted mid-stream.

The engine starts from version 2's checkpoint (its outputs are a fresh engine's on version 2), is
refitted to version 1 from a Megatron TP 1 x PP 2 trainer, then back to version 2 while requests keep
arriving. No request may be lost or fail; requests that crossed the refit report both versions;
afterwards greedy outputs equal the fresh engine's again.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

pytest.importorskip("vllm")

from refit import CatalogServer
from refit.vllm.driver import refit_async_llm
from tests.support import vllm_ops as vo

pytestmark = pytest.mark.vllm
MAX_TOKENS = 64
FIRST_TOKENS_S = 120.0  # the stream's first tokens (a few ms when the machine is idle)


@pytest.fixture(scope="module")
def catalog():
    with CatalogServer(store="memory", port=0).start() as server:
        yield server.address


async def _generate(engine, prompt: list[int], request_id: str, max_tokens: int, progress: dict) -> object:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    final = None
    async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), params, request_id=request_id):
        progress[request_id] = len(out.outputs[0].token_ids)
        final = out
    return final


async def _greedy(engine, tag: str) -> list[list[int]]:
    outs = await asyncio.gather(*(_generate(engine, p, f"{tag}-{i}", 8, {}) for i, p in enumerate(vo.PROMPTS)))
    return [list(o.outputs[0].token_ids) for o in outs]


def test_running_engine_is_refitted_mid_stream_without_losing_requests(
    trainer_cluster, catalog, tmp_path, monkeypatch
) -> None:
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    for k, v in vo.engine_env(1).items():
        monkeypatch.setenv(k, v)
    trainer = vo.Trainer(trainer_cluster, catalog, tmp_path, vo.QWEN2, tp=1, pp=2)
    path = vo.save_checkpoint(vo.QWEN2, 2, tmp_path / "v2")

    async def scenario() -> None:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**vo.engine_kwargs(path, 1)))
        try:
            fresh_v2 = await _greedy(engine, "fresh")
            trainer.publish(1)
            r1 = await refit_async_llm(engine, catalog=catalog, name=trainer.name)
            assert r1.version == 1 and await engine.get_weight_version() == "1"
            assert await _greedy(engine, "v1") != fresh_v2
            trainer.publish(2)

            # A stream: a new request every 20 ms until shortly after the refit.
            progress: dict[str, int] = {}
            tasks: list[asyncio.Task] = []
            done = asyncio.Event()
            ids = itertools.count()

            async def produce() -> None:
                extra = 5
                while extra > 0:
                    i = next(ids)
                    prompt = vo.PROMPTS[i % len(vo.PROMPTS)] + [i % 500]
                    tasks.append(asyncio.create_task(_generate(engine, prompt, f"s{i}", MAX_TOKENS, progress)))
                    await asyncio.sleep(0.02)
                    extra -= done.is_set()

            producer = asyncio.create_task(produce())
            deadline = time.monotonic() + FIRST_TOKENS_S
            while not any(n >= 4 for n in progress.values()):
                assert time.monotonic() < deadline, f"no request had 4 tokens after {FIRST_TOKENS_S}s: {progress}"
                await asyncio.sleep(0.01)
            r2 = await refit_async_llm(engine, catalog=catalog, name=trainer.name)
            done.set()
            await producer
            outs = await asyncio.gather(*tasks)
            assert r2.version == 2

            assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs), "a request was cut short"
            spans = [[(s.version, s.start, s.end) for s in o.outputs[0].weight_versions] for o in outs]
            crossing = [s for s in spans if len(s) > 1]
            assert crossing, f"no request crossed the refit: {spans}"
            for s in crossing:
                assert [v for v, _, _ in s] == ["1", "2"] and s[0][1] == 0 and s[0][2] == s[1][1]
                assert s[-1][2] == MAX_TOKENS
            assert spans[-1] == [("2", 0, MAX_TOKENS)]  # started after the refit

            assert await _greedy(engine, "after") == fresh_v2
            print(
                f"\nTP1 engine <- TP1xPP2 trainer, mid-stream: {len(outs)} requests, {len(crossing)} crossing; "
                f"bytes {r2.bytes}, wire {r2.wire_s:.3f}s, prefetch {r2.prefetch_s:.3f}s, stall {r2.stall_s:.3f}s "
                f"(install {r2.install_s:.3f}s)"
            )
        finally:
            engine.shutdown()

    try:
        asyncio.run(scenario())
    finally:
        trainer.close()
