"""armor-ct files written before the package redesign still load, to the same logits.

``tests/data/pre_redesign`` holds two tiny checkpoints written by commit 0f412ab (the last commit
before the redesign) with its own ``tests/checkpoint_helpers.py``: a bf16 sparse-only model and a
W8A8 (int8) model, each with the logits the saving process computed on ``input_ids()``.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import armor_modifier  # noqa: F401  (registers the armor-ct loader)

DATA = Path(__file__).parent / "data" / "pre_redesign"


@pytest.mark.parametrize("name", ["sparse_bf16", "w8a8"])
def test_pre_redesign_checkpoint_loads_to_the_same_logits(name):
    saved = torch.load(DATA / f"{name}_logits.pt")
    model = AutoModelForCausalLM.from_pretrained(DATA / name).eval()
    with torch.no_grad():
        got = model(saved["ids"]).logits.float()
    assert model.config.quantization_config.armor_block.format_version == 1
    # Same tensors, same ops in the same order: bit-identical (observed max |diff| 0.0).
    assert torch.equal(got, saved["logits"]), (got - saved["logits"]).abs().max()
