"""``ARMORQuantizer``: ARMOR 2:4 pruning behind optimum's ``OptimumQuantizer`` interface.

::

    from armor_modifier.integrations.optimum_quantizer import ARMORQuantizer

    quantizer = ARMORQuantizer.from_pretrained("./my-llama")        # folder, hub id or model
    quantizer.quantize("out/my-llama-armor", calibration_dataset="wikivital",
                       num_samples=128, seq_len=2048, wrapper_block_size=32)

``quantize`` runs exactly ``armor prune`` (the same parser defaults, recipe building, oneshot run
and staged armor-ct save of ``cli_prune.run_prune``): the same arguments and seed give the same
checkpoint. ARMOR and decoder-layer options are the ``ARMORModifier`` / ``armor prune`` field names
as keywords; ``recipe`` is an llm-compressor YAML file instead of them. Needs the ``[optimum]``
extra; without it the class raises an ``ImportError`` naming the extra.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from armor_modifier.core.errors import ARMORTypeError, ARMORValueError

try:
    from optimum.quantization_base import OptimumQuantizer
except ImportError:  # the [optimum] extra is not installed: the class below says so when used
    OptimumQuantizer = None

__all__ = ["ARMORQuantizer", "OPTIMUM_EXTRA"]

OPTIMUM_EXTRA = "pip install 'armor-modifier[optimum]'"
#: ``armor prune`` options that ``quantize`` takes as its own parameters, not as ``**fields``
_OWN = ("model", "output", "overwrite", "dataset", "num_samples", "seq_len", "seed", "recipe")


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

    def _load(self, name: str) -> Any:
        """``armor prune``'s loader, or the given model with its tokenizer."""
        if self.model is None:
            from armor_modifier.cli import _load

            return _load(name)
        tokenizer = self.tokenizer
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        return self.model, tokenizer, self.name_or_path

    def prune_arguments(
        self,
        save_dir: str | os.PathLike,
        *,
        calibration_dataset: str = "wikivital",
        num_samples: int = 16,
        seq_len: int = 512,
        seed: int = 0,
        recipe: str | os.PathLike | None = None,
        overwrite: bool = False,
        **fields: Any,
    ) -> argparse.Namespace:
        """The ``armor prune`` arguments ``quantize`` runs with (parsed by the CLI's parser)."""
        from armor_modifier.cli import build_parser

        if not isinstance(calibration_dataset, str | os.PathLike):
            raise ARMORTypeError(
                f"calibration_dataset must name a text ('wikivital', 'ptb', a text file or "
                f"'hf:NAME[:CONFIG]'), got {type(calibration_dataset).__name__}"
            )
        if recipe is not None and not isinstance(recipe, str | os.PathLike):
            raise ARMORTypeError(
                f"recipe must be a YAML file path, got {type(recipe).__name__}; pass modifier "
                "settings as keyword arguments instead"
            )
        name = self.name_or_path or "model"
        argv = ["prune", str(name), "--output", os.fspath(save_dir)]
        argv += ["--dataset", os.fspath(calibration_dataset), "--seed", str(seed)]
        argv += ["--num-samples", str(num_samples), "--seq-len", str(seq_len)]
        if recipe is not None:
            argv += ["--recipe", os.fspath(recipe)]
        if overwrite:
            argv.append("--overwrite")
        args = build_parser().parse_args(argv)
        known = sorted(set(vars(args)) - {"command", "threads", *_OWN})
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ARMORValueError(f"unknown ARMOR settings {unknown}; the settings are {known}")
        for key, value in fields.items():
            setattr(args, key, value)
        return args

    def quantize(
        self, save_dir: str | os.PathLike, file_prefix: str | None = None, **kwargs: Any
    ) -> Path:
        """Prune with ARMOR 2:4 (+ the chosen quantization) and write armor-ct to ``save_dir``.

        :param save_dir: output folder (staged and swapped in; must be empty unless
            ``overwrite=True``)
        :param file_prefix: optimum's interface; armor-ct uses transformers' file names, so only
            ``None`` is accepted
        :param kwargs: :meth:`prune_arguments`: ``calibration_dataset``, ``num_samples``,
            ``seq_len``, ``seed``, ``recipe``, ``overwrite`` and ``ARMORModifier`` fields
        :return: ``save_dir`` as an absolute path
        """
        from armor_modifier.cli_prune import run_prune
        from armor_modifier.format.staging import resolve_target

        if file_prefix is not None:
            raise ARMORValueError(
                f"file_prefix={file_prefix!r}: armor-ct uses transformers' file names; leave it out"
            )
        args = self.prune_arguments(save_dir, **kwargs)
        target = Path(args.output)
        if target.is_dir() and any(target.iterdir()) and not args.overwrite:
            raise ARMORValueError(
                f"output folder {target} exists and is not empty; pass overwrite=True to replace it"
            )
        run_prune(args, self._load)
        return resolve_target(target)
