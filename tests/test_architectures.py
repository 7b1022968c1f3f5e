"""ARMOR on two more architectures than the tiny Llama: Qwen2 (q/k/v biases, GQA, untied head)
and Gemma-3 (sliding-window and global layers, QK norm, scaled tied embeddings).

For each: ``prune`` with within-layer propagation and decoder-layer reconstruction, and with
``ARMORGPTQModifier`` (W4A16); every core exactly 2:4 with wrappers; save -> reload in a fresh
interpreter with identical logits; ONNX export whose logits match PyTorch. A decoder layer the
capture hooks cannot replay stops before any compression with its class named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import armor_modifier
from armor_modifier.runtime import armor_linears
from checkpoint_helpers import run_python
from tiny_llama import (
    RECONSTRUCTION_BEFORE,
    SEQ_LEN,
    build_tokenizer,
    calibration_dataset,
    sample_input,
)
from tiny_models import ARCHITECTURES, save_tiny, target_names

pytestmark = pytest.mark.integration

SETTINGS = dict(wrapper_block_size=16, num_iterations=1, seq_len=SEQ_LEN)
RECONSTRUCTION = dict(
    propagate_within_layer=True, reconstruction_steps=4,
    reconstruction_guard_fraction=0.25, reconstruction_eval_every=2,
    **RECONSTRUCTION_BEFORE,  # the settings its observed values were taken with
)  # fmt: skip


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(sample_input()).logits


def _is_2of4(weight: torch.Tensor) -> bool:
    """Brute force: at most two non-zeros in every group of four along the input dimension."""
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


@pytest.fixture(scope="module", params=ARCHITECTURES)
def pruned(request, tmp_path_factory):
    """``(arch, dense folder, armor-ct folder, pruned model, modifiers)`` with propagation and
    reconstruction on."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    dense = save_tiny(arch, root / "dense")
    result = armor_modifier.prune(
        str(dense), root / "armor", tokenizer=build_tokenizer(), dataset=calibration_dataset(),
        **SETTINGS, **RECONSTRUCTION,
    )  # fmt: skip
    return arch, dense, result.output, result.model, result.modifiers


def test_every_target_is_an_exact_2of4_core_with_wrappers(pruned):
    arch, dense, _, model, modifiers = pruned
    linears = armor_linears(model)
    assert sorted(linears) == sorted(target_names())
    for name, linear in linears.items():
        assert _is_2of4(linear.weight), name
        assert linear.armor_A.shape[-1] == linear.armor_B.shape[-1] == 16, name
    if arch == "qwen2":  # the q/k/v biases are kept dense and unchanged
        original = AutoModelForCausalLM.from_pretrained(dense)
        for i in range(2):
            for proj in ("q_proj", "k_proj", "v_proj"):
                ours = getattr(model.model.layers[i].self_attn, proj).bias
                theirs = getattr(original.model.layers[i].self_attn, proj).bias
                assert ours is not None and torch.equal(ours, theirs), (i, proj)
    (modifier,) = modifiers
    assert len(modifier.reconstructions) == 2  # both decoder layers were reconstructed
    assert not torch.equal(_logits(model), _logits(AutoModelForCausalLM.from_pretrained(dense)))


def test_reload_in_a_fresh_interpreter_gives_identical_logits(pruned, tmp_path):
    _, _, folder, model, _ = pruned
    torch.save(_logits(model), tmp_path / "expected.pt")
    run_python(
        "import torch, armor_modifier, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from transformers import AutoModelForCausalLM\n"
        "from tiny_llama import sample_input\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
        "with torch.no_grad():\n"
        "    got = model(sample_input()).logits\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "assert torch.equal(got, expected), (got - expected).abs().max()\n",
        Path(__file__).parents[1],
    )


def test_onnx_export_matches_pytorch(pruned, tmp_path):
    pytest.importorskip("onnxruntime")
    from armor_modifier.cli import main
    from armor_modifier.onnx import OnnxCausalLM

    _, _, folder, model, _ = pruned
    assert main(["export-onnx", str(folder), str(tmp_path / "onnx")]) == 0
    got = OnnxCausalLM(tmp_path / "onnx").logits(sample_input())
    # observed max |diff| below 1e-5 on both architectures (float32 kernels differ in order)
    assert abs(got - _logits(model).numpy()).max() < 1e-3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_armor_gptq_keeps_the_mask_and_reloads(arch, tmp_path):
    dense = save_tiny(arch, tmp_path / "dense")
    result = armor_modifier.prune(
        str(dense), tmp_path / "armor", tokenizer=build_tokenizer(),
        dataset=calibration_dataset(), quantize="w4a16-gptq", **SETTINGS,
    )  # fmt: skip
    config = json.loads((result.output / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "armor-ct"
    assert config["config_groups"], "no quantization scheme recorded"
    reloaded = AutoModelForCausalLM.from_pretrained(result.output).eval()
    expected = _logits(result.model)  # the save compressed the weights; a forward decompresses
    assert torch.equal(_logits(reloaded), expected)
    linears = armor_linears(result.model)
    assert sorted(linears) == sorted(target_names())
    for name, linear in linears.items():
        assert _is_2of4(linear.weight), name


def test_a_layer_the_replay_cannot_reproduce_stops_before_any_compression(tiny_llama_folder):
    """A decoder layer whose output depends on state its hooks do not see (here: how often it
    was called) is refused, its class named, before any Linear is compressed."""
    from tiny_llama import load_tiny_llama

    model = load_tiny_llama(tiny_llama_folder)
    layer = model.model.layers[0]
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}

    class CountingDecoderLayer(type(layer)):
        calls = 0

        def forward(self, *args, **kwargs):
            CountingDecoderLayer.calls += 1
            return super().forward(*args, **kwargs) + 0.01 * CountingDecoderLayer.calls

    layer.__class__ = CountingDecoderLayer
    with pytest.raises(Exception, match="CountingDecoderLayer gives a different output when"):
        armor_modifier.prune(
            model, None, tokenizer=build_tokenizer(), dataset=calibration_dataset(),
            propagate_within_layer=True, **SETTINGS,
        )  # fmt: skip
    assert not armor_linears(model)
    for name, param in model.named_parameters():
        assert torch.equal(param, dense[name]), name
