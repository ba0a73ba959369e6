"""The engine boundary: what a receiver needs from an inference engine, and nothing more.

An engine says what model it serves and where it sits in its own parallel layout (`spec`), which
tensors under which names its rank holds (`expected`), where staging memory should live (`device`),
and installs a complete set of tensors into its existing parameter storage (`install`). Adapters
whose install is a plain copy into parameters (HF, Megatron) share `install_tensors`, which makes
that install all-or-nothing.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import torch

from refit.dtypes import dtype_name
from refit.errors import ConfigError, EngineError, ModelMismatchError
from refit.plan.targets import DEFAULT_VOCAB_PADDING, EngineLayout, Scheme
from refit.types import MLA_FIELDS, ModelMeta


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineSpec:
    """The model an engine rank serves, in ModelMeta's terms, and the engine's layout conventions.

    The fields shared with `ModelMeta` describe the model and are checked against the catalog's
    (`check_compatible`); an empty `architecture` or a zero `vocab_size` means "whatever the
    catalog declares". The rest place this rank in the engine's own tensor- and expert-parallel
    groups and say how it names, splits and pads its tensors; `layout()` turns them into the
    planner's `EngineLayout`, the one place where that translation happens.

    Multi-latent attention (DeepSeek-V3): the five MLA dimensions of `ModelMeta`, all compared, so an
    MLA model and a GQA engine (all 0) of equal size, or MLA models of different latent or head dims,
    refuse each other naming the field. An MLA spec's `num_query_groups` is its head count and its
    `kv_channels` its `v_head_dim`, as the Megatron reader declares them.

    MoE models: `num_experts` routed experts per MoE layer (0: a dense model), each with an FFN of
    `moe_ffn_hidden_size`; `ffn_hidden_size` is the dense MLP layers' FFN (Megatron's
    `TransformerConfig.ffn_hidden_size`, HF `intermediate_size`), which a model without dense layers
    (Mixtral) sets to its expert FFN, as Megatron's default `moe_ffn_hidden_size` does. Both are
    compared with the catalog's, so a dense engine never takes a MoE model or the reverse.
    """

    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    num_experts: int = 0  # routed experts per MoE layer; 0: a dense model
    moe_ffn_hidden_size: int = 0  # each routed expert's FFN; 0 for a dense model
    # Multi-latent attention (ModelMeta's fields; all 0 for other attention, q_lora_rank 0: no query latent)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    expert_tp_rank: int = 0
    expert_tp_size: int = 0  # 0: EngineLayout's default (split like dense layers without EP, whole under EP)
    scheme: Scheme = Scheme.HF  # target names and split: "hf" (transformers, vLLM) or "megatron"
    padded_vocab_size: int = 0  # megatron scheme: the engine's own padded vocabulary (0: the trainer's)
    vocab_padding: int = DEFAULT_VOCAB_PADDING  # hf scheme: the engine pads its vocabulary to a multiple of this

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "scheme", Scheme(self.scheme))
        except ValueError:
            raise ConfigError(f"unknown engine scheme {self.scheme!r}; known: {[s.value for s in Scheme]}") from None
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"engine {name} must be positive, got {getattr(self, name)}")
        for name in ("ffn_hidden_size", "num_experts", "moe_ffn_hidden_size", *MLA_FIELDS):
            if getattr(self, name) < 0:
                raise ConfigError(f"engine {name} must be >= 0, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"engine num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_query_groups {self.num_query_groups}"
            )
        self.layout()  # the parallel positions and vocabulary fields: EngineLayout's own checks
        if self.num_experts and self.num_experts % self.ep_size:
            raise ConfigError(f"engine ep_size {self.ep_size} does not divide its num_experts {self.num_experts}")

    def layout(self) -> EngineLayout:
        """The planner's view of this engine rank (raises ConfigError for an invalid position)."""
        return EngineLayout(
            tp_rank=self.tp_rank, tp_size=self.tp_size, ep_rank=self.ep_rank, ep_size=self.ep_size,
            expert_tp_rank=self.expert_tp_rank, expert_tp_size=self.expert_tp_size, vocab_size=self.vocab_size,
            padded_vocab_size=self.padded_vocab_size, vocab_padding=self.vocab_padding, scheme=self.scheme,
        )  # fmt: skip

    @classmethod
    def from_meta(cls, meta: ModelMeta, **engine: Any) -> EngineSpec:
        """The spec of an engine serving `meta`'s model; `engine` sets its own fields (tp_rank, scheme, ...).

        Keyword arguments also override model fields, e.g. `architecture=""` to skip that check.
        """
        return cls(**{name: getattr(meta, name) for name in MODEL_FIELDS} | engine)


