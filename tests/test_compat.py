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
from armor_modifier.core.precision import native_bfloat16

DATA = Path(__file__).parent / "data" / "pre_redesign"


@pytest.mark.parametrize("name", ["sparse_bf16", "w8a8"])
def test_pre_redesign_checkpoint_loads_to_the_same_logits(name):
    saved = torch.load(DATA / f"{name}_logits.pt")
    model = AutoModelForCausalLM.from_pretrained(DATA / name).eval()
    with torch.no_grad():
        got = model(saved["ids"]).logits.float()
    assert model.config.quantization_config.armor_block.format_version == 1
    error = (got - saved["logits"]).abs()
    if name == "w8a8" or native_bfloat16(torch.device("cpu")):
        # Same tensors, same ops in the same order, on a CPU that multiplies bfloat16 natively
        # like the one that saved them: bit-identical (observed max |diff| 0.0 on Intel AMX and
        # AMD AVX-512 BF16 machines).
        assert torch.equal(got, saved["logits"]), error.max()
    else:
        # Without AVX-512 BF16 / AMX torch takes another bfloat16 kernel, which rounds a few
        # logits differently: observed on an AVX2-only AMD EPYC max |diff| 4.9e-4 (logits up to
        # 0.6) and mean |diff| 1.9e-7; one output wrapper loaded as the identity gives mean 4.1e-3
        assert error.max() <= 2e-3 and error.mean() <= 1e-5, (error.max(), error.mean())
