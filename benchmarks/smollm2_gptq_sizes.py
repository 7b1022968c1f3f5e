"""Checkpoint sizes of the 2:4 rows of benchmarks/smollm2_gptq.py without running ARMOR or GPTQ.

Sizes depend on shapes and dtypes only: SmolLM2-135M with magnitude 2:4 masks (the SparseGPT rows)
and with identity ARMOR wrappers of block 32 (the ARMOR rows), unquantized, W4A16 and W8A8 by
round-to-nearest (GPTQ writes the same tensors), saved with ``smollm2_gptq.checkpoint_bytes``.
Prints one ``SIZES {...}`` JSON line of safetensors bytes:
``python benchmarks/smollm2_gptq_sizes.py``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import smollm2_gptq as bench  # noqa: E402


def main() -> None:
    from llmcompressor import oneshot

    import armor_modifier.modifier  # noqa: F401  (registers the modifiers)
    from armor_harness import load_default_model
    from armor_modifier.core import choose_wrapper_block_size, identity_blocks, top2_of_4_mask
    from armor_modifier.runtime import attach_wrappers

    sparse, _, _ = load_default_model()
    linears = [
        m
        for name, m in sparse.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name
    ]
    with torch.no_grad():
        for module in linears:
            module.weight.mul_(top2_of_4_mask(module.weight.abs()))
    armor = copy.deepcopy(sparse)
    for name, module in armor.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            m, n = module.weight.shape
            b = choose_wrapper_block_size(m, n, 32)
            attach_wrappers(module, identity_blocks(m // b, b), identity_blocks(n // b, b))
    sizes = {}
    for base, model in (("sparsegpt", sparse), ("armor", armor)):
        sizes[f"{base}/none"] = bench.checkpoint_bytes(copy.deepcopy(model))
        for quant in ("w4a16", "w8a8"):
            stage = copy.deepcopy(model)
            oneshot(model=stage, recipe=bench.quant_recipe(base, f"{quant}-rtn"))
            sizes[f"{base}/{quant}"] = bench.checkpoint_bytes(stage)
    print("SIZES " + json.dumps(sizes))


if __name__ == "__main__":
    main()
