"""Run an exported folder with onnxruntime: logits, greedy generation, a torch-facing adapter.

With the key/value cache in the graph (``export.py``'s default) generation feeds one token per step
and the cache back; without it each step re-runs the whole sequence (quadratic in the length).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from armor_modifier.core.errors import ARMORValueError

from .export import INPUT_NAMES, ONNX_FILE

__all__ = ["OnnxCausalLM", "OnnxLogitsModule"]


class OnnxCausalLM:
    """An exported folder (``model.onnx`` + ``generation_config.json``) under onnxruntime.

    :param folder: what ``export_onnx`` wrote
    :param threads: onnxruntime intra-op threads (default: onnxruntime's choice)
    :param providers: onnxruntime execution providers (default: CPU)
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        import onnxruntime

        self.folder = Path(folder)
        path = self.folder / ONNX_FILE
        if not path.is_file():
            raise ARMORValueError(f"{self.folder} holds no {ONNX_FILE}; pass an export-onnx folder")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=providers or ["CPUExecutionProvider"]
        )
        self.past_names = [
            i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")
        ]
        self.cache_dims: tuple[int, int] = (0, 0)
        if self.past_names:
            shape = self.session.get_inputs()[len(INPUT_NAMES)].shape
            self.cache_dims = (int(shape[1]), int(shape[3]))
        generation = self.folder / "generation_config.json"
        settings = json.loads(generation.read_text()) if generation.is_file() else {}
        eos = settings.get("eos_token_id")
        self.eos_token_ids: set[int] = set(eos if isinstance(eos, list) else [eos] if eos else [])

    def _run(
        self, ids: np.ndarray, mask: np.ndarray, past: list[np.ndarray] | None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One session run: ``(logits, present)``; an empty cache when ``past`` is ``None``."""
        seen = mask.shape[1] - ids.shape[1]
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, seen:].astype(np.int64)
        feed = dict(zip(INPUT_NAMES, (ids, mask, positions), strict=True))
        if self.past_names:
            heads, dim = self.cache_dims
            empty = np.zeros((ids.shape[0], heads, 0, dim), dtype=np.float32)
            feed.update(zip(self.past_names, past or [empty] * len(self.past_names), strict=True))
        outputs = self.session.run(None, feed)
        return outputs[0], outputs[1:]

    def logits(
        self, input_ids: np.ndarray | torch.Tensor, attention_mask: Any = None
    ) -> np.ndarray:
        """``input_ids [batch, seq]`` (and ``attention_mask``, default all ones) -> fp32 logits
        ``[batch, seq, vocab]``; positions count the attended tokens, as transformers does."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        return self._run(ids, mask, None)[0]

    def generate(
        self, input_ids: np.ndarray | torch.Tensor, max_new_tokens: int, stop_at_eos: bool = True
    ) -> np.ndarray:
        """Greedy decoding of one prompt ``[1, seq]`` -> ``[1, seq + k]`` with ``k <=
        max_new_tokens`` (fewer when an end-of-sequence token is produced and ``stop_at_eos``)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ARMORValueError(f"generate takes one prompt [1, seq], got {ids.shape}")
        step, past = ids, None
        for _ in range(max_new_tokens):
            logits, present = self._run(step, np.ones_like(ids), past)
            token = int(logits[0, -1].argmax())
            ids = np.concatenate([ids, [[token]]], axis=1)
            if self.past_names:
                step, past = ids[:, -1:], present
            else:
                step = ids
            if stop_at_eos and token in self.eos_token_ids:
                break
        return ids


class OnnxLogitsModule(nn.Module):
    """A ``model(input_ids=...)`` -> ``.logits`` adapter, so code written for a transformers
    model (e.g. ``armor_harness.perplexity``) runs the ONNX graph."""

    def __init__(self, runner: OnnxCausalLM) -> None:
        super().__init__()
        self.runner = runner
        self._device_anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> SimpleNamespace:
        """``input_ids [batch, seq]`` -> ``SimpleNamespace(logits=[batch, seq, vocab])``."""
        mask = None if attention_mask is None else attention_mask.cpu().numpy()
        logits = self.runner.logits(input_ids.cpu().numpy(), mask)
        return SimpleNamespace(logits=torch.from_numpy(logits))
