"""``ARMORQuantizer``: ARMOR 2:4 pruning behind optimum's ``OptimumQuantizer`` interface.

::

    from armor_modifier.integrations.optimum_quantizer import ARMORQuantizer

    quantizer = ARMORQuantizer.from_pretrained("./my-llama")        # folder, hub id or model
    quantizer.quantize("out/my-llama-armor", calibration_dataset="wikivital",
                       num_samples=128, seq_len=2048, wrapper_block_size=32)

``quantize`` is :func:`armor_modifier.prune` (which ``armor prune`` also calls): the same
arguments and seed give the same checkpoint. ARMOR and decoder-layer settings are the
``ARMORModifier`` field names as keywords; ``recipe`` is an llm-compressor YAML file instead of
them. Needs the ``[optimum]`` extra; without it the class raises an ``ImportError`` naming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from armor_modifier.core.errors import ARMORTypeError, ARMORValueError
from armor_modifier.staging import resolve_target

try:
    from optimum.quantization_base import OptimumQuantizer
except ImportError:  # the [optimum] extra is not installed: the class below says so when used
    OptimumQuantizer = None

__all__ = ["ARMORQuantizer", "OPTIMUM_EXTRA"]

OPTIMUM_EXTRA = "pip install 'armor-modifier[optimum]'"


def _require_optimum() -> None:
    if OptimumQuantizer is None:
        raise ImportError(f"ARMORQuantizer needs Hugging Face optimum: {OPTIMUM_EXTRA}")


class ARMORQuantizer(OptimumQuantizer or object):  # type: ignore[misc]
    """Prune a causal LM with ARMOR 2:4 and save armor-ct, the optimum way.

    :param model: a loaded transformers causal LM (saved on disk: oneshot re-reads its config
        from ``name_or_path``), or ``None`` with ``name_or_path`` a folder, hub id or ``'smollm2'``
    :param tokenizer: the model's tokenizer (default: loaded from ``name_or_path``)
    :param name_or_path: where the model comes from
    """

    def __init__(
        self, model: Any = None, tokenizer: Any = None, name_or_path: str | None = None
    ) -> None:
        _require_optimum()
        if model is None and name_or_path is None:
            raise ARMORValueError("ARMORQuantizer needs a model or a name_or_path")
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path or getattr(model, "name_or_path", None)

    @classmethod
    def from_pretrained(
        cls, model_or_path: Any, file_name: str | None = None, tokenizer: Any = None
    ) -> ARMORQuantizer:
        """A quantizer for a model folder, hub id, ``'smollm2'`` or a loaded model.

        :param file_name: optimum's interface; a checkpoint folder has no single file, so only
            ``None`` is accepted
        """
        _require_optimum()
        if file_name is not None:
            raise ARMORValueError(
                f"file_name={file_name!r}: ARMORQuantizer loads whole checkpoint folders; "
                "pass the folder as model_or_path and leave file_name out"
            )
        if isinstance(model_or_path, str | os.PathLike):
            return cls(None, tokenizer, os.fspath(model_or_path))
        if not hasattr(model_or_path, "config"):
            raise ARMORTypeError(
                f"model_or_path must be a folder, hub id or transformers model, got "
                f"{type(model_or_path).__name__}"
            )
        return cls(model_or_path, tokenizer)

    def quantize(
        self,
        save_dir: str | os.PathLike,
        file_prefix: str | None = None,
        *,
        calibration_dataset: Any = "wikivital",
        **kwargs: Any,
    ) -> Path:
        """Prune with ARMOR 2:4 (+ the chosen quantization) and write armor-ct to ``save_dir``:
        :func:`armor_modifier.prune` of this model.

        :param save_dir: output folder (staged and swapped in; must be empty unless
            ``overwrite=True``)
        :param file_prefix: optimum's interface; armor-ct uses transformers' file names, so only
            ``None`` is accepted
        :param calibration_dataset: ``prune``'s ``dataset``: a text name or file, or a tokenized
            dataset
        :param kwargs: the rest of ``prune``'s keywords (``num_samples``, ``seq_len``, ``seed``,
            ``recipe``, ``quantize``, ``overwrite``, ``ARMORModifier`` fields)
        :return: ``save_dir`` as an absolute path
        """
        from armor_modifier.pruning import prune

        if file_prefix is not None:
            raise ARMORValueError(
                f"file_prefix={file_prefix!r}: armor-ct uses transformers' file names; leave it out"
            )
        model = self.model if self.model is not None else self.name_or_path
        result = prune(
            model, save_dir, tokenizer=self.tokenizer, dataset=calibration_dataset, **kwargs
        )
        return Path(result.output) if result.output is not None else resolve_target(save_dir)
