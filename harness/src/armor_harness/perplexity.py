"""Perplexity over non-overlapping fixed-length windows, as in the SparseGPT and Wanda papers.

With ``ids`` the whole text tokenized once (``[n]`` tokens, no special tokens) and ``L`` the
window length, the ``N = n // L`` windows are ``ids[k L : (k + 1) L]`` (the tail is dropped). Each
window's loss is the mean next-token NLL over its positions ``1 .. L-1`` (labels shifted by one),

    nll_k = -1/(L-1) * sum_{t=1}^{L-1} log p(x_t | x_0 .. x_{t-1}),

and, as in the papers' code, ``ppl = exp(sum_k nll_k * L / (N * L)) = exp(mean_k nll_k)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from armor_modifier.calibration import tokenize_text
from armor_modifier.core.errors import ARMORValueError


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    :param ppl: the perplexity, ``exp(nll)``.
    :param num_windows: windows evaluated.
    :param seq_len: tokens per window (including the BOS token with ``add_bos``).
    :param nll: mean over windows of the per-window mean token NLL, in nats (``log(ppl)``).
    :param seconds: wall time of the forward passes.
    """

    ppl: float
    num_windows: int
    seq_len: int
    nll: float
    seconds: float


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _token_ids(tokenizer: Any, text_or_ids: str | torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``[n]`` int64 ids of a text (tokenized once, no special tokens) or of given ids."""
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise ARMORValueError(
                "A tokenizer is needed to evaluate a text; pass it, or token ids."
            )
        return tokenize_text(tokenizer, text_or_ids)
    return torch.as_tensor(text_or_ids, dtype=torch.long).reshape(-1)


def _bos_id(model: torch.nn.Module, tokenizer: Any) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    if bos is None:
        raise ARMORValueError(
            "add_bos=True but neither the tokenizer nor model.config has a bos_token_id; "
            "use add_bos=False."
        )
    return int(bos)


def make_windows(
    ids: torch.Tensor, seq_len: int, max_windows: int | None = None, bos_id: int | None = None
) -> torch.Tensor:
    """Cut token ids into non-overlapping windows (the tail that does not fill one is dropped).

    :param ids: ``[n]`` int64 token ids.
    :param seq_len: tokens per window, including the BOS token when ``bos_id`` is given.
    :param max_windows: keep only the first this many windows; ``None`` keeps all.
    :param bos_id: if given, each window is ``[bos_id] + seq_len - 1`` text tokens.
    :return: ``[N, seq_len]`` int64 windows.
    """
    width = seq_len - 1 if bos_id is not None else seq_len
    if width < 1 or seq_len < 2:
        raise ARMORValueError(f"seq_len={seq_len} is too small: a window needs at least 2 tokens.")
    count = ids.numel() // width
    if count == 0:
        raise ARMORValueError(
            f"Text too short: one window needs {width} text tokens (seq_len={seq_len}"
            f"{', minus the BOS token' if bos_id is not None else ''}) but the text has "
            f"{ids.numel()}; use a longer text or a smaller seq_len."
        )
    if max_windows is not None:
        if max_windows < 1:
            raise ARMORValueError(
                f"max_windows={max_windows} must be at least 1 (or None for all)."
            )
        count = min(count, max_windows)
    windows = ids[: count * width].reshape(count, width)
    if bos_id is not None:
        windows = torch.cat([torch.full((count, 1), bos_id, dtype=torch.long), windows], dim=1)
    return windows


def window_nll(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Per-window mean next-token NLL, computed in fp32.

    :param model: a causal LM returning ``.logits`` of shape ``[B, L, vocab]``.
    :param windows: ``[B, L]`` int64 token ids on the model's device.
    :return: ``[B]`` fp32 mean NLL over positions ``1 .. L-1`` of each window.
    """
    logits = model(input_ids=windows).logits[:, :-1, :].float()
    labels = windows[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return nll.mean(dim=1)


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text_or_ids: str | torch.Tensor | Sequence[int],
    *,
    seq_len: int = 512,
    max_windows: int | None = None,
    add_bos: bool = False,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on a text, over non-overlapping windows of ``seq_len`` tokens.

    The protocol of the SparseGPT/Wanda evaluation code (see the module docstring): the text is
    tokenized once without special tokens, cut into ``n // seq_len`` windows, and
    ``ppl = exp(mean over windows of the window's mean next-token NLL)``. With ``add_bos`` each
    window is the BOS token followed by ``seq_len - 1`` text tokens (so ``n // (seq_len - 1)``
    windows); the loss still covers positions ``1 .. seq_len-1``, i.e. every text token of the
    window, the first one predicted from BOS alone.

    :param model: a causal LM (``model(input_ids=...).logits``), evaluated on the device of its
        parameters; it is put in eval mode for the call and restored afterwards.
    :param tokenizer: the model's tokenizer; may be ``None`` when ``text_or_ids`` are token ids
        and ``add_bos`` is false.
    :param text_or_ids: the text, or its ``[n]`` token ids.
    :param seq_len: tokens per window; at most ``model.config.max_position_embeddings``.
    :param max_windows: evaluate only the first this many windows; ``None`` evaluates all.
    :param add_bos: prepend the BOS token to every window.
    :param batch_size: windows per forward pass (all windows have the same length: no padding).
    :param progress: show a tqdm progress bar.
    :return: the :class:`PerplexityResult`.
    """
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and seq_len > max_positions:
        raise ARMORValueError(
            f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_positions}; "
            f"use seq_len <= {max_positions}."
        )
    if batch_size < 1:
        raise ARMORValueError(f"batch_size={batch_size} must be at least 1.")
    bos_id = _bos_id(model, tokenizer) if add_bos else None
    windows = make_windows(_token_ids(tokenizer, text_or_ids), seq_len, max_windows, bos_id)

    device = _model_device(model)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nlls: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for batch in tqdm(
                windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress
            ):
                nlls.append(window_nll(model, batch.to(device)).double().cpu())
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start

    num_windows = windows.shape[0]
    total_nll = torch.cat(nlls).mul(seq_len).sum().item()
    nll = total_nll / (num_windows * seq_len)
    return PerplexityResult(
        ppl=math.exp(nll), num_windows=num_windows, seq_len=seq_len, nll=nll, seconds=seconds
    )
