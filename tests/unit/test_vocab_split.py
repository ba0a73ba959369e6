"""Engine-side vocab split: the rows each engine TP rank holds follow vLLM's VocabParallelEmbedding.

vLLM pads the vocabulary to a multiple of 64, splits the padded rows evenly, and each rank holds the
real rows of its share (the padding rows it zero-fills itself). `ceil(vocab / tp)` would put the
boundary elsewhere whenever the vocabulary is not a multiple of 64 * tp.
"""

from __future__ import annotations

import pytest

from refit.errors import ModelMismatchError
from refit.plan.targets import EngineLayout, targets_for
from refit.types import ModelMeta, Role, TensorDesc

H = 16


def _meta(vocab: int, padded: int) -> ModelMeta:
    return ModelMeta(
        architecture="llama", num_layers=1, hidden_size=H, num_attention_heads=2, num_query_groups=2, kv_channels=8,
        ffn_hidden_size=32, padded_vocab_size=padded, vocab_size=vocab,
    )  # fmt: skip


def _rows(vocab: int, padded: int, tp: int, rank: int) -> tuple[tuple[int, int], ...]:
    desc = TensorDesc(
        name="embedding.word_embeddings.weight", role=Role.VOCAB_PARALLEL, dtype="float32",
        local_shape=(padded, H), global_shape=(padded, H), partition_dim=0,
    )  # fmt: skip
    (target,) = targets_for(_meta(vocab, padded), desc, EngineLayout(tp_rank=rank, tp_size=tp, vocab_size=vocab))
    assert target.shape == (sum(b - a for a, b in target.rows), H)
    return target.rows


@pytest.mark.parametrize(
    ("vocab", "padded", "tp", "expected"),
    [
        pytest.param(512, 512, 2, [((0, 256),), ((256, 512),)], id="multiple-of-64"),
        pytest.param(60, 64, 2, [((0, 32),), ((32, 60),)], id="60-tp2-split-at-32-not-30"),
        pytest.param(1000, 1024, 2, [((0, 512),), ((512, 1000),)], id="1000-tp2"),
        pytest.param(1000, 1024, 4, [((0, 256),), ((256, 512),), ((512, 768),), ((768, 1000),)], id="1000-tp4"),
        pytest.param(
            65, 128, 4, [((0, 32),), ((32, 64),), ((64, 65),), ((96, 96),)], id="last-rank-holds-padding-only"
        ),
        pytest.param(1000, 1024, 1, [((0, 1000),)], id="tp1-whole-vocab"),
    ],
)
def test_engine_vocab_rows_follow_vllm_padding(vocab: int, padded: int, tp: int, expected: list) -> None:
    assert [_rows(vocab, padded, tp, r) for r in range(tp)] == expected


def test_vllm_rule_matches_vllm_itself() -> None:
    """Cross-check with vLLM's own helpers where vLLM is installed."""
    vpe = pytest.importorskip("vllm.model_executor.layers.vocab_parallel_embedding")
    for vocab, tp in [(60, 2), (1000, 2), (1000, 4), (151936, 8), (65, 4)]:
        padded = vpe.pad_vocab_size(vocab, vpe.DEFAULT_VOCAB_PADDING_SIZE)
        for rank in range(tp):
            start, end = vpe.vocab_range_from_global_vocab_size(padded, rank, tp)
            want = ((start, max(start, min(end, vocab))),)
            assert _rows(vocab, max(padded, 128), tp, rank) == want, (vocab, tp, rank)


def test_engine_tp_that_does_not_divide_the_padded_vocab_is_refused() -> None:
    with pytest.raises(ModelMismatchError, match="padded to 64"):
        _rows(60, 64, 3, 0)
