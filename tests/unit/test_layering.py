"""Imports flow one way (docs/architecture.md): each layer of `refit` imports only the layers below it.

Function-local (lazy) imports count too: a lazy import still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "refit"

VALUES = {"refit.errors", "refit.types", "refit.dtypes", "refit.config", "refit.proto", "refit.digest", "refit.graphs"}

# Layer of a module (by the longest matching prefix) -> the layers it may import from.
ALLOWED: dict[str, set[str]] = {
    "refit.errors": set(),
    "refit.dtypes": {"refit.errors"},
    "refit.config": {"refit.errors"},
    "refit.graphs": set(),
    "refit.types": {"refit.errors", "refit.dtypes"},
    "refit.digest": {"refit.errors", "refit.dtypes", "refit.types"},
    "refit.proto": {"refit.proto"},
    "refit.compat": VALUES,
    "refit.kernels": VALUES,  # GPU kernels of our own: beside the values, below planning
    "refit.plan": VALUES | {"refit.plan", "refit.kernels"},
    "refit.transport": VALUES | {"refit.compat", "refit.transport"},
    "refit.catalog": VALUES | {"refit.catalog"},
    "refit.megatron": VALUES | {"refit.compat", "refit.megatron"},
    "refit.engines.base": VALUES | {"refit.plan"},
    "refit.copies": VALUES | {"refit.plan"},
    "refit.staged": VALUES | {"refit.plan"},
    "refit.reads": VALUES | {"refit.plan", "refit.transport"},
    "refit.staging": VALUES | {"refit.plan", "refit.transport", "refit.copies", "refit.staged", "refit.reads"},
    "refit.streaming": VALUES | {"refit.plan", "refit.kernels", "refit.transport", "refit.reads", "refit.staging"},
    "refit.plan_cache": VALUES | {"refit.plan", "refit.catalog", "refit.engines.base"},
    "refit.versions": VALUES | {"refit.catalog"},
    "refit.ahead": VALUES
    | {"refit.plan", "refit.catalog", "refit.transport", "refit.reads", "refit.staging"}
    | {"refit.plan_cache", "refit.staged"},
    "refit.puller": VALUES
    | {"refit.plan", "refit.transport", "refit.catalog", "refit.engines.base", "refit.staging"}
    | {"refit.streaming", "refit.ahead"}
    | {"refit.plan_cache", "refit.versions", "refit.staged"},
    "refit.receiver": VALUES
    | {"refit.plan", "refit.catalog", "refit.engines.base", "refit.ahead", "refit.puller"}
    | {"refit.plan_cache", "refit.versions", "refit.staged"},
    "refit.trainer": VALUES | {"refit.compat", "refit.megatron", "refit.transport", "refit.catalog", "refit.trainer"},
    "refit.engines": VALUES | {"refit.plan", "refit.compat", "refit.megatron", "refit.engines"},
    # vLLM orchestration sits on top: it hosts receivers and adapters, never the trainer.
    "refit.vllm": VALUES
    | {"refit.plan", "refit.compat", "refit.transport", "refit.catalog"}
    | {"refit.engines", "refit.receiver", "refit.vllm"},
    # Megatron's dynamic inference engine: a receiver and MegatronEngine per engine rank, never the trainer.
    "refit.megatron_inference": VALUES
    | {"refit.compat", "refit.megatron", "refit.engines", "refit.receiver", "refit.megatron_inference"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str | None:
    matches = [k for k in ALLOWED if module == k or module.startswith(k + ".")]
    return max(matches, key=len) if matches else None


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


MODULES = sorted((p for p in PACKAGE.rglob("*.py") if "_pb2" not in p.name), key=str)


@pytest.mark.parametrize("path", [p for p in MODULES if _module_name(p) != "refit"], ids=_module_name)
def test_imports_flow_one_way(path: Path) -> None:
    module = _module_name(path)
    layer = _layer(module)
    assert layer is not None, f"{module}: no layer in tests/unit/test_layering.py; add it (and to docs/architecture.md)"
    allowed = ALLOWED[layer] | {layer}
    bad = sorted(
        imp
        for imp in _imports(path, module)
        if imp.startswith(("refit_bench", "refit_server"))
        or (_layer(imp) is not None and not any(imp == a or imp.startswith(a + ".") for a in allowed))
    )
    assert not bad, f"{module} ({layer}) imports {bad}; it may import only from {sorted(allowed)}"
