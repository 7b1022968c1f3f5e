"""The YAML recipes in ``recipes/`` and ARMOR's composition with round-to-nearest quantization.

Each recipe is parsed from its file (with ``num_iterations`` lowered for speed) and run by
``oneshot`` on the tiny Llama. After quantization the fake-quantized core must still be exactly
2:4, and the activation quantizer and observers must see ``B x`` (ARMOR's input pre-hook runs
before the quantized forward and before the observer hooks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.utils.helpers import DisableQuantization

import armor_modifier.modifier  # noqa: F401  (registers ARMORModifier for YAML recipes)
from armor_modifier.core import count_broken_groups
from armor_modifier.runtime import ARMOR_A, ARMOR_B, apply_input_wrapper, apply_output_wrapper
from tiny_llama import (
    armor,
    calibration_dataset,
    run_oneshot,
    target_names,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FP8_E4M3_MAX = 448.0


@pytest.fixture(scope="module")
def folder(tiny_llama_folder) -> Path:
    return tiny_llama_folder


def load_recipe(name: str, num_iterations: int = 2) -> tuple[str, dict]:
    """The recipe file's YAML with ARMOR's ``num_iterations`` and ``groups_per_tile`` lowered,
    and its parsed dict."""
    recipe = yaml.safe_load((RECIPES / name).read_text())
    settings = recipe["armor_stage"]["pruning_modifiers"]["ARMORModifier"]
    assert settings["ignore"] == ["re:.*lm_head"]
    settings["num_iterations"] = num_iterations
    settings["groups_per_tile"] = 1  # test speed; see tiny_llama.armor
    return yaml.safe_dump(recipe, sort_keys=False), recipe


def quantized_weight(linear: torch.nn.Linear) -> torch.Tensor:
    """The weight the quantized forward multiplies with (fake-quantized core)."""
    scheme = linear.quantization_scheme
    return forward_quantize(linear, linear.weight.data, "weight", scheme.weights)


@pytest.mark.integration
@pytest.mark.parametrize(
    "name, quantized",
    [
        ("armor_2of4.yaml", False),
        ("armor_2of4_fp8_dynamic.yaml", True),
        ("armor_2of4_w8a8_int8.yaml", True),
        ("armor_2of4_w4a16_rtn.yaml", True),
        ("armor_2of4_w4a16_gptq.yaml", True),
        ("armor_2of4_w8a8_gptq.yaml", True),
        ("armor_2of4_reconstruct.yaml", False),
    ],
)
def test_recipe_runs_and_keeps_2of4(folder, name, quantized):
    text, parsed = load_recipe(name)
    if quantized:
        (quantization,) = parsed["armor_stage"]["quantization_modifiers"].values()
        assert quantization["ignore"] == ["re:.*lm_head"]
    model = run_oneshot(folder, text)
    modules = dict(model.named_modules())
    for target in target_names():
        linear = modules[target]
        core = linear.weight.data
        assert count_broken_groups(core) == 0, target
        if quantized:
            q = quantized_weight(linear)
            assert count_broken_groups(q) == 0, target
            assert torch.equal(q[core == 0], torch.zeros_like(q[core == 0])), target
    assert getattr(model.lm_head, "quantization_scheme", None) is None
    assert not hasattr(model.lm_head, ARMOR_A)


@pytest.mark.integration
def test_dynamic_activation_quantizer_sees_wrapped_input(folder):
    """W8A8: the module computes ``A (Q(B x) Q(core)^T)``, not ``A (B Q(x) ...)``."""
    text, _ = load_recipe("armor_2of4_w8a8_int8.yaml")
    model = run_oneshot(folder, text)
    linear = model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 5, linear.in_features, generator=torch.Generator().manual_seed(0)) * 3
    scheme = linear.quantization_scheme
    A, B = getattr(linear, ARMOR_A), getattr(linear, ARMOR_B)
    with torch.no_grad():
        got = linear(x)
        wq = quantized_weight(linear)
        right = apply_output_wrapper(
            forward_quantize(linear, apply_input_wrapper(x, B), "input", scheme.input_activations)
            @ wq.T,
            A,
        )
        wrong = apply_output_wrapper(
            apply_input_wrapper(forward_quantize(linear, x, "input", scheme.input_activations), B)
            @ wq.T,
            A,
        )
    # observed max |got - right| = 0 (same operations in the same order)
    torch.testing.assert_close(got, right, rtol=0, atol=1e-6)
    # observed max |got - wrong| 0.26 on outputs up to 26: the order is detectable
    assert float((got - wrong).abs().max()) > 1e-2


@pytest.mark.integration
def test_static_observer_sees_wrapped_input(folder):
    """FP8 static per-tensor activations: ``input_scale = max |B x| / 448`` over calibration."""
    recipe = [
        armor(ignore=["re:.*lm_head"], num_iterations=2, wrapper_block_size=32),
        QuantizationModifier(targets="Linear", scheme="FP8", ignore=["re:.*lm_head"]),
    ]
    model = run_oneshot(folder, recipe)
    modules = dict(model.named_modules())
    wrapped_max = dict.fromkeys(target_names(), 0.0)
    raw_max = dict.fromkeys(target_names(), 0.0)
    handles = []
    for name in target_names():

        def after(_m, args, name=name):  # registered after ARMOR's pre-hook: sees B x
            wrapped_max[name] = max(wrapped_max[name], float(args[0].abs().max()))

        def before(_m, args, name=name):
            raw_max[name] = max(raw_max[name], float(args[0].abs().max()))

        handles.append(modules[name].register_forward_pre_hook(after))
        handles.append(modules[name].register_forward_pre_hook(before, prepend=True))
    ids = torch.tensor(calibration_dataset()["input_ids"])
    with torch.no_grad(), DisableQuantization(model):
        for row in ids:
            model(row[None])
    for handle in handles:
        handle.remove()
    for name in target_names():
        scale = float(modules[name].input_scale)
        # observed relative difference <= 2.3e-7 (fp32 rounding of the scale)
        assert scale == pytest.approx(wrapped_max[name] / FP8_E4M3_MAX, rel=1e-5), name
    for name in target_names():
        raw_scale = raw_max[name] / FP8_E4M3_MAX
        # B mixes and rescales channels: the observed scale is 1.4x .. 14x the raw input's one
        assert float(modules[name].input_scale) != pytest.approx(raw_scale, rel=0.1), name


@pytest.mark.integration
def test_shared_pass_with_static_observers_is_refused(folder):
    recipe = [
        armor(ignore=["re:.*lm_head"], num_iterations=0, wrapper_block_size=32),
        QuantizationModifier(targets="Linear", scheme="FP8", ignore=["re:.*lm_head"]),
    ]
    with pytest.raises(ValueError, match="static input-activation.*pipeline='independent'"):
        run_oneshot(folder, recipe, pipeline="sequential")


@pytest.mark.integration
def test_shared_pass_with_dynamic_activations_keeps_2of4(folder):
    recipe = [
        armor(ignore=["re:.*lm_head"], num_iterations=1, wrapper_block_size=32),
        QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["re:.*lm_head"]),
    ]
    model = run_oneshot(folder, recipe, pipeline="sequential")
    modules = dict(model.named_modules())
    for target in target_names():
        assert hasattr(modules[target], ARMOR_A), target
        assert count_broken_groups(quantized_weight(modules[target])) == 0, target
