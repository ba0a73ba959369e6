"""Engine-side vocab split: the rows each engine TP rank holds follow vLLM's VocabParallelEmbedding.

vLLM pads the vocabulary to a multiple of 64 (the engine's `vocab_padding`), splits the padded rows
evenly, and each rank holds the real rows of its share (the padding rows it zero-fills itself).
`ceil(vocab / tp)` would put the boundary elsewhere whenever the vocabulary is not a multiple of 64 * tp.
"""

from __future__ import annotations

import pytest

from refit.errors import ConfigError, ModelMismatchError
from refit.plan.targets import EngineLayout, targets_for, vocab_share
from refit.types import ModelMeta, Role, TensorDesc

H = 16


def _meta(vocab: int, padded: int) -> ModelMeta:
    return ModelMeta(
        architecture="llama", num_layers=1, hidden_size=H, num_attention_heads=2, num_query_groups=2, kv_channels=8,
        ffn_hidden_size=32, padded_vocab_size=padded, vocab_size=vocab,
    )  # fmt: skip


def _rows(vocab: int, padded: int, tp: int, rank: int, padding: int = 64) -> tuple[tuple[int, int], ...]:
    desc = TensorDesc(
        name="embedding.word_embeddings.weight", role=Role.VOCAB_PARALLEL, dtype="float32",
        local_shape=(padded, H), global_shape=(padded, H), partition_dim=0,
    )  # fmt: skip
    layout = EngineLayout(tp_rank=rank, tp_size=tp, vocab_size=vocab, vocab_padding=padding)
    (target,) = targets_for(_meta(vocab, padded), desc, layout)
    assert target.shape == (sum(b - a for a, b in target.rows), H)
    return target.rows


@pytest.mark.parametrize(
    ("vocab", "padded", "tp", "expected"),
    [
        pytest.param(512, 512, 2, [((0, 256),), ((256, 512),)], id="multiple-of-64"),
        pytest.param(60, 64, 2, [((0, 32),), ((32, 60),)], id="60-tp2-split-at-32-not-30"),
        pytest.param(1000, 1024, 2, [((0, 512),), ((512, 1000),)], id="1000-tp2"),
        pytest.param(1000, 1024, 4, [((0, 256),), ((256, 512),), ((512, 768),), ((768, 1000),)], id="1000-tp4"),
        pytest.param(65, 128, 4, [((0, 32),), ((32, 64),), ((64, 65),), ()], id="last-rank-holds-padding-only"),
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
            real = (start, max(start, min(end, vocab)))
            assert vocab_share(vocab, vpe.DEFAULT_VOCAB_PADDING_SIZE, rank, tp) == real, (vocab, tp, rank)
            want = (real,) if real[1] > real[0] else ()
            assert _rows(vocab, max(padded, 128), tp, rank) == want, (vocab, tp, rank)


def test_engine_tp_that_does_not_divide_the_padded_vocab_is_refused() -> None:
    with pytest.raises(ModelMismatchError, match="padded to 64"):
        _rows(60, 64, 3, 0)


def test_vocab_padding_is_the_engines() -> None:
    # 100 rows: padded to a multiple of 32 (128) they split at 64 over two ranks, padded to a multiple
    # of 100 (not padded) at 50; the trainer's own padding (128 rows published) does not matter.
    assert [_rows(100, 128, 2, r, padding=32) for r in range(2)] == [((0, 64),), ((64, 100),)]
    assert [_rows(100, 128, 2, r, padding=100) for r in range(2)] == [((0, 50),), ((50, 100),)]
    assert [vocab_share(100, 1, r, 4) for r in range(4)] == [(0, 25), (25, 50), (50, 75), (75, 100)]


def test_vocab_share_of_a_rank_that_holds_only_padding_is_empty() -> None:
    assert vocab_share(65, 64, 3, 4) == (96, 96)
    assert vocab_share(0, 64, 0, 2) == (0, 0)


@pytest.mark.parametrize(
    ("vocab", "padding", "rank", "size"), [(60, 0, 0, 1), (60, -64, 0, 1), (-1, 64, 0, 1), (60, 64, 2, 2)]
)
def test_vocab_share_refuses_nonsense(vocab: int, padding: int, rank: int, size: int) -> None:
    with pytest.raises(ConfigError):
        vocab_share(vocab, padding, rank, size)


def test_engine_layout_refuses_non_positive_vocab_padding() -> None:
    assert EngineLayout().vocab_padding == 64
    with pytest.raises(ConfigError, match="vocab_padding"):
        EngineLayout(vocab_padding=0)
