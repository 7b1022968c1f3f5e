"""The one layering rule of the package, read from the source with ``ast`` (no import runs).

1. Imports flow one way between the parts: core <- runtime <- format <- modifier <- pruning <- cli
   (``staging`` below ``format``; ``calibration``, ``cuda``, ``onnx`` and ``integrations`` beside
   them as :data:`RULES` says),
   and the parts below the modifier never import llm-compressor.
2. The benchmark harness (``harness/``, package ``armor_harness``) sits above the library: the
   library reaches it only through ``calibration.require_harness`` (and ``cli_zeroshot``'s help
   text), never by an import statement elsewhere.
3. No import circle between modules of the library and the harness: every import counts,
   ``TYPE_CHECKING`` blocks and imports inside functions included.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "armor_modifier"
HARNESS = Path(__file__).parents[1] / "harness" / "src" / "armor_harness"
#: the only library parts with an import statement naming the harness
MAY_NAME_HARNESS = {"cli_zeroshot"}
STDLIB = set(sys.stdlib_module_names)
ABOVE_MODIFIER = {"modifier", "pruning", "cli", "cli_prune", "cli_zeroshot"}

#: package part -> (allowed third-party roots; None: any but llm-compressor; ANY: any), forbidden
#: armor_modifier parts)
ANY = frozenset({"*"})
RULES = {
    "core": (
        {"torch"},
        {"runtime", "cuda", "format", "onnx", "calibration", "integrations", *ABOVE_MODIFIER},
    ),
    "runtime": ({"torch"}, {"cuda", "format", "onnx", "calibration", *ABOVE_MODIFIER}),
    # atomic file work: below everything that writes files, above nothing but the errors
    "staging": (
        {"loguru"},
        {"runtime", "cuda", "format", "onnx", "calibration", "integrations", *ABOVE_MODIFIER},
    ),
    "cuda": ({"torch", "compressed_tensors"}, {"format", "onnx", *ABOVE_MODIFIER}),
    "format": (
        {"torch", "safetensors", "transformers", "compressed_tensors", "loguru", "pydantic"},
        {"onnx", "calibration", *ABOVE_MODIFIER},
    ),
    # models and calibration text for prune(): the core's errors only, no llm-compressor
    "calibration": (
        {"torch", "transformers", "datasets", "huggingface_hub"},
        {"runtime", "cuda", "format", "onnx", "integrations", "staging", *ABOVE_MODIFIER},
    ),
    # the ONNX exporter reads armor-ct through format/ and runtime; it never needs llm-compressor
    "onnx": (
        {"torch", "numpy", "onnx", "onnxruntime", "transformers", "compressed_tensors",
         "safetensors", "loguru"},
        {"calibration", *ABOVE_MODIFIER},
    ),
    "modifier": (ANY, {"pruning", "cli", "cli_prune", "cli_zeroshot", "integrations"}),
    "pruning": (ANY, {"cli", "cli_prune", "cli_zeroshot", "integrations"}),
    "cli_prune": (ANY, {"cli", "integrations"}),
    "cli_zeroshot": (ANY, {"cli", "cli_prune", "integrations"}),
}


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path) -> list[tuple[str, int]]:
    """``(absolute module, line)`` of every import in ``path`` (relative ones resolved); for
    ``from X import name`` also ``X.name`` (it may be a submodule)."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    package = parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join((*base, node.module or ""))
            else:
                name = node.module or ""
            name = name.rstrip(".")
            found.append((name, node.lineno))
            found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _part(path: Path, root: Path) -> str:
    first = path.relative_to(root).parts[0]
    return first.removesuffix(".py")


