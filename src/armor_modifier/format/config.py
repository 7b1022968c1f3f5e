"""The ``quantization_config`` of an armor-ct checkpoint (the ``config.json`` side of the format).

::

    "quantization_config": {
      "quant_method": "armor-ct",
      ...every compressed-tensors key, unchanged, when the cores are quantized...
      "sparsity_config": {compressed-tensors' Sparse24BitMaskConfig: format "sparse-24-bitmask",
                          sparsity_structure "2:4", targets (wrapped modules), ignore, ...},
      "armor": {"format_version": 1, "core_format": "sparse-24-bitmask",
                "wrapper_block_sizes": [128], "modules": {"model.layers.0.mlp.up_proj": [128, 128]},
                "recipe": {...} | null, "producer": "armor-modifier 0.1.0"}
    }

``modules`` maps every wrapped Linear to ``[b_A, b_B]``, the block sizes of ``armor_A`` and
``armor_B``. See ``docs/checkpoint.md``.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass, field
from typing import Any

from .codec import (
    ARMOR_CT,
    CORE_FORMAT,
    FORMAT_VERSION,
    SUPPORTED_FORMAT_VERSIONS,
    ARMORCheckpointError,
)

__all__ = ["ARMORBlock", "parse_armor_block", "build_quantization_config", "CT_RESERVED_KEYS"]

#: Keys of ``quantization_config`` that armor-ct owns; the rest belongs to compressed-tensors.
CT_RESERVED_KEYS = ("quant_method", "sparsity_config", "armor")


def _producer() -> str:
    try:
        version = importlib.metadata.version("armor-modifier")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"armor-modifier {version}"


@dataclass(frozen=True)
class ARMORBlock:
    """The ``armor`` block: which Linears carry wrappers and how the cores are stored.

    :ivar modules: ``{module name: (b_A, b_B)}``
    :ivar recipe: the ARMOR settings that produced the checkpoint, when known (JSON-able)
    """

    modules: dict[str, tuple[int, int]]
    recipe: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    core_format: str = CORE_FORMAT
    producer: str = field(default_factory=_producer)

    def to_dict(self) -> dict[str, Any]:
        sizes = sorted({b for pair in self.modules.values() for b in pair})
        return {
            "format_version": self.format_version,
            "core_format": self.core_format,
            "wrapper_block_sizes": sizes,
            "modules": {name: list(pair) for name, pair in sorted(self.modules.items())},
            "recipe": self.recipe,
            "producer": self.producer,
        }


def parse_armor_block(block: object) -> ARMORBlock:
    """Validate the ``armor`` block of a ``quantization_config``.

    :raises ARMORCheckpointError: on a missing, non-int or unknown ``format_version``, an unknown
        ``core_format``, or a malformed module list (not a mapping, empty, an empty name, block
        sizes that are not two positive ints)
    """
    if not isinstance(block, dict):
        raise ARMORCheckpointError(
            f"quantization_config has quant_method {ARMOR_CT!r} but its 'armor' block is "
            f"{block!r}, not a mapping; the config.json is damaged or was not written by "
            "armor-modifier"
        )
    version = _format_version(block)
    core_format = block.get("core_format", CORE_FORMAT)
    if core_format != CORE_FORMAT:
        raise ARMORCheckpointError(
            f"armor-ct core_format {core_format!r} is not supported (only {CORE_FORMAT!r})"
        )
    return ARMORBlock(
        modules=_modules(block.get("modules")),
        recipe=block.get("recipe"),
        format_version=version,
        core_format=core_format,
        producer=block.get("producer", "unknown"),
    )


def _format_version(block: dict[str, Any]) -> int:
    if "format_version" not in block:
        raise ARMORCheckpointError(
            "armor-ct block has no format_version; the config.json is damaged or was not "
            f'written by armor-modifier (this version writes "format_version": {FORMAT_VERSION})'
        )
    version = block["format_version"]
    # bool is an int subclass and 1.0 == 1: both would pass a plain membership test.
    if type(version) is not int:
        raise ARMORCheckpointError(
            f"armor-ct format_version must be an integer, got {json.dumps(version, default=repr)} "
            f"({type(version).__name__}); the config.json is damaged (this version writes "
            f'"format_version": {FORMAT_VERSION})'
        )
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ARMORCheckpointError(
            f"armor-ct format_version {version!r} is not supported by {_producer()} (it reads "
            f"versions {list(SUPPORTED_FORMAT_VERSIONS)}); upgrade armor-modifier, or re-export "
            "the checkpoint with the version that reads it"
        )
    return version


def _modules(modules: object) -> dict[str, tuple[int, int]]:
    if not isinstance(modules, dict):
        what = "missing" if modules is None else f"a {type(modules).__name__}"
        raise ARMORCheckpointError(
            f"armor-ct block's modules is {what}, not a mapping {{module name: [b_A, b_B]}}; the "
            "config.json is damaged or was not written by armor-modifier"
        )
    if not modules:
        raise ARMORCheckpointError(
            "armor-ct block lists no wrapped modules (modules={}); the config.json is damaged"
        )
    parsed = {}
    for name, pair in modules.items():
        if not name:
            raise ARMORCheckpointError(
                f"armor-ct modules has an empty module name (block sizes {pair!r}); the "
                "config.json is damaged"
            )
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(type(b) is int and b > 0 for b in pair)
        ):
            raise ARMORCheckpointError(
                f"{name}: armor-ct wrapper block sizes must be [b_A, b_B] positive ints, got "
                f"{json.dumps(pair, default=repr)}; the config.json is damaged"
            )
        parsed[name] = (pair[0], pair[1])
    return parsed


def build_quantization_config(
    ct_config: dict[str, Any] | None,
    block: ARMORBlock,
    ignore: list[str],
    global_sparsity: float,
) -> dict[str, Any]:
    """The full armor-ct ``quantization_config``.

    :param ct_config: compressed-tensors' ``quantization_config`` as it wrote it (quantized cores),
        or ``None``; copied unchanged except ``quant_method`` and its empty ``sparsity_config``
    :param ignore: Linear modules left dense (for ``sparsity_config.ignore``)
    :param global_sparsity: pruned core entries over all saved parameters
    """
    from compressed_tensors.config import Sparse24BitMaskConfig

    sparsity = Sparse24BitMaskConfig(
        targets=sorted(block.modules),
        ignore=sorted(ignore),
        global_sparsity=round(global_sparsity, 6),
    ).model_dump()
    ct = {k: v for k, v in (ct_config or {}).items() if k not in CT_RESERVED_KEYS}
    return {**ct, "quant_method": ARMOR_CT, "sparsity_config": sparsity, "armor": block.to_dict()}
