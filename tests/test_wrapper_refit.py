"""refit_wrappers against the layer's output error computed from the inputs ``X`` directly, and
its first ``A`` update against a per-block least-squares solve on ``X`` (torch.linalg.lstsq)."""

from __future__ import annotations

import pytest
import torch

from armor_modifier.core import ARMORValueError, left_blockdiag, right_blockdiag, top2_of_4_mask
from armor_modifier.core.wrapper_refit import refit_wrappers

B_SIZE = 8


def _problem(m: int = 32, n: int = 48, seed: int = 0, N: int = 512):
    """ARMOR-like wrappers ``A [m/b, b, b]``, ``B [n/b, b, b]``, a 2:4 core ``S``, a coarse
    quantization ``Q`` of it (same zeros), inputs ``X [N, n]`` and ``H`` of ``z = B x``."""
    g = torch.Generator().manual_seed(seed)
    b = B_SIZE
    A = torch.eye(b) + 0.3 * torch.randn(m // b, b, b, generator=g, dtype=torch.float64)
    B = torch.eye(b) + 0.3 * torch.randn(n // b, b, b, generator=g, dtype=torch.float64)
    energy = torch.logspace(-1, 1, n, dtype=torch.float64)
    mix = torch.eye(n) + torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    X = (torch.randn(N, n, generator=g, dtype=torch.float64) * energy) @ mix
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    S = W * top2_of_4_mask(W.abs())
    scale = S.abs().amax(1, keepdim=True) / 3  # a 3-bit-like grid per row: large rounding errors
    Q = torch.round(S / scale) * scale
    Z = right_blockdiag(X, B.transpose(1, 2))  # rows z = B x
    return A, B, S, Q, X, Z.T @ Z / N


def _output_error(A, core, B, X, target) -> float:
    """``||X (A core B)^T - target||^2 / ||target||^2``."""
    Y = X @ right_blockdiag(left_blockdiag(A, core), B).T
    return float((Y - target).square().sum() / target.square().sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_are_the_output_errors_and_never_rise(seed):
    A, B, S, Q, X, H = _problem(seed=seed)
    target = X @ right_blockdiag(left_blockdiag(A, S), B).T
    result = refit_wrappers(A, B, S, Q, H, 4, ridge=0.0)
    before = _output_error(A, Q, B, X, target)
    after = _output_error(result.A, Q, result.B, X, target)
    # observed: equal to 2e-14 relative at most (float64); the loss is the output error itself
    assert result.loss_before == pytest.approx(before, rel=1e-9)
    assert result.loss_after == pytest.approx(after, rel=1e-9)
    # observed after/before 0.059-0.072 on these problems (per-row grids: the row gains that
    # rounding gets wrong are what A undoes best)
    assert after < 0.2 * before
    # the new B is block-diagonal with the old blocks: A' Q (R B), R [q, b, b]
    assert result.B.shape == B.shape and result.A.shape == A.shape


def test_the_first_A_update_is_the_blockwise_least_squares_solution():
    """One pass = exact ``A`` update, then one B step that cannot raise the loss: the result is
    at least as good as ``A_I = argmin ||A_I (Q B X^T)_I - (A S B X^T)_I||`` solved on ``X``."""
    A, B, S, Q, X, H = _problem(seed=3)
    target = X @ right_blockdiag(left_blockdiag(A, S), B).T  # [N, m]
    P = X @ right_blockdiag(Q, B).T  # [N, m]: the quantized core's outputs before A
    blocks = []
    for i in range(A.shape[0]):
        rows = slice(i * B_SIZE, (i + 1) * B_SIZE)
        solution = torch.linalg.lstsq(P[:, rows], target[:, rows]).solution  # [b, b] = A_I^T
        blocks.append(solution.T)
    brute = _output_error(torch.stack(blocks), Q, B, X, target)
    result = refit_wrappers(A, B, S, Q, H, 1, ridge=0.0)
    # observed: 0.0058 against the least-squares 0.0107 (the B step adds the difference)
    assert result.loss_after <= brute * (1 + 1e-9)


def test_no_pass_changes_nothing_and_the_dtypes_are_kept():
    A, B, S, Q, _, H = _problem()
    result = refit_wrappers(A.float(), B.float(), S, Q, H, 0)
    assert torch.equal(result.A, A.float()) and torch.equal(result.B, B.float())
    assert result.loss_after == result.loss_before


def test_bad_shapes_and_negative_passes_are_refused():
    A, B, S, Q, _, H = _problem()
    with pytest.raises(ARMORValueError, match="iterations=-1"):
        refit_wrappers(A, B, S, Q, H, -1)
    with pytest.raises(ARMORValueError, match="shapes do not fit"):
        refit_wrappers(A, B, S, Q[:, :16], H, 1)
    with pytest.raises(ARMORValueError, match="wrappers must be"):
        refit_wrappers(A[0], B, S, Q, H, 1)
