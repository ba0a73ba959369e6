"""Scenario presets for `refit-bench plan`: the published refit anchors, with the layouts they used.

Each anchor names its public source (`Anchor.source`); docs/benchmarks.md (section "plan") sets the
modelled times beside them. Where a publication leaves part of the setup open, the choice made here
is written next to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from refit.plan.targets import Scheme
from refit_bench.cluster_model import EngineFleet
from refit_bench.trainer_sources import TrainerLayout

FP8 = "float8_e4m3fn"


@dataclass(frozen=True, kw_only=True, slots=True)
class Anchor:
    """A published refit time and the setup it was measured on."""

    who: str
    low_s: float
    high_s: float
    setup: str
    source: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Scenario:
    name: str
    model: str
    trainer: TrainerLayout
    engine: EngineFleet
    linear_dtype: str | None = None  # wire dtype of GEMM weights (None: the model's own, bf16)
    anchor: Anchor | None = None
    assumptions: tuple[str, ...] = ()


PRESETS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="kimi-k2-pplx",
            model="kimi-k2",
            trainer=TrainerLayout(tp=8, pp=8, ep=32, dp=4),
            engine=EngineFleet(tp=32, ep=32, replicas=4),
            linear_dtype=FP8,
            anchor=Anchor(
                who="Perplexity (TransferEngine RDMA WRITE)",
                low_s=1.2,
                high_s=1.3,
                setup="Kimi-K2, 256 training GPUs (BF16, FSDP) -> 128 inference GPUs (FP8)",
                source="research.perplexity.ai weight-transfer-for-rl-post-training-in-under-2-seconds (2025-09-24)",
            ),
            assumptions=(
                "FP8 on the wire: Perplexity quantises on the sender, so GEMM weights are modelled as the "
                "trainer publishing FP8 copies; embeddings, output layer, router and norms stay BF16; "
                "block scales (0.02 % of FP8 bytes) are left out",
                "trainer: Perplexity trains with FSDP; modelled as Megatron TP8 PP8 EP32 DP4 on the same 256 GPUs",
                "engine: 128 GPUs as 4 replicas of EP32 (experts whole, attention TP32); the layout is not "
                "published, but 8 replicas of 16 GPUs cannot reach their 'a bit over 1.2 s' (that floor is "
                "8 x 1.03 TB / (128 x 50 GB/s) = 1.29 s), so replicas were at least 32 GPUs",
            ),
        ),
        Scenario(
            name="deepseek-v3-nemo",
            model="deepseek-v3",
            trainer=TrainerLayout(tp=1, pp=16, ep=16, dp=16),
            engine=EngineFleet(tp=32, ep=1, replicas=8),
            anchor=Anchor(
                who="NeMo-RL nccl_reshard (NCCL M2N)",
                low_s=2.39,
                high_s=2.83,
                setup="DeepSeek-V3 BF16, Megatron PP16 x EP16 -> vLLM TP32 x DP8, H100",
                source="NVIDIA-NeMo/RL docs/design-docs/nccl-reshard-refit.md (commit 7ea279abf)",
            ),
            assumptions=(
                "BF16 end to end, as published",
                "trainer TP1 PP16 EP16 on 256 GPUs (DP16 dense, EDP1 experts); 61 layers over 16 stages: "
                "3 layers on stages 0, 14 and 15, 4 elsewhere",
                "engine: vLLM TP32 without expert parallelism, so each expert is split 32 ways (64 rows of 2048)",
                "MTP layer not refitted",
                "each expert's linear_fc2 slice is 7,168 rows of 128 bytes, 4,096 bytes apart: 7,168 descriptors, "
                "or its 29 MB enclosing block for 0.9 MB needed; the staging budget (--max-overread) decides",
            ),
        ),
        Scenario(
            name="deepseek-v3-nemo-blocks",
            model="deepseek-v3",
            trainer=TrainerLayout(tp=1, pp=16, ep=16, dp=16, row_blocks=32),
            engine=EngineFleet(tp=32, ep=1, replicas=8),
            anchor=Anchor(
                who="NeMo-RL nccl_reshard (NCCL M2N)",
                low_s=2.39,
                high_s=2.83,
                setup="DeepSeek-V3 BF16, Megatron PP16 x EP16 -> vLLM TP32 x DP8, H100",
                source="NVIDIA-NeMo/RL docs/design-docs/nccl-reshard-refit.md (commit 7ea279abf)",
            ),
            assumptions=(
                "deepseek-v3-nemo (the published layouts, BF16, MTP not refitted) with the trainer publishing "
                "Publisher(row_blocks=32): every row-parallel shard (attention linear_proj, dense and shared-expert "
                "linear_fc2, each expert's linear_fc2) as 32 contiguous column blocks, so each engine rank's slice "
                "of it is one block, one descriptor",
                "the trainer pays for it in memory: a live publisher holds a blocked copy of those tensors (the "
                "'trainer mirror' figure) and refreshes it per version; with snapshots the slots hold the blocks",
            ),
        ),
        Scenario(
            name="deepseek-v3-nemo-ep32",
            model="deepseek-v3",
            trainer=TrainerLayout(tp=1, pp=16, ep=16, dp=16),
            engine=EngineFleet(tp=32, ep=32, replicas=8),
            anchor=Anchor(
                who="NeMo-RL nccl_reshard (NCCL M2N)",
                low_s=2.39,
                high_s=2.83,
                setup="DeepSeek-V3 BF16, Megatron PP16 x EP16 -> vLLM TP32 x DP8, H100",
                source="NVIDIA-NeMo/RL docs/design-docs/nccl-reshard-refit.md (commit 7ea279abf)",
            ),
            assumptions=(
                "what if: deepseek-v3-nemo with engine expert parallelism (EP32 within each TP32 replica, 8 "
                "whole experts per GPU), which is not the published engine layout",
                "BF16 end to end; trainer and MTP as in deepseek-v3-nemo",
            ),
        ),
        Scenario(
            name="qwen3-235b-miles",
            model="qwen3-235b-a22b",
            trainer=TrainerLayout(tp=4, pp=4, ep=16, dp=4),
            engine=EngineFleet(tp=32, ep=32, replicas=2, scheme=Scheme.HF),
            anchor=Anchor(
                who="Miles / SGLang P2P (Mooncake RDMA WRITE)",
                low_s=3.162,
                high_s=3.162,
                setup="Qwen3-235B-A22B, Megatron TP4 PP4 CP2 EP16 (8 nodes) -> SGLang TP32 EP32 (8 nodes), H100",
                source="radixark/miles docs/advanced/p2p-weight-transfer.md (commit 31f1ca961)",
            ),
            assumptions=(
                "BF16 on the wire: the publication gives no dtype for this row, and BF16 is the checkpoint's own",
                "CP2 only adds weight copies, so it is folded into DP: TP4 PP4 EP16 DP4 on 64 GPUs (EDP1 experts); "
                "94 layers over 4 stages: 23, 24, 24, 23",
                "engine: 64 GPUs = 2 replicas of TP32 EP32 (4 whole experts per GPU); Hugging Face names, where "
                "TP32 over 4 KV heads holds each KV head on 8 ranks (Megatron's own split cannot)",
            ),
        ),
        Scenario(
            name="kimi-k2-miles",
            model="kimi-k2",
            trainer=TrainerLayout(tp=8, pp=8, ep=32, dp=4),
            engine=EngineFleet(tp=32, ep=32, replicas=8),
            linear_dtype=FP8,
            anchor=Anchor(
                who="Miles / SGLang P2P (Mooncake RDMA WRITE)",
                low_s=7.23,
                high_s=7.23,
                setup="Kimi-K2 FP8, Megatron TP8 PP8 CP4 EP32 (32 nodes) -> SGLang TP32 EP32 (32 nodes), H100 + IB",
                source="radixark/miles docs/advanced/p2p-weight-transfer.md (commit 31f1ca961)",
            ),
            assumptions=(
                "FP8 on the wire ('transfer a 512-GPU, 1T Kimi FP8 model in 7 seconds'): GEMM weights FP8, "
                "the rest BF16, block scales left out",
                "CP4 only adds weight copies, so it is folded into DP4; engine 256 GPUs = 8 replicas of TP32 EP32",
            ),
        ),
        Scenario(
            name="smoke",
            model="tiny-mla-moe",
            trainer=TrainerLayout(tp=2, pp=2, ep=2, dp=2, gpus_per_node=4),
            engine=EngineFleet(tp=2, ep=2, replicas=2, gpus_per_node=4),
            assumptions=("a tiny model for CI: checks that the numbers add up, not how fast anything is",),
        ),
        Scenario(
            name="smoke-dense",
            model="tiny-mla-moe",
            trainer=TrainerLayout(tp=2, pp=2, ep=2, dp=2, gpus_per_node=4),
            engine=EngineFleet(tp=1, ep=1, replicas=3, gpus_per_node=4, scheme=Scheme.MEGATRON),
            assumptions=("engine TP1: every engine replica receives exactly one copy of the model",),
        ),
    )
}