# The fields an EngineSpec shares with ModelMeta: the model description check_compatible compares.
MODEL_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(EngineSpec) if f.name in {g.name for g in fields(ModelMeta)}
)


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str


@runtime_checkable
class Engine(Protocol):
    """What `Receiver` needs from an inference engine rank.

    An engine may also have `destinations() -> Mapping[str, torch.Tensor]`: the live tensors its
    `install` writes, by the names of `expected()`. A receiver then streams refits through a bounded
    staging window and reads contiguous runs straight into them (`destinations_of`).

    Or, for an engine that can only install whole layers (vLLM's layerwise reload),
    `layer_of(name) -> (order, layer)` and `install_layers(tensors)`: every tensor of the layers
    given, installed at once, the other layers untouched. A receiver then streams refits larger than
    its window in chunks of whole layers (`installs_layers`).
    """

    def spec(self) -> EngineSpec: ...

    def expected(self) -> Mapping[str, TensorSpec]: ...

    @property
    def device(self) -> torch.device: ...

    def install(self, tensors: Mapping[str, torch.Tensor]) -> None: ...


def destinations_of(engine: Engine) -> dict[str, torch.Tensor] | None:
    """The engine's live tensors by name, if it exposes `destinations()` (then it takes streamed
    installs and direct reads); ConfigError if they are not exactly the tensors it `expected()`."""
    get = getattr(engine, "destinations", None)
    if get is None:
        return None
    dests = dict(get())
    if set(dests) != set(engine.expected()):
        raise ConfigError(f"{type(engine).__name__}.destinations() and expected() name different tensors")
    return dests


def installs_layers(engine: Engine) -> bool:
    """Whether the engine installs whole layers on their own (`layer_of()` and `install_layers()`; vLLM):
    it then takes refits larger than its staging window in chunks of whole layers."""
    return callable(getattr(engine, "layer_of", None)) and callable(getattr(engine, "install_layers", None))


def check_compatible(spec: EngineSpec, model: ModelMeta) -> None:
    """Raise ModelMismatchError naming every field where the engine and the catalog disagree.

    Every field the spec shares with ModelMeta is compared, except three with their own rule: an
    empty `architecture` or a zero `vocab_size` means "whatever the catalog says", a vocabulary must
    fit the catalog's padded tables, and `padded_vocab_size` is the engine's own padding (a
    Megatron engine may pad further than the trainer).
    """
    diffs = []
    for name in MODEL_FIELDS:
        engine, catalog = getattr(spec, name), getattr(model, name)
        if name == "padded_vocab_size" or (name in ("architecture", "vocab_size") and not (engine and catalog)):
            continue
        if engine != catalog:
            diffs.append(f"{name}: engine {engine!r} vs catalog {catalog!r}")
    if spec.vocab_size > model.padded_vocab_size:
        diffs.append(f"vocab_size: engine {spec.vocab_size} > catalog's padded {model.padded_vocab_size}")
    if model.num_experts % spec.ep_size:
        diffs.append(
            f"ep_size: engine EP size {spec.ep_size} does not divide the catalog's {model.num_experts} experts"
        )
    if diffs:
        raise ModelMismatchError("engine does not match the catalog's model: " + "; ".join(diffs))