def _check_layering(path: Path, root: Path) -> None:
    part = _part(path, root)
    if part not in MAY_NAME_HARNESS:
        for name, line in _imports(path, root):
            assert name.split(".")[0] != HARNESS.name, f"{path}:{line} imports {name}"
    if part not in RULES:
        return
    allowed, forbidden = RULES[part]
    modules = {_module_name(p, root) for p in root.rglob("*.py")}
    for name, line in _imports(path, root):
        root_name = name.split(".")[0]
        if root_name == root.name:
            inner = name.split(".")[1] if "." in name else ""
            assert inner not in forbidden, f"{path}:{line} imports {name}"
        elif name in modules or root_name in STDLIB or root_name == "__future__" or allowed is ANY:
            continue
        elif allowed is None:
            assert root_name != "llmcompressor", f"{path}:{line} imports {name}"
        else:
            assert root_name in allowed, f"{path}:{line} imports {name}"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_one_way(path):
    _check_layering(path, SRC)


def import_graph(*roots: Path) -> dict[str, set[str]]:
    """``module -> modules of the packages it imports`` (every import statement), over the
    packages at ``roots`` together."""
    modules = {_module_name(p, root): (p, root) for root in roots for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, (path, root) in modules.items():
        targets = {target for target, _ in _imports(path, root) if target in modules}
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or ``None`` (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize(
    "path", sorted(HARNESS.rglob("*.py")), ids=lambda p: str(p.relative_to(HARNESS))
)
def test_the_harness_never_imports_llm_compressor(path):
    for name, line in _imports(path, HARNESS):
        assert name.split(".")[0] != "llmcompressor", f"{path}:{line} imports {name}"


def test_no_import_circle():
    cycle = find_cycle(import_graph(SRC, HARNESS))
    assert cycle is None, " -> ".join(cycle or [])


def test_the_rules_catch_a_violation(tmp_path):
    """Both checks can fail: an llm-compressor import or an upward import in the core, and a
    circle made of a TYPE_CHECKING import."""
    root = tmp_path / "armor_modifier"
    (root / "core").mkdir(parents=True)
    (root / "modifier").mkdir()
    bad = root / "core" / "bad.py"
    bad.write_text("from llmcompressor import oneshot\n")
    with pytest.raises(AssertionError, match="imports llmcompressor"):
        _check_layering(bad, root)
    bad.write_text("from ..modifier import base\n")
    with pytest.raises(AssertionError, match="imports armor_modifier.modifier"):
        _check_layering(bad, root)
    bad.write_text("from armor_harness import perplexity\n")
    with pytest.raises(AssertionError, match="imports armor_harness"):
        _check_layering(bad, root)
    (root / "modifier" / "a.py").write_text("from .b import thing\n")
    (root / "modifier" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import other\n"
    )
    assert find_cycle(import_graph(root)) == [
        "armor_modifier.modifier.a", "armor_modifier.modifier.b", "armor_modifier.modifier.a"
    ]


#: the size limits of issue 22: no library module over MAX_LINES, the modifier's base at most
#: MAX_BASE_LINES (fields and lifecycle; the work lives in the engine modules beside it)
MAX_LINES, MAX_BASE_LINES = 450, 250


def oversized(root: Path) -> list[str]:
    """``"path: lines"`` for each module of ``root`` over its limit."""
    found = []
    for path in sorted(root.rglob("*.py")):
        is_base = path.relative_to(root).as_posix() == "modifier/base.py"
        limit = MAX_BASE_LINES if is_base else MAX_LINES
        lines = len(path.read_text().splitlines())
        if lines > limit:
            found.append(f"{path.relative_to(root)}: {lines} lines (limit {limit})")
    return found


def test_modules_stay_small():
    assert oversized(SRC) == []


def test_the_size_rule_can_fail(tmp_path):
    (tmp_path / "modifier").mkdir()
    (tmp_path / "modifier" / "base.py").write_text("x = 1\n" * (MAX_BASE_LINES + 1))
    (tmp_path / "small.py").write_text("x = 1\n" * MAX_LINES)
    assert oversized(tmp_path) == [f"modifier/base.py: {MAX_BASE_LINES + 1} lines (limit 250)"]
