"""The memory check before calibration (``armor_modifier.modifier.memory``): the statistics it
counts are the bytes :class:`InputStatistics` allocates, the units follow the calibration mode, and
a need above what is available stops ``oneshot`` before any Linear is touched."""

from __future__ import annotations

import pytest
import torch

from armor_modifier.core.errors import ARMORError, ARMORMemoryError
from armor_modifier.modifier import memory
from armor_modifier.modifier.memory import memory_needs, solve_bytes, statistics_bytes
from armor_modifier.modifier.stats import InputStatistics
from tiny_llama import armor, load_tiny_llama, run_oneshot, target_names

SHAPES = {
    "model.layers.0.self_attn.q_proj": (64, 64),
    "model.layers.0.mlp.down_proj": (64, 176),
    "model.layers.1.self_attn.q_proj": (64, 64),
    "model.layers.1.mlp.up_proj": (176, 64),
    "lm_head": (96, 64),
}


@pytest.mark.parametrize("with_gram", [False, True])
def test_statistics_bytes_are_what_input_statistics_allocates(with_gram):
    for n in (4, 64, 176):
        stats = InputStatistics.empty(n, torch.device("cpu"), with_gram)
        allocated = sum(t.numel() * t.element_size() for t in stats.tensors())
        assert statistics_bytes(n, with_gram) == allocated


def test_sequential_units_are_decoder_layers_and_dense_is_one():
    needs = memory_needs(SHAPES, with_hessian=True, calibration="sequential")
    assert [(need.unit, need.linears) for need in needs] == [
        ("model.layers.0", 2), ("model.layers.1", 2), ("lm_head", 1)
    ]
    layer0 = needs[0]
    assert layer0.statistics == statistics_bytes(64, True) + statistics_bytes(176, True)
    assert (layer0.largest, layer0.shape) == ("model.layers.0.mlp.down_proj", (64, 176))
    assert layer0.solve == solve_bytes(64, 176, True) > solve_bytes(64, 64, True)
    (dense,) = memory_needs(SHAPES, with_hessian=False, calibration="dense")
    assert (dense.unit, dense.linears) == ("every target", 5)
    assert dense.statistics == sum(statistics_bytes(n, False) for _, n in SHAPES.values())


@pytest.mark.integration
@pytest.mark.parametrize("calibration", ["sequential", "dense"])
def test_oneshot_stops_before_any_work_when_the_statistics_do_not_fit(
    tiny_llama_folder, monkeypatch, calibration
):
    seen = []

    def tiny_device(device):
        seen.append(device)
        return 1000  # bytes: less than one Linear's statistics

    monkeypatch.setattr(memory, "available_bytes", tiny_device)
    modifier = armor(num_iterations=1, calibration=calibration, ignore=["re:.*lm_head"])
    with pytest.raises(ARMORMemoryError, match="GiB is available") as error:
        run_oneshot(tiny_llama_folder, [modifier])
    assert isinstance(error.value, ARMORError) and isinstance(error.value, MemoryError)
    message = str(error.value)
    if calibration == "sequential":
        assert "for model.layers." in message and "objective='proxy'" in message
    else:
        assert "for every target" in message and "calibration='sequential'" in message
    assert seen and seen[0].type == "cpu"
    assert modifier.compressed_modules == [] and modifier.results == {}


def test_enough_memory_passes_and_unknown_memory_is_not_checked(tiny_llama_folder):
    model = load_tiny_llama(tiny_llama_folder)
    names = {dict(model.named_modules())[name]: name for name in target_names()}
    settings = armor().solver_settings
    memory.check_memory(names, settings, "dense", available=lambda _device: 2**40)
    memory.check_memory(names, settings, "dense", available=lambda _device: None)
    with pytest.raises(ARMORMemoryError):
        memory.check_memory(names, settings, "dense", available=lambda _device: 1)


