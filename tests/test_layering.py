"""Imports flow one way: core <- runtime <- format <- modifier <- cli (README, Layout).

Read from the source with ``ast`` (no import runs), so a violation fails here even where ruff's
per-folder banned-api rules do not reach (``runtime.py``, ``cuda.py``).
"""

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "armor_modifier"
STDLIB = set(sys.stdlib_module_names)

#: package part -> (allowed third-party roots, or None: any but llm-compressor; forbidden
#: armor_modifier parts)
RULES = {
    "core": (
        {"torch"},
        {"runtime", "cuda", "format", "modifier", "cli", "cli_prune", "evaluation"},
    ),
    "runtime": ({"torch"}, {"cuda", "format", "modifier", "cli", "cli_prune", "evaluation"}),
    "cuda": ({"torch", "compressed_tensors"}, {"format", "modifier", "cli", "cli_prune"}),
    "format": (
        {"torch", "safetensors", "transformers", "compressed_tensors", "loguru", "pydantic"},
        {"modifier", "cli", "cli_prune", "evaluation"},
    ),
    "evaluation": (None, {"modifier", "cli", "cli_prune"}),
    # the ONNX exporter reads armor-ct through format/ and runtime; it never needs llm-compressor
    "onnx": (
        {"torch", "numpy", "onnx", "onnxruntime", "transformers", "compressed_tensors",
         "safetensors", "loguru"},
        {"modifier", "cli", "cli_prune", "evaluation"},
    ),
    # optimum adapters sit beside the CLI (they reuse it): anything but llm-compressor directly
    "integrations": (None, set()),
}


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(absolute module, line)`` of every import in ``path`` (relative ones resolved)."""
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
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
            found.append((name.rstrip("."), node.lineno))
    return found


def _part(path: Path) -> str:
    first = path.relative_to(SRC).parts[0]
    return first.removesuffix(".py")


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_one_way(path):
    part = _part(path)
    if part not in RULES:
        return
    allowed, forbidden = RULES[part]
    for name, line in _imports(path):
        root = name.split(".")[0]
        if root == "armor_modifier":
            inner = name.split(".")[1] if "." in name else ""
            assert inner not in forbidden, f"{path}:{line} imports {name}"
        elif allowed is None:
            assert root != "llmcompressor", f"{path}:{line} imports {name}"
        elif root != "__future__":
            assert root in STDLIB or root in allowed, f"{path}:{line} imports {name}"


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    """The check above can fail: an llm-compressor import in the core is caught."""
    core = tmp_path / "armor_modifier" / "core"
    core.mkdir(parents=True)
    bad = core / "bad.py"
    bad.write_text("from llmcompressor import oneshot\nfrom ..modifier import base\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "armor_modifier")
    with pytest.raises(AssertionError, match="imports llmcompressor"):
        test_imports_flow_one_way(bad)
    bad.write_text("from ..modifier import base\n")
    with pytest.raises(AssertionError, match="imports armor_modifier.modifier"):
        test_imports_flow_one_way(bad)