def spec_from_hf_config(
    config: object, *, architecture: str, tp_rank: int = 0, tp_size: int = 1, **engine: Any
) -> EngineSpec:
    """The EngineSpec of a model described by a transformers config (HF models, vLLM's hf_config).

    `engine` sets the spec's other engine fields (expert parallelism, `vocab_padding`, ...). MoE
    configs give the expert count (`num_experts`, Mixtral's `num_local_experts`, DeepSeek's
    `n_routed_experts`) and the expert FFN (`moe_intermediate_size`; Mixtral, which has no dense
    layers, sizes its experts by `intermediate_size`); `ffn_hidden_size` is always `intermediate_size`,
    the dense layers' FFN (DeepSeek's first `first_k_dense_replace` layers). A config with a
    `kv_lora_rank` (DeepSeek-V3, Kimi-K2) gives the MLA fields (`q_lora_rank` None: 0).
    """
    c: Any = config
    heads = c.num_attention_heads
    experts = (
        getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None) or getattr(c, "n_routed_experts", None)
    ) or 0
    moe_ffn = (getattr(c, "moe_intermediate_size", None) or c.intermediate_size) if experts else 0
    # DeepSeek-V3's config (MLA): `kv_lora_rank` set; its `head_dim` is the rope dim and its
    # `num_key_value_heads` unused by attention, so heads and v_head_dim stand in, as in ModelMeta.
    mla = {f: int(getattr(c, f, None) or 0) for f in MLA_FIELDS} if getattr(c, "kv_lora_rank", None) else {}
    return EngineSpec(
        architecture=architecture,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=heads,
        num_query_groups=heads if mla else getattr(c, "num_key_value_heads", None) or heads,
        kv_channels=mla["v_head_dim"] if mla else getattr(c, "head_dim", None) or c.hidden_size // heads,
        ffn_hidden_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        num_experts=experts,
        moe_ffn_hidden_size=moe_ffn,
        **mla,
        tp_rank=tp_rank,
        tp_size=tp_size,
        **engine,
    )