def test_captures_count_once_per_decoder_layer_unit():
    needs = memory_needs(SHAPES, with_hessian=True, calibration="sequential", captures=1000)
    assert [need.captures for need in needs] == [1000, 1000, 0]  # lm_head: in no decoder layer
    assert needs[0].total == needs[0].statistics + needs[0].solve + 1000
    (dense,) = memory_needs(SHAPES, with_hessian=True, calibration="dense", captures=1000)
    assert dense.captures == 0


def test_capture_bytes_are_what_a_layer_capture_holds(tiny_llama_folder, monkeypatch):
    """Brute force: the bytes of the hidden-state inputs and dense outputs the capture handed
    over for each decoder layer, during a oneshot with reconstruction on."""
    from types import SimpleNamespace

    from armor_modifier.modifier.capture import LayerCapture
    from tiny_llama import calibration_dataset

    held: list[int] = []
    pop = LayerCapture.pop

    def measuring(self, layer):
        capture = pop(self, layer)
        tensors = [*capture.inputs(), *capture.outputs]
        held.append(sum(t.numel() * t.element_size() for t in tensors))
        return capture

    monkeypatch.setattr(LayerCapture, "pop", measuring)
    modifier = armor(num_iterations=1, ignore=["re:.*lm_head"], reconstruction_steps=1)
    run_oneshot(tiny_llama_folder, [modifier])
    calib = SimpleNamespace(dataset=calibration_dataset())
    expected = memory.capture_bytes(load_tiny_llama(tiny_llama_folder), calib)
    assert held and all(size == expected for size in held)
    assert memory.capture_bytes(load_tiny_llama(tiny_llama_folder), object()) == 0  # unknown


def test_captures_that_do_not_fit_stop_with_their_size_named(tiny_llama_folder):
    model = load_tiny_llama(tiny_llama_folder)
    names = {dict(model.named_modules())[name]: name for name in target_names()}
    settings = armor().solver_settings
    shapes = {name: (m.out_features, m.in_features) for m, name in names.items()}
    without = max(need.total for need in memory_needs(shapes, True, "sequential"))
    memory.check_memory(names, settings, "sequential", available=lambda _device: without)
    with pytest.raises(ARMORMemoryError, match=r"captured activations \(0\.50 GiB; fewer"):
        memory.check_memory(names, settings, "sequential", available=lambda _device: without,
                            captures=2**29)  # fmt: skip


def test_every_layer_at_once_is_one_unit_holding_every_layers_captures():
    (unit,) = memory_needs(SHAPES, True, "sequential", captures=1000, at_once=True)
    assert (unit.unit, unit.linears) == ("every target", 5)
    assert unit.captures == 2000  # two decoder layers; lm_head captures nothing
    assert unit.statistics == sum(statistics_bytes(n, True) for _, n in SHAPES.values())


@pytest.mark.integration
def test_basic_pipeline_counts_every_layer_at_once(tiny_llama_folder, monkeypatch):
    """Memory for one decoder layer at a time (statistics, solve and captures, reconstruction at
    its default) lets the sequential pipeline run, and stops the basic pipeline, which calibrates
    every layer before compressing any, before any Linear is touched."""
    from types import SimpleNamespace

    from tiny_llama import calibration_dataset

    model = load_tiny_llama(tiny_llama_folder)
    modules = dict(model.named_modules())
    shapes = {name: tuple(modules[name].weight.shape) for name in target_names()}
    held = memory.capture_bytes(model, SimpleNamespace(dataset=calibration_dataset()))
    one_layer = max(need.total for need in memory_needs(shapes, True, "sequential", held))
    monkeypatch.setattr(memory, "available_bytes", lambda _device: one_layer)
    fields = {"num_iterations": 1, "ignore": ["re:.*lm_head"], "reconstruction_steps": None}
    basic = armor(**fields)
    with pytest.raises(ARMORMemoryError, match="pipeline='basic' calibrates every layer") as error:
        run_oneshot(tiny_llama_folder, [basic], pipeline="basic")
    assert "for every target" in str(error.value) and "captured activations" in str(error.value)
    assert basic.compressed_modules == [] and basic.results == {}
    sequential = armor(**fields)
    run_oneshot(tiny_llama_folder, [sequential])
    assert len(sequential.compressed_modules) == len(shapes)
