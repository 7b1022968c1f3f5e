"""Block-diagonal products, 2:4 masks and the 6-support step against brute-force references."""

import itertools

import pytest
import torch

from armor_modifier.core import (
    SolverSettings,
    check_wrapper_block_size,
    choose_wrapper_block_size,
    count_broken_groups,
    dense_blockdiag,
    is_2_of_4,
    left_blockdiag,
    right_blockdiag,
    top2_of_4_mask,
    wrapper_overhead,
)
from armor_modifier.core.blockdiag import right_blockdiag_no_grad
from armor_modifier.core.discrete import best_two_of_four


@pytest.mark.parametrize("k,b,c", [(1, 4, 3), (3, 4, 5), (2, 8, 16), (5, 12, 1)])
def test_left_blockdiag_matches_dense(k, b, c):
    g = torch.Generator().manual_seed(k * 100 + b)
    blocks = torch.randn(k, b, b, generator=g, dtype=torch.float64)
    x = torch.randn(k * b, c, generator=g, dtype=torch.float64)
    # float64 defaults (rtol 1e-7, atol 1e-7); observed max |diff| 1.3e-15
    torch.testing.assert_close(left_blockdiag(blocks, x), dense_blockdiag(blocks) @ x)


@pytest.mark.parametrize("k,b,r", [(1, 4, 3), (3, 4, 5), (2, 8, 16), (5, 12, 1)])
def test_right_blockdiag_matches_dense(k, b, r):
    g = torch.Generator().manual_seed(k * 10 + b)
    blocks = torch.randn(k, b, b, generator=g, dtype=torch.float64)
    x = torch.randn(r, k * b, generator=g, dtype=torch.float64)
    # float64 defaults (rtol 1e-7, atol 1e-7); observed max |diff| 1.8e-15
    torch.testing.assert_close(right_blockdiag(x, blocks), x @ dense_blockdiag(blocks))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,b,r", [(1, 4, 3), (3, 4, 5), (2, 8, 16), (5, 12, 1), (4, 32, 64)])
def test_right_blockdiag_no_grad_gives_right_blockdiags_values(k, b, r, dtype):
    """The solver's variant writes through a transposed view: the same products, bit for bit."""
    g = torch.Generator().manual_seed(k * 10 + b)
    blocks = torch.randn(k, b, b, generator=g, dtype=dtype)
    x = torch.randn(r, k * b, generator=g, dtype=dtype)
    assert torch.equal(right_blockdiag_no_grad(x, blocks), right_blockdiag(x, blocks))
    strided = torch.randn(k * b, r, generator=g, dtype=dtype).T  # a transposed view
    assert torch.equal(right_blockdiag_no_grad(strided, blocks), right_blockdiag(strided, blocks))


def test_top2_of_4_mask_is_the_exhaustive_best_support():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(6, 16, generator=g)
    mask = top2_of_4_mask(score)
    assert is_2_of_4(mask)
    for row, grp in itertools.product(range(6), range(4)):
        s = score[row, 4 * grp : 4 * grp + 4]
        best = max(itertools.combinations(range(4), 2), key=lambda P: s[list(P)].sum())
        assert mask[row, 4 * grp : 4 * grp + 4].nonzero().flatten().tolist() == list(best)


def test_count_broken_groups():
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert count_broken_groups(w) == 1
    assert not is_2_of_4(w != 0)


@pytest.mark.parametrize(
    "m,n,requested,expected",
    [
        (1536, 576, 128, 96),
        (576, 576, 64, 64),
        (192, 576, 128, 96),
        (4096, 4096, 128, 128),
        (8, 12, 128, 4),
        (16, 16, 16, 16),
    ],
)
def test_choose_wrapper_block_size(m, n, requested, expected):
    b = choose_wrapper_block_size(m, n, requested)
    assert b == expected and m % b == 0 and n % b == 0 and b % 4 == 0


def test_choose_wrapper_block_size_against_brute_force():
    """Every shape up to 96x96 and every request up to 100: the largest multiple of 4 no larger
    than the request that divides both dimensions."""
    for m, n, requested in itertools.product(range(4, 97, 4), range(4, 97, 4), range(4, 101, 4)):
        fitting = [b for b in range(4, requested + 1, 4) if m % b == 0 and n % b == 0]
        assert choose_wrapper_block_size(m, n, requested) == max(fitting), (m, n, requested)


