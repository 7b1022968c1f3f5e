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

    :raises ARMORCheckpointError: on an unknown ``format_version`` or ``core_format``, or a
        malformed module list
    """
    if not isinstance(block, dict):
        raise ARMORCheckpointError(
            f"quantization_config has quant_method {ARMOR_CT!r} but its 'armor' block is "
            f"{block!r}, not a mapping; the config.json is damaged or was not written by "
            "armor-modifier"
        )
    version = block.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ARMORCheckpointError(
            f"armor-ct format_version {version!r} is not supported by {_producer()} (it reads "
            f"versions {list(SUPPORTED_FORMAT_VERSIONS)}); upgrade armor-modifier, or re-export "
            "the checkpoint with the version that reads it"
        )
    core_format = block.get("core_format", CORE_FORMAT)
    if core_format != CORE_FORMAT:
        raise ARMORCheckpointError(
            f"armor-ct core_format {core_format!r} is not supported (only {CORE_FORMAT!r})"
        )
    modules = block.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ARMORCheckpointError(
            f"armor-ct block lists no wrapped modules (modules={modules!r}); the config.json is "
            "damaged"
        )
    parsed = {}
    for name, pair in modules.items():
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(b, int) and b > 0 for b in pair)
        ):
            raise ARMORCheckpointError(
                f"{name}: armor-ct wrapper block sizes must be [b_A, b_B] positive ints, got "
                f"{pair!r}"
            )
        parsed[name] = (pair[0], pair[1])
    return ARMORBlock(
        modules=parsed,
        recipe=block.get("recipe"),
        format_version=version,
        core_format=core_format,
        producer=block.get("producer", "unknown"),
    )


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
