"""Tiny ARMOR-pruned Llama models for the checkpoint and CUDA tests, built without ARMORModifier.

``armorize`` runs the real solver (:func:`armor_modifier.factorize`, a couple of iterations, random
``h``) on every Linear but ``lm_head``, writes the 2:4 core into ``weight`` and attaches the
wrappers: exactly the state the modifier leaves. ``quantize_rtn`` then runs llm-compressor's
``oneshot`` with a QuantizationModifier-only recipe, as a following stage of a real recipe would
(optionally with a first modifier that installs the armor-ct save hook, as ARMORModifier does).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaForCausalLM

from armor_modifier import factorize
from armor_modifier.format.hooks import install_save_hook
from armor_modifier.runtime import attach_wrappers
from tiny_llama import UNTIED, VOCAB, load_tiny_llama, save_tiny_llama

WRAPPER_BLOCK = 16


def tiny_llama(folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama with an untied ``lm_head`` (:data:`tiny_llama.UNTIED`: hidden 64,
    intermediate 128, vocab 128, transformers' default init), saved to ``folder`` without a
    tokenizer and reloaded from there (oneshot re-reads the config from ``name_or_path``)."""
    saved = save_tiny_llama(folder, seed, dtype, tokenizer=False, **UNTIED)
    return load_tiny_llama(saved, dtype)


def armorize(model: nn.Module, num_iterations: int = 2, seed: int = 0) -> list[str]:
    """Factorise every Linear except ``lm_head`` in place; returns the wrapped module names."""
    generator = torch.Generator().manual_seed(seed)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.endswith("lm_head"):
            continue
        h = torch.rand(module.in_features, generator=generator) + 0.1
        factors = factorize(
            module.weight.detach(),
            h,
            wrapper_block_size=WRAPPER_BLOCK,
            num_iterations=num_iterations,
            seed=seed,
            objective="proxy",
        )
        with torch.no_grad():
            module.weight.copy_(factors.core.to(module.weight.dtype))
        attach_wrappers(module, factors.A, factors.B)
        names.append(name)
    return names


def quantize_rtn(
    model: nn.Module,
    scheme: str | dict,
    output_dir: Path | None = None,
    install_hook_in_recipe: bool = False,
) -> None:
    """llm-compressor RTN quantization of every Linear but ``lm_head`` (keeps 2:4 zeros).

    :param scheme: a preset name (``"FP8_DYNAMIC"``, ``"W8A8"``) or ``config_groups``
    :param install_hook_in_recipe: put a modifier first in the recipe that calls
        ``install_save_hook`` from ``on_initialize``, as ARMORModifier does
    """
    from llmcompressor import oneshot
    from llmcompressor.modifiers import Modifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    class InstallArmorSaveHook(Modifier):
        def on_initialize(self, state, **kwargs) -> bool:
            install_save_hook(state.model)
            return True

    ignore = ["re:.*lm_head"]
    if isinstance(scheme, str):
        recipe = [QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore)]
    else:
        recipe = [QuantizationModifier(config_groups=scheme, ignore=ignore)]
    if install_hook_in_recipe:
        recipe.insert(0, InstallArmorSaveHook())
    kwargs = {} if output_dir is None else {"output_dir": str(output_dir)}
    oneshot(model=model, recipe=recipe, **kwargs)


def input_ids(seed: int = 0) -> torch.Tensor:
    """``[2, 16]`` token ids."""
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids.to(model.device)).logits.float().cpu()


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (same venv and import path); raise with its output if it
    fails."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        timeout=300,
    )
    if result.returncode:
        raise AssertionError(
            f"subprocess failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result
