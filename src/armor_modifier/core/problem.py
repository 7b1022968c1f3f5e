"""Input checks, NoWag normalisation, the calibration statistic and the wrapper block size.

Glossary (docs/algorithm.md, "Notation"): ``W [m, n]`` weight (``m`` outputs, ``n`` inputs),
``h [n]`` mean of ``x_j^2`` over calibration tokens, ``b`` wrapper block size, ``r [m]`` /
``c [n]`` the row and column norms of the normalisation, ``Wbar [m, n]`` the normalised weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ARMORTypeError, ARMORValueError

__all__ = [
    "NormalizedWeight",
    "check_weight",
    "sanitize_h",
    "normalize",
    "block_within_budget",
    "check_wrapper_block_size",
    "choose_wrapper_block_size",
    "wrapper_overhead",
]

NORM_EPS = 1e-5


@dataclass(frozen=True)
class NormalizedWeight:
    """``W = r[:, None] * Wbar * c[None, :]`` (all fp32).

    :ivar Wbar: ``[m, n]``
    :ivar r: ``[m]`` row norms (second)
    :ivar c: ``[n]`` column norms (first)
    """

    Wbar: torch.Tensor
    r: torch.Tensor
    c: torch.Tensor


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite, in one reduction where it is: a NaN or an infinity
    makes the sum non-finite, so a finite sum settles it; the entrywise check runs only when the
    sum is not finite (a bad entry, or finite entries whose sum overflowed)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_weight(
    weight: object, name: str = "weight", *, multiple_of_4: bool = True, purpose: str = "pruning"
) -> torch.Tensor:
    """Validate a Linear weight and return an fp32 copy (the caller's tensor is never modified).

    :param weight: ``[m, n]`` floating tensor, all finite (and ``4 | m``, ``4 | n``)
    :param name: how messages call it
    :param multiple_of_4: require both dimensions to be multiples of 4 (2:4 pruning does)
    :param purpose: what the caller is about to do, for the NaN/Inf message
    :return: ``[m, n]`` float32, a new tensor
    """
    if not isinstance(weight, torch.Tensor):
        raise ARMORTypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ARMORValueError(
            f"{name} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}; "
            "reshape convolution or fused weights to 2-D first"
        )
    if not weight.is_floating_point():
        raise ARMORTypeError(f"{name} must be a floating tensor, got dtype {weight.dtype}")
    m, n = weight.shape
    if multiple_of_4 and (m % 4 or n % 4):
        raise ARMORValueError(
            f"{name} has shape {m}x{n}; ARMOR 2:4 needs both dimensions to be multiples of 4. "
            "Leave this layer out with `ignore`."
        )
    w = weight.detach().to(torch.float32).clone()
    if not all_finite(w):
        bad = int((~torch.isfinite(w)).sum())
        raise ARMORValueError(f"{name} holds {bad} NaN/Inf entries; fix the model before {purpose}")
    return w


def sanitize_h(h: object, n: int) -> tuple[torch.Tensor, int]:
    """Return an fp32 copy of ``h`` with non-finite or non-positive entries replaced.

    Replaced entries get the mean of the valid ones (docs/algorithm.md, "Calibration
    statistics"); if none is valid, every entry becomes 1 (plain, unweighted Frobenius loss).

    :param h: ``[n]`` per-input-channel mean of ``x^2``
    :param n: the weight's ``in_features``
    :return: (``h [n]`` float32, number of entries replaced)
    """
    if not isinstance(h, torch.Tensor):
        raise ARMORTypeError(f"h must be a torch.Tensor, got {type(h).__name__}")
    if h.dim() != 1 or h.numel() != n:
        raise ARMORValueError(
            f"h must have shape [{n}] (one value per input column of the weight), "
            f"got {tuple(h.shape)}"
        )
    h = h.detach().to(torch.float32).clone()
    valid = torch.isfinite(h) & (h > 0)
    replaced = int((~valid).sum())
    if replaced:
        fill = h[valid].mean() if valid.any() else torch.tensor(1.0, device=h.device)
        h = torch.where(valid, h, fill)
    return h, replaced


def normalize(W: torch.Tensor) -> NormalizedWeight:
    """NoWag normalisation: columns first, then rows (docs/algorithm.md, "Normalisation and
    the proxy objective").

    :param W: ``[m, n]`` float32
    """
    c = W.norm(dim=0) + NORM_EPS
    W1 = W / c[None, :]
    r = W1.norm(dim=1) + NORM_EPS
    return NormalizedWeight(Wbar=W1 / r[:, None], r=r, c=c)


def check_wrapper_block_size(b: object) -> int:
    """``b`` when a weight can be asked for wrapper blocks of that size: an int, ``b >= 4`` and
    ``4 | b`` (a 2:4 group of four columns must not straddle two wrapper blocks).

    The one check of a requested block size (:class:`~.settings.SolverSettings` and
    :func:`choose_wrapper_block_size` call it).
    """
    if isinstance(b, bool) or not isinstance(b, int) or b < 4 or b % 4:
        lower = b - b % 4 if isinstance(b, int) and not isinstance(b, bool) and b > 4 else 0
        hint = f"try {lower}" if lower else "try 32 or 64"
        raise ARMORValueError(
            "wrapper_block_size must be a positive multiple of 4 (2:4 groups must not straddle "
            f"wrapper blocks), got {b!r}; {hint}, or leave it unset to follow "
            "max_wrapper_overhead"
        )
    return b


def choose_wrapper_block_size(
    m: int, n: int, requested: int | None, max_overhead: float | None = None
) -> int:
    """The wrapper block size of a ``[m, n]`` weight: the largest ``b <= requested`` with
    ``4 | b``, ``b | m`` and ``b | n``.

    With ``requested=None`` the request is the largest one whose wrappers stay within
    ``max_overhead`` of this weight (:func:`block_within_budget` of ``[(m, n)]``), so the result
    is the largest such ``b`` (``4`` when even that exceeds the budget). SmolLM2's 576-wide layers
    do not admit 128; this picks 96 (or 64 for 64, ...) instead of failing. ``4`` always
    qualifies once ``4 | m`` and ``4 | n``.

    The one chooser: :meth:`~.settings.SolverSettings.block_size_for` and
    :func:`block_within_budget` call it.

    :param requested: a positive multiple of 4 (:func:`check_wrapper_block_size`), or ``None``
    :param max_overhead: ``(m + n) b / (m n)`` allowed when ``requested`` is ``None``
    """
    if requested is None:
        if max_overhead is None:
            raise ARMORValueError("give a requested wrapper_block_size or a max_overhead")
        requested = block_within_budget([(m, n)], max_overhead)
    check_wrapper_block_size(requested)
    for b in range(min(requested, m, n) // 4 * 4, 3, -4):
        if m % b == 0 and n % b == 0:
            return b
    raise ARMORValueError(f"no wrapper block size divides {m}x{n}; both must be multiples of 4")


def block_within_budget(shapes: Sequence[tuple[int, int]], max_overhead: float) -> int:
    """The largest requested ``b`` (a multiple of 4) such that, each ``[m, n]`` of ``shapes``
    getting ``choose_wrapper_block_size(m, n, b)``, all wrappers together stay within
    ``max_overhead`` of all weights together; ``4`` when even that exceeds it.

    SmolLM2-135M's 210 decoder Linears at 0.10: 44, i.e. 36 for q/o and 32 for every other
    Linear, 9.46 % (docs/results.md#smollm2_wrapper_budget).
    """
    if not shapes:
        raise ARMORValueError("block_within_budget needs at least one [m, n] shape")
    dense = sum(m * n for m, n in shapes)
    best = 4
    for b in range(8, max(min(m, n) for m, n in shapes) + 1, 4):
        extra = sum((m + n) * choose_wrapper_block_size(m, n, b) for m, n in shapes)
        if extra > max_overhead * dense:
            break
        best = b
    return best


def wrapper_overhead(m: int, n: int, b: int) -> float:
    """Extra parameters of the two wrappers relative to the dense weight: ``(m + n) b / (m n)``."""
    return (m + n) * b / (m * n)
