"""An unset ``reconstruction_steps`` (the default): 20 steps of decoder-layer reconstruction where
the run can replay decoder layers, the per-Linear result with one warning where it cannot
(``modifier/layer_defaults.py``); a number given still stops with an error there."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from loguru import logger
from torch import nn

from armor_modifier.core import ARMORValueError, is_2_of_4
from armor_modifier.core.reconstruct import DEFAULT_STEPS
from armor_modifier.modifier.capture import UNSET_STEPS_OFF
from armor_modifier.runtime import armor_linears
from tiny_llama import (
    LAYERS,
    UNTIED,
    armor,
    calibration_dataset,
    run_oneshot,
    sample_input,
    save_tiny_llama,
    target_names,
)

UNSET = {"reconstruction_steps": None}


def _armor(**fields):
    return armor(**{
        "targets": ["Linear"], "ignore": ["re:.*lm_head"], "wrapper_block_size": 16,
        "num_iterations": 2, "objective": "output", **fields,
    })  # fmt: skip


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(sample_input()).logits


@contextmanager
def _warnings() -> Iterator[list[str]]:
    """The warnings that an unset ``reconstruction_steps`` turned reconstruction off."""
    lines: list[str] = []

    def note(message) -> None:
        if UNSET_STEPS_OFF in str(message):
            lines.append(str(message))

    handle = logger.add(note, level="WARNING")
    try:
        yield lines
    finally:
        logger.remove(handle)


def _per_linear_twin(folder: Path, unset, given, dataset) -> None:
    """``unset`` ran per Linear: no layer reconstructed, 0 recorded, logits equal to a run
    with ``reconstruction_steps=0`` given (``given``) bit for bit."""
    model = run_oneshot(folder, [unset], dataset=dataset)
    reference = run_oneshot(folder, [given], dataset=dataset)
    assert unset.reconstructions == []
    assert unset.settings()["reconstruction_steps"] == 0
    assert torch.equal(_logits(model), _logits(reference))


def test_unset_steps_reconstruct_every_layer_as_the_default_number_given(tiny_llama_folder):
    unset, given = _armor(**UNSET), _armor(reconstruction_steps=DEFAULT_STEPS)
    with _warnings() as lines:
        model = run_oneshot(tiny_llama_folder, [unset])  # 8 windows: one held out at 0.125
    reference = run_oneshot(tiny_llama_folder, [given])
    assert lines == []
    assert [r.layer for r in unset.reconstructions] == [f"model.layers.{i}" for i in range(LAYERS)]
    assert all(r.result.steps_run == DEFAULT_STEPS for r in unset.reconstructions)
    errors = [(r.result.initial_error, r.result.final_error) for r in unset.reconstructions]
    assert errors == [(r.result.initial_error, r.result.final_error) for r in given.reconstructions]
    assert torch.equal(_logits(model), _logits(reference))
    assert unset.settings()["reconstruction_steps"] == DEFAULT_STEPS
    for name, linear in armor_linears(model).items():
        assert is_2_of_4(linear.weight != 0), name


def test_unset_steps_with_too_few_windows_warn_and_run_per_linear(tiny_llama_folder):
    few = calibration_dataset(4)  # the default guard fraction 0.125 needs 8
    with _warnings() as lines:
        _per_linear_twin(tiny_llama_folder, _armor(**UNSET), _armor(), few)
    assert len(lines) == 1 and "4 calibration batches leave no guard window" in lines[0]
    assert "set reconstruction_steps=0" in lines[0]
    with pytest.raises(ARMORValueError, match="at least 8 calibration samples"):
        run_oneshot(tiny_llama_folder, [_armor(reconstruction_steps=DEFAULT_STEPS)], dataset=few)


def test_unset_steps_on_dense_statistics_warn_and_run_per_linear(tiny_llama_folder):
    dense = {**UNSET, "calibration": "dense"}
    with _warnings() as lines:
        _per_linear_twin(tiny_llama_folder, _armor(**dense), _armor(calibration="dense"), None)
    assert len(lines) == 1 and "calibration='dense'" in lines[0]
    with pytest.raises(ValueError, match="calibration='sequential'"):  # pydantic's, at creation
        _armor(reconstruction_steps=DEFAULT_STEPS, calibration="dense")


def test_unset_steps_with_a_target_outside_every_layer_warn_and_run_per_linear(tmp_path):
    folder = save_tiny_llama(tmp_path / "untied", **UNTIED)
    with _warnings() as lines:
        _per_linear_twin(folder, _armor(ignore=[], **UNSET), _armor(ignore=[]), None)
    assert len(lines) == 1 and "targets ['lm_head'] lie in no decoder layer" in lines[0]
    with pytest.raises(ARMORValueError, match="lm_head is in no decoder layer"):
        run_oneshot(folder, [_armor(ignore=[], reconstruction_steps=DEFAULT_STEPS)])


def test_unset_steps_with_a_layer_the_replay_cannot_reproduce_warn_and_run_per_linear(
    tiny_llama_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay check of the first calibration batch turns the default off (its class named)
    instead of stopping; every target is still compressed, per Linear, exactly 2:4."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    original = LlamaDecoderLayer.forward
    calls = [0]

    def counting(self, hidden_states, *args, **kwargs):
        calls[0] += 1
        return original(self, hidden_states, *args, **kwargs) + 1e-3 * calls[0]

    monkeypatch.setattr(LlamaDecoderLayer, "forward", counting)
    unset = _armor(**UNSET)
    with _warnings() as lines:
        model = run_oneshot(tiny_llama_folder, [unset])
    assert len(lines) == 1 and "LlamaDecoderLayer gives a different output" in lines[0]
    assert unset.reconstructions == []
    assert unset.settings()["reconstruction_steps"] == 0
    assert sorted(unset.compressed_modules) == sorted(target_names())
    for name, linear in armor_linears(model).items():
        assert is_2_of_4(linear.weight != 0), name
    with pytest.raises(ARMORValueError, match="LlamaDecoderLayer gives a different output"):
        run_oneshot(tiny_llama_folder, [_armor(reconstruction_steps=DEFAULT_STEPS)])