@pytest.mark.parametrize("bad", [0, -4, 6, 2, 1.5, True, "8"])
def test_a_bad_block_size_is_refused_with_one_message(bad):
    """``SolverSettings`` and ``choose_wrapper_block_size`` refuse a bad request with
    ``check_wrapper_block_size``'s message."""
    with pytest.raises(ValueError, match="positive multiple of 4") as checked:
        check_wrapper_block_size(bad)
    for refuse in (
        lambda: SolverSettings(wrapper_block_size=bad),
        lambda: choose_wrapper_block_size(64, 64, bad),
    ):
        with pytest.raises(ValueError) as other:
            refuse()
        assert str(other.value) == str(checked.value)


def test_a_good_block_size_passes_and_a_request_or_budget_is_needed():
    assert check_wrapper_block_size(8) == 8
    with pytest.raises(ValueError, match="requested wrapper_block_size or a max_overhead"):
        choose_wrapper_block_size(64, 64, None)


def test_wrapper_overhead_formula():
    expected = (1536 + 576) * 96 / (1536 * 576)
    assert wrapper_overhead(1536, 576, 96) == pytest.approx(expected)  # observed equal


def _brute_force_group(R, a, Bt):
    """Best support and least-squares values for one group by dense lstsq over each support.

    Tile loss: ||R + a s^T Bt||_F^2, R [b, b], a [b], Bt [4, b] (already h-weighted).
    """
    best = (float("inf"), None, None)
    for P in itertools.combinations(range(4), 2):
        design = torch.stack([torch.outer(a, Bt[c]).flatten() for c in P], dim=1)  # [b*b, 2]
        sol = torch.linalg.lstsq(design, -R.flatten()[:, None]).solution.flatten()
        loss = float((R.flatten() + design @ sol).square().sum())
        if loss < best[0]:
            best = (loss, P, sol)
    return best


def test_best_two_of_four_matches_brute_force_support_search():
    g = torch.Generator().manual_seed(1)
    T, b = 12, 8
    R = torch.randn(T, b, b, generator=g, dtype=torch.float64)
    a = torch.randn(T, b, generator=g, dtype=torch.float64)
    Bt = torch.randn(T, 4, b, generator=g, dtype=torch.float64)
    gvec = torch.bmm(Bt, torch.bmm(R.transpose(1, 2), a[:, :, None])).squeeze(-1)
    G4 = torch.bmm(Bt, Bt.transpose(1, 2))
    zeros = torch.zeros(T, 4, dtype=torch.float64)
    old_mask = torch.zeros(T, 4, dtype=torch.bool)
    old_mask[:, :2] = True
    upd = best_two_of_four(gvec, G4, a.square().sum(-1), zeros, old_mask)
    assert upd.fallbacks == 0
    for t in range(T):
        loss, P, sol = _brute_force_group(R[t], a[t], Bt[t])
        assert upd.mask[t].nonzero().flatten().tolist() == list(P)
        mine = R[t] + torch.outer(a[t], upd.values[t] @ Bt[t])
        # float64; the 1e-6 relative damping shifts values slightly: observed relative loss gap
        # 6.3e-13 ...
        assert float(mine.square().sum()) == pytest.approx(loss, rel=1e-5)
        # ... and observed max |value diff| 1.1e-6 on values up to 0.43
        torch.testing.assert_close(upd.values[t][list(P)], sol, rtol=1e-4, atol=1e-6)


def test_best_two_of_four_keeps_better_old_values_and_survives_degenerate_groups():
    T = 3
    g = torch.zeros(T, 4)
    G4 = torch.zeros(T, 4, 4)  # all-zero right factor rows: every 2x2 system is singular
    aa = torch.tensor([1.0, 0.0, 2.0])
    old = torch.tensor([[1.0, 2.0, 0.0, 0.0]] * T)
    old_mask = old != 0
    upd = best_two_of_four(g, G4, aa, old, old_mask)
    assert upd.fallbacks == T
    assert not upd.changed.any()
    torch.testing.assert_close(upd.values, old)  # observed equal: the old values are kept
    assert torch.equal(upd.mask, old_mask)
    assert torch.isfinite(upd.values).all()


@pytest.mark.parametrize(
    "m, n", [(576, 576), (192, 576), (1536, 576), (576, 1536), (64, 64), (8, 12)]
)
@pytest.mark.parametrize("budget", [0.01, 0.05, 0.1, 0.15, 0.5])
def test_largest_block_within_budget_against_brute_force(m, n, budget):
    fitting = [
        b for b in range(4, min(m, n) + 1, 4)
        if m % b == 0 and n % b == 0 and wrapper_overhead(m, n, b) <= budget
    ]  # fmt: skip
    expected = max(fitting) if fitting else 4  # nothing fits: the smallest wrapper
    assert choose_wrapper_block_size(m, n, None, max_overhead=budget) == expected
    settings = SolverSettings(max_wrapper_overhead=budget)
    assert settings.block_size_for(m, n) == expected
    # an explicit wrapper_block_size wins over the budget
    assert (
        SolverSettings(max_wrapper_overhead=budget, wrapper_block_size=4).block_size_for(m, n) == 4
    )


