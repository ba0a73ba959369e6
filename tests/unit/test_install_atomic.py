"""Installs are all-or-nothing: a set that cannot be copied whole changes no parameter.

Each bad set passes the name, shape and dtype checks and is bad only in its last tensor (in install
order), so an install that copied before checking everything would have written the others: the
model must stay bit-identical and the error must name the tensor. Real engines: an `HFEngine` around
a transformers model built from a config, and a `MegatronEngine` around a megatron-core GPTModel in a
one-process gloo world.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
import torch

from refit.engines import HFEngine, MegatronEngine
from refit.errors import ModelMismatchError
from tests.support import engine_ops
from tests.support import hf_models as hm


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [], f"a refused install wrote {changed}"


def new_values(engine: HFEngine | MegatronEngine) -> dict[str, torch.Tensor]:
    """A complete valid set: every expected tensor, each different from the current weights."""
    gen = torch.Generator().manual_seed(3)
    return {
        name: torch.randn(spec.shape, generator=gen).to(getattr(torch, spec.dtype))
        for name, spec in engine.expected().items()
    }


def meta_tensor(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def shrunk_storage(t: torch.Tensor) -> torch.Tensor:
    bad = t.clone()
    bad.untyped_storage().resize_(0)  # shape and dtype still say it holds data
    return bad


def view_of_other_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor whose storage starts before its data: fine unless it overlaps an engine parameter."""
    return torch.cat([torch.zeros(1, dtype=t.dtype), t.flatten()])[1:].view(t.shape)


BAD_LAST: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "meta": meta_tensor,
    "storage-shrunk": shrunk_storage,
}


@pytest.fixture
def hf() -> tuple[torch.nn.Module, HFEngine]:
    model = hm.build_hf_model(hm.LLAMA_GQA, seed=7)
    return model, HFEngine(model)


@pytest.fixture
def megatron() -> Iterator[tuple[torch.nn.Module, MegatronEngine]]:
    with engine_ops.one_process_world():
        model = engine_ops.gpt_model(hm.LLAMA_GQA)
        yield model, MegatronEngine(model)


@pytest.mark.parametrize("kind", list(BAD_LAST))
@pytest.mark.parametrize("which", ["hf", "megatron"])
def test_a_set_whose_last_tensor_cannot_be_copied_changes_nothing(request, which: str, kind: str) -> None:
    model, engine = request.getfixturevalue(which)
    tensors = new_values(engine)
    last = list(tensors)[-1]
    tensors[last] = BAD_LAST[kind](tensors[last])
    before = snapshot(model)
    with pytest.raises(ModelMismatchError, match=f"^{re.escape(last)}: "):
        engine.install(tensors)
    assert_unchanged(model, before)


@pytest.mark.parametrize("which", ["hf", "megatron"])
def test_a_source_overlapping_another_parameter_is_refused_before_any_write(request, which: str) -> None:
    model, engine = request.getfixturevalue(which)
    params = dict(model.named_parameters())
    tensors = new_values(engine)
    names = list(tensors)
    # The last tensor reads the memory of the first parameter, which the install writes first.
    first, last = names[0], names[-1]
    source = params[first].detach().flatten()
    if source.numel() < tensors[last].numel():
        pytest.skip("the first parameter is smaller than the last")
    tensors[last] = source[: tensors[last].numel()].view(tensors[last].shape)
    if tensors[last].data_ptr() == params[last].data_ptr():
        pytest.skip("first and last parameters coincide")
    before = snapshot(model)
    with pytest.raises(ModelMismatchError, match="shares memory"):
        engine.install(tensors)
    assert_unchanged(model, before)


@pytest.mark.parametrize("which", ["hf", "megatron"])
def test_a_valid_set_is_installed_whole_in_place(request, which: str) -> None:
    model, engine = request.getfixturevalue(which)
    tensors = new_values(engine)
    first = next(iter(tensors))
    tensors[first] = view_of_other_tensor(tensors[first])  # a view into a larger storage is fine
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    engine.install(tensors)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in tensors.items())
    assert storage == {n: p.data_ptr() for n, p in model.named_parameters()}
    # Installing the engine's own parameters onto themselves is allowed and changes nothing.
    engine.install({n: params[n] for n in engine.expected()})
    assert all(torch.equal(params[n], t) for n, t in tensors.items())


def test_a_non_tensor_is_named(hf) -> None:
    model, engine = hf
    tensors: dict = new_values(engine)
    last = list(tensors)[-1]
    tensors[last] = tensors[last].numpy()
    before = snapshot(model)
    with pytest.raises(ModelMismatchError, match=f"{re.escape(last)}: got a ndarray"):
        engine.install(tensors)
    assert_unchanged(model, before)
