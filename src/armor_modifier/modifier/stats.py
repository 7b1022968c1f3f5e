"""The calibration statistic ``h`` for :class:`~armor_modifier.modifier.ARMORModifier`.

``h [n]`` is the mean over calibration tokens of ``x_j^2`` at a Linear's input; the output
objective also needs the layer Hessian ``H = X^T X / N`` (docs/algorithm.md, "Calibration
statistics"). Both are kept as running float64 sums and an int64 token count, so ranks can
all-reduce them and divide once (the mean of the union, independent of how tokens were split).

Why float64 sums: the solver's discrete decisions flip on last-bit changes of ``h`` and ``H``,
and float32 sums depend on the order in which ranks add their terms. Each batch's terms are
formed once, the same way whichever rank sees the batch (``x_j^2`` exactly in float64; the
batch's ``x^T x`` as a float32 matrix product, a deterministic function of the batch), and
float64 sums of them differ between orders far below float32's rounding step, so
:meth:`InputStatistics.mean` and :meth:`InputStatistics.hessian`, rounded once to float32, are
the same whatever the order (``tests/test_distributed.py``: bit for bit). The batch products
are float32 because float64 ones cost twice as much and made the calibration forwards the
slower part of ARMOR's overhead on Qwen2.5-Coder-0.5B (docs/results.md, Qwen side by side).
Cost: ``8 n^2`` bytes per ``X^T X``; for inputs of at least :data:`GRAM_BLOCKED_WIDTH` only the
lower triangle's ``GRAM_BLOCKS (GRAM_BLOCKS + 1) / 2`` column blocks are formed (about a third
less work than the whole ``X^T X`` at width 4864: docs/results.md, layer scaling);
:meth:`InputStatistics.hessian` mirrors the lower triangle.

:func:`collect_dense_statistics` runs one forward pass of the unpruned model over the calibration
set, outside llm-compressor's pipelines, for ``calibration="dense"`` (the paper's statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import torch
from compressed_tensors.offload import get_execution_device
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.pytorch.utils.helpers import tensors_to_device
from llmcompressor.utils.helpers import DisableQuantization, calibration_forward_context
from loguru import logger
from torch import nn
from tqdm import tqdm

__all__ = ["ACCUMULATOR_DTYPE", "InputStatistics", "collect_dense_statistics"]

#: dtype of the running sums (see the module docstring: order-independent after rounding)
ACCUMULATOR_DTYPE = torch.float64

#: input width from which ``X^T X`` accumulates only its lower triangle, in column blocks
GRAM_BLOCKED_WIDTH = 2048
#: column blocks of that lower triangle
GRAM_BLOCKS = 4


@dataclass
class InputStatistics:
    """Running ``sum_t x_tj^2``, token count and, optionally, ``sum_t x_t x_t^T`` for one Linear.

    :ivar sums: ``[n]`` float64, on the module's execution device
    :ivar count: ``[]`` int64 number of tokens seen
    :ivar gram: ``[n, n]`` float64 ``X^T X`` when the layer Hessian is needed (``objective=
        "output"`` or ``init="sparsegpt"``), else ``None``
    """

    sums: torch.Tensor
    count: torch.Tensor
    gram: torch.Tensor | None = None

    @classmethod
    def empty(cls, n: int, device: torch.device, with_gram: bool = False) -> InputStatistics:
        return cls(
            sums=torch.zeros(n, dtype=ACCUMULATOR_DTYPE, device=device),
            count=torch.zeros((), dtype=torch.int64, device=device),
            gram=torch.zeros(n, n, dtype=ACCUMULATOR_DTYPE, device=device) if with_gram else None,
        )

    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs ``x [..., n]`` (any float dtype, taken as float32) into the sums'
        dtype (float64): ``x_j^2`` exactly, ``x^T x`` as one float32 product per call."""
        flat = x.detach().reshape(-1, x.shape[-1]).to(self.sums.device, torch.float32)
        self.sums += flat.to(self.sums.dtype).square().sum(dim=0)
        self.count += flat.shape[0]
        if self.gram is not None:
            _add_lower_gram(self.gram, flat)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors to all-reduce (sum), in a fixed order."""
        return [self.sums, self.count] + ([self.gram] if self.gram is not None else [])

    @property
    def num_tokens(self) -> int:
        return int(self.count)

    def mean(self) -> torch.Tensor:
        """``h [n]`` float32 (divided in float64, rounded once); all zeros if no token was seen
        (the solver then sanitises it)."""
        return (self.sums / self.count.clamp(min=1)).to(torch.float32)

    def hessian(self) -> torch.Tensor | None:
        """``H = X^T X / N`` ``[n, n]`` float32 (divided in float64, rounded once), or ``None``
        when not collected."""
        if self.gram is None:
            return None
        H = (self.gram / self.count.clamp(min=1)).to(torch.float32)
        # the lower triangle is the sum kept: mirror it in float32, in place (no float64 copy
        # beyond the division's, as before the blocked sums)
        lower = H.tril(-1)
        return H.tril_().add_(lower.T)


def _add_lower_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """``gram += x^T x`` on (at least) the lower triangle of ``gram [n, n]``, ``x [N, n]``, the
    product in ``x``'s dtype and the sum in ``gram``'s: whole below :data:`GRAM_BLOCKED_WIDTH`,
    else only the blocks on and below the diagonal of a :data:`GRAM_BLOCKS` x
    :data:`GRAM_BLOCKS` split (the entries above are left as they are)."""
    n = x.shape[1]
    if n < GRAM_BLOCKED_WIDTH:
        gram += x.T @ x
        return
    edges = [round(i * n / GRAM_BLOCKS) for i in range(GRAM_BLOCKS + 1)]
    for i in range(GRAM_BLOCKS):
        rows = slice(edges[i], edges[i + 1])
        for j in range(i + 1):
            cols = slice(edges[j], edges[j + 1])
            gram[rows, cols] += x[:, rows].T @ x[:, cols]


def collect_dense_statistics(
    hooks: HooksMixin,
    model: nn.Module,
    dataloader: Iterable[dict],
    modules: Mapping[nn.Linear, str],
    stats: dict[nn.Linear, InputStatistics],
    with_gram: bool = False,
) -> int:
    """Run the calibration set once through the unpruned ``model``, filling ``stats``.

    Only the hooks registered here fire (every other modifier's hooks are disabled, quantization
    is disabled), so the statistics are those of the dense model regardless of the pipeline.

    :param hooks: the modifier that owns the temporary hooks
    :param model: the model, not yet pruned by this modifier
    :param dataloader: llm-compressor's calibration dataloader (dicts of tensors)
    :param modules: target Linear -> name
    :param stats: filled in place: one :class:`InputStatistics` per target Linear
    :param with_gram: also accumulate ``X^T X`` (for the layer Hessian)
    :return: the number of batches seen
    """
    handles = set()
    for module in modules:
        stat = InputStatistics.empty(module.in_features, get_execution_device(module), with_gram)
        stats[module] = stat
        handles.add(hooks.register_hook(module, _adder(stat), "forward"))
    device = get_execution_device(model)
    num_batches = 0
    try:
        with (
            calibration_forward_context(model),
            DisableQuantization(model),
            HooksMixin.disable_hooks(keep=handles),
        ):
            for batch in tqdm(dataloader, desc="ARMOR dense statistics"):
                model(**cast(dict, tensors_to_device(batch, device)))
                num_batches += 1
    finally:
        hooks.remove_hooks(handles)
    logger.info(f"ARMOR dense statistics: {num_batches} batches through the unpruned model")
    return num_batches


def _adder(stat: InputStatistics) -> Callable[..., None]:
    """A forward hook ``(module, args, output)`` adding the module's input to ``stat``."""

    def hook(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
        stat.add(args[0])

    return hook
