"""A GGUF model turned once into a plain checkpoint folder and loaded from there.

transformers dequantizes GGUF on load but refuses to ``save_pretrained`` such a model, so the
weights are copied into a plain model of the same config and saved (fp32, with the tokenizer)
under ``$ARMOR_CACHE`` (default ``~/.cache/armor_modifier``); later loads take seconds, and
llm-compressor's ``oneshot`` can re-read the folder from disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from armor_modifier.calibration import LoadedModel, load_model
from armor_modifier.core.errors import ARMORValueError


def cache_root() -> Path:
    """``$ARMOR_CACHE``, default ``~/.cache/armor_modifier``."""
    return Path(os.environ.get("ARMOR_CACHE") or Path.home() / ".cache" / "armor_modifier")


def is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds ``config.json`` and safetensors weights."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def write_plain_checkpoint(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` and save it, with its tokenizer, as a plain fp32 checkpoint.

    Written to a staging folder and swapped in whole (``staged_replace``), so an interrupted run
    leaves no partial cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from armor_modifier.staging import staged_replace

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    del gguf_model
    with staged_replace(folder) as stage:  # atomic; leftovers of a killed run are cleaned
        plain.save_pretrained(stage)
        tokenizer.save_pretrained(stage)


def load_cached(
    folder: Path, gguf: Callable[[], Path], dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load the plain checkpoint in ``folder``, first writing it from ``gguf()`` if missing.

    :raises ARMORValueError: ``folder`` exists, is not empty and holds no checkpoint
    """
    if not is_checkpoint(folder):
        if folder.exists() and any(folder.iterdir()):
            raise ARMORValueError(
                f"Cache folder {folder} exists but holds no checkpoint (config.json + "
                "*.safetensors); delete it or pass another cache_dir."
            )
        if folder.exists():
            folder.rmdir()
        write_plain_checkpoint(gguf(), folder)
    return load_model(str(folder), dtype=dtype)
