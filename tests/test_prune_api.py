"""``armor_modifier.prune``: the library function the CLI and ARMORQuantizer call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import armor_modifier
from armor_modifier import SolverSettings
from tiny_llama import SEQ_LEN, calibration_dataset, load_tiny_llama, sample_input

pytestmark = pytest.mark.integration


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(sample_input()).logits


def test_prune_a_loaded_model_in_memory_with_a_tokenized_dataset(tiny_llama_folder: Path):
    from transformers import AutoTokenizer

    model = load_tiny_llama(tiny_llama_folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_folder)
    dense = _logits(model)
    result = armor_modifier.prune(
        model, None, tokenizer=tokenizer, dataset=calibration_dataset(), seq_len=SEQ_LEN,
        wrapper_block_size=16, num_iterations=1,
    )  # fmt: skip
    assert result.output is None and result.model is model
    (modifier,) = result.modifiers
    assert len(modifier.results) == 14  # every decoder Linear of the 2-layer model
    assert not torch.equal(_logits(model), dense)
    # settings given as an object give the same model as the same fields given one by one
    again = armor_modifier.prune(
        load_tiny_llama(tiny_llama_folder), None, tokenizer=tokenizer,
        dataset=calibration_dataset(), seq_len=SEQ_LEN,
        settings=SolverSettings(wrapper_block_size=16, num_iterations=1),
    )  # fmt: skip
    assert torch.equal(_logits(again.model), _logits(model))


def test_prune_refuses_unknown_settings_and_mixed_recipes(tiny_llama_folder: Path, tmp_path):
    with pytest.raises(ValueError, match=r"unknown ARMOR settings \['block_size'\]"):
        armor_modifier.prune(tiny_llama_folder, tmp_path / "a", block_size=16)
    with pytest.raises(ValueError, match=r"recipe sets every ARMOR and quantization setting"):
        armor_modifier.prune(tiny_llama_folder, tmp_path / "b", recipe=[], num_iterations=2)
    with pytest.raises(ValueError, match="quantize must be one of"):
        armor_modifier.prune(tiny_llama_folder, tmp_path / "c", quantize="int3")
    assert sorted(tmp_path.iterdir()) == []


def test_the_example_prunes_saves_and_reloads_the_same_model(tiny_folder, text_file, tmp_path):
    """``examples/prune_and_load.py`` end to end: the reloaded armor-ct model has exactly the
    in-memory pruned model's perplexity (both printed to two decimals)."""
    import subprocess
    import sys

    example = Path(__file__).parents[1] / "examples" / "prune_and_load.py"
    done = subprocess.run(
        [sys.executable, str(example), "--model", str(tiny_folder), "--dataset", str(text_file),
         "--output", str(tmp_path / "out"), "--num-samples", "4", "--seq-len", str(SEQ_LEN),
         "--num-iterations", "1", "--eval-windows", "2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ppl = {line.split()[0]: float(line.split("perplexity")[1].split()[0])
           for line in done.stdout.splitlines() if "perplexity" in line}  # fmt: skip
    assert set(ppl) == {"dense", "ARMOR", "reloaded"}, done.stdout
    assert ppl["reloaded"] == ppl["ARMOR"] != ppl["dense"]
    assert (tmp_path / "out" / "config.json").is_file()