def test_smollm2_block_sizes_at_the_default_budget():
    settings = SolverSettings()
    sizes = {
        shape: settings.block_size_for(*shape)
        for shape in [(576, 576), (192, 576), (1536, 576), (576, 1536)]
    }
    assert sizes == {(576, 576): 24, (192, 576): 12, (1536, 576): 32, (576, 1536): 32}


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    """U^T U = (H + lambda I)^-1 against a float64 inverse, U upper triangular with a positive
    diagonal, and only H's lower triangle is read."""
    from armor_modifier.core.sparsegpt import inverse_hessian_factor

    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 96, generator=g) * torch.logspace(-1, 1, 96)
    H = X.T @ X / 300
    U, damping, increases = inverse_hessian_factor(H, 0.01)
    reference = torch.linalg.inv(H.double() + damping * torch.eye(96, dtype=torch.float64))
    assert increases == 0 and torch.equal(U, U.triu()) and bool((U.diagonal() > 0).all())
    # observed 9e-8 relative
    assert float((U.double().T @ U.double() - reference).norm() / reference.norm()) < 1e-5
    garbage = H.tril() + torch.full_like(H, 7.0).triu(1)
    torch.testing.assert_close(inverse_hessian_factor(garbage, 0.01)[0], U, rtol=0, atol=0)


@pytest.mark.parametrize("n", [5, 256, 300, 700])
def test_lower_triangular_inverse_matches_the_triangular_solve(n):
    """The blocked inverse (halves down to TRIANGULAR_LEAF, uneven splits at 300 and 700) against
    a float64 solve with the identity; lower triangular, the upper triangle of L unread."""
    from armor_modifier.core.linalg import lower_triangular_inverse

    g = torch.Generator().manual_seed(n)
    X = torch.randn(2 * n, n, generator=g) * torch.logspace(-1, 1, n)
    L = torch.linalg.cholesky(X.T @ X / (2 * n) + 0.01 * torch.eye(n))
    reference = torch.linalg.solve_triangular(
        L.double(), torch.eye(n, dtype=torch.float64), upper=False
    )
    inverse = lower_triangular_inverse(L + torch.full_like(L, 3.0).triu(1))
    assert inverse.dtype == L.dtype and torch.equal(inverse, inverse.tril())
    # observed at most 9.2e-8 of the largest entry (n = 300; a float32 solve: 9.6e-8)
    assert float((inverse.double() - reference).abs().max() / reference.abs().max()) < 1e-5


def test_the_starts_n_by_n_passes_equal_the_dense_formulas_bit_for_bit():
    """Damping on the diagonal in place, the output ridge without a diagonal matrix and the
    symmetrisation by ``* 0.5`` give exactly ``H + lambda I``'s factor, ``H + diag(r)`` and
    ``(H + H^T) / 2`` (the formulas they replaced)."""
    from armor_modifier.core.linalg import lower_triangular_inverse
    from armor_modifier.core.scoring import damped, output_ridge
    from armor_modifier.core.sparsegpt import check_hessian, inverse_hessian_factor

    g = torch.Generator().manual_seed(1)
    X = torch.randn(400, 300, generator=g) * torch.logspace(-1, 1, 300)
    H = X.T @ X / 400
    U, damping, _ = inverse_hessian_factor(H, 0.01)
    L, _ = torch.linalg.cholesky_ex((H + damping * torch.eye(300)).flip(0, 1).T)
    assert torch.equal(U, lower_triangular_inverse(L).flip(0, 1))
    for kind in ("identity", "diagonal"):
        assert torch.equal(damped(H, 0.1, kind, 0.0), H + torch.diag(output_ridge(H, 0.1, kind)))
    skewed = H + 1e-3 * torch.randn(300, 300, generator=g)
    assert torch.equal(check_hessian(skewed, 300), (skewed + skewed.T) / 2)
    assert not torch.equal(check_hessian(skewed, 300), skewed)  # so the comparison can fail


def test_all_finite_settles_by_the_sum_and_checks_entries_when_it_overflows():
    from armor_modifier.core.problem import all_finite

    x = torch.randn(64, 64)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[3, 5] = bad
        assert not all_finite(y)
    both = x.clone()
    both[0, 0], both[1, 1] = float("inf"), -float("inf")  # the sum is NaN, not an infinity
    assert not all_finite(both)
    huge = torch.full((8, 8), 3e38)  # every entry finite, the float32 sum overflows
    assert not bool(torch.isfinite(huge.sum())) and all_finite(huge)