def specs_of(params: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """name -> shape and dtype of each tensor: what an engine that installs into `params` expects."""
    return {name: TensorSpec(shape=tuple(p.shape), dtype=dtype_name(p.dtype)) for name, p in params.items()}


def check_tensors(expected: Mapping[str, TensorSpec], planned: Mapping[str, TensorSpec]) -> None:
    """Raise ModelMismatchError unless the plan yields exactly the engine's tensors."""
    problems = []
    missing = sorted(set(expected) - set(planned))
    extra = sorted(set(planned) - set(expected))
    if missing:
        problems.append(f"not published: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unknown to the engine: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for name in sorted(set(expected) & set(planned)):
        if expected[name] != planned[name]:
            problems.append(f"{name}: engine {expected[name]} vs catalog {planned[name]}")
    if problems:
        raise ModelMismatchError("engine tensors do not match the catalog: " + "; ".join(problems[:12]))


def check_install(
    expected: Mapping[str, TensorSpec], tensors: Mapping[str, torch.Tensor], *, device: torch.device | None = None
) -> None:
    """Raise ModelMismatchError unless `tensors` is exactly the engine's set, each of the right shape and dtype.

    With `device` (the engine's), each tensor must also hold readable data: a dense torch tensor
    whose storage covers it (not on the meta device), on the CPU or on `device`'s device type.
    Every engine calls this before writing its first byte, so a refused install changes nothing.
    """
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or extra:
        raise ModelMismatchError(
            f"install needs exactly this rank's tensors: missing {sorted(missing)[:5]}, unknown {sorted(extra)[:5]}"
        )
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ModelMismatchError(f"{name}: got a {type(t).__name__}, not a torch.Tensor")
        spec = expected[name]
        if tuple(t.shape) != spec.shape or dtype_name(t.dtype) != spec.dtype:
            raise ModelMismatchError(f"{name}: got {tuple(t.shape)} {t.dtype}, engine holds {spec}")
        if device is not None:
            _check_readable(name, t, torch.device(device))


def _check_readable(name: str, t: torch.Tensor, device: torch.device) -> None:
    """Raise ModelMismatchError unless a copy out of `t` into an engine on `device` can only succeed."""
    if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        # Subclasses (fake, functional, distributed tensors) may refuse or redirect a plain copy.
        raise ModelMismatchError(f"{name}: a {type(t).__name__} is not a plain torch.Tensor")
    if t.is_meta or t.layout != torch.strided:
        raise ModelMismatchError(f"{name}: a {t.layout} tensor on {t.device} holds no copyable data")
    if t.device.type not in ("cpu", device.type):
        raise ModelMismatchError(f"{name}: on {t.device}; the engine reads from cpu or {device.type}")
    if t.numel():
        # A storage shrunk under its view (`untyped_storage().resize_`) would crash the copy, not raise.
        last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
        if (last + 1) * t.element_size() > t.untyped_storage().nbytes():
            raise ModelMismatchError(f"{name}: its storage ({t.untyped_storage().nbytes()} bytes) ends inside it")


def install_tensors(params: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy `tensors[name]` into `params[name]` for every name: all of them, or none.

    Everything a copy can fail on is checked first, before the first byte is written, and a refusal
    raises ModelMismatchError naming the tensor: the exact set of names, each shape and dtype, and
    that each tensor can be copied (a plain dense tensor with storage, on the CPU or the engine's
    device type, not overlapping any parameter other than its own destination, which a copy would
    refuse half-way). What remains is same-shape, same-dtype copies between readable memory, which
    allocate nothing (non-contiguous sources from another device are made contiguous beforehand).

    Old values are not saved for a restore: a backup would cost a second copy of the weights in
    engine memory (on a GPU, the memory the engine needs) on every install, and it could only help
    with a fault of the device itself, after which the device cannot run the restore either. If a
    copy still fails (such a fault), the error says the engine's weights are mixed.
    """
    check_install(specs_of(params), tensors)
    sources = _copyable_sources(params, tensors)
    try:
        with torch.no_grad():
            # One batched call instead of a launch per tensor: a MoE engine holds thousands of small
            # tensors, and per-tensor launches dominated its install (docs/benchmarks.md, MoE on H200s).
            # torch groups the pairs by device and dtype and copies any it cannot batch one by one.
            names = list(sources)
            torch._foreach_copy_([params[n] for n in names], [sources[n] for n in names], non_blocking=True)
            for device in {p.device for p in params.values() if p.is_cuda}:
                torch.cuda.synchronize(device)
    except Exception as exc:
        raise EngineError(
            f"a device fault during {len(sources)} validated copies; the engine's weights are "
            f"now mixed and it must be refitted again: {exc}"
        ) from exc


def _copyable_sources(
    params: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Check every tensor can be copied into its parameter; return what each copy reads (install order)."""
    spans = _Spans(params.values())
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        dest = params[name]
        _check_readable(name, t, dest.device)
        if spans.overlaps(t, dest):
            raise ModelMismatchError(f"{name}: shares memory with the engine's parameters; pass a copy")
        if t.device != dest.device and not t.is_contiguous():
            t = t.contiguous()  # a cross-device copy would make this temporary mid-install
        out[name] = t
    return out


class _Spans:
    """Byte ranges of the engine's parameters, per device, to find a source that aliases one of them."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        by_device: dict[torch.device, list[tuple[int, int]]] = {}
        for p in params:
            if p.numel():
                by_device.setdefault(p.device, []).append(_extent(p))
        self._starts: dict[torch.device, list[int]] = {}
        self._max_end: dict[torch.device, list[int]] = {}  # running maximum of the ends, in start order
        for device, ranges in by_device.items():
            ranges.sort()
            self._starts[device] = [a for a, _ in ranges]
            self._max_end[device] = list(itertools.accumulate((b for _, b in ranges), max))

    def overlaps(self, t: torch.Tensor, dest: torch.Tensor) -> bool:
        """Whether `t` shares a byte with any parameter, other than being exactly `dest` itself."""
        if not t.numel() or t.device not in self._starts:
            return False
        start, stop = _extent(t)
        if t.device == dest.device and (start, stop) == _extent(dest) and t.stride() == dest.stride():
            return False  # copying a parameter onto itself changes nothing
        before = bisect.bisect_left(self._starts[t.device], stop)  # parameters starting before t ends
        return before > 0 and self._max_end[t.device][before - 1] > start


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte) that `t` may touch."""
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1
    return t.data_ptr(), t.data_ptr() + span * t.element_size()
