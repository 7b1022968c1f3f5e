"""Drift correction (``correct_drift=True``): fit the dense model's outputs from pruned inputs.

The target ``W*`` is checked against the objective it stands for (brute force on random inputs);
the modifier's cross statistic ``X_p^T X_d / N`` against paired forward passes of the dense model
and of the pruned model's earlier layers.
"""

from __future__ import annotations

import pytest
import torch

from armor_modifier.core import drift_corrected_target, factorize, output_ridge
from armor_modifier.core.output import output_loss
from armor_modifier.modifier import ARMORModifier
from tiny_llama import (
    armor,
    calibration_dataset,
    load_tiny_llama,
    run_oneshot,
    save_tiny_llama,
    target_names,
)


def _inputs(n: int = 16, N: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    Xd = torch.randn(N, n, generator=g, dtype=torch.float64)
    Xp = Xd + 0.3 * torch.randn(N, n, generator=g, dtype=torch.float64)
    return Xp, Xd


def _drift_objective(W, Xp, Xd, D, W_hat) -> float:
    """``(1/N) ||W_hat Xp^T - W Xd^T||^2 + tr((W_hat - W) diag(D) (W_hat - W)^T)``, fp64."""
    fit = (W_hat @ Xp.T - W @ Xd.T).square().sum() / Xp.shape[0]
    return float(fit + ((W_hat - W).square() * D).sum())


@pytest.mark.parametrize("kind", ["identity", "diagonal"])
def test_target_turns_the_drift_objective_into_the_output_objective(kind):
    Xp, Xd = _inputs()
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 16, generator=g, dtype=torch.float64)
    H, C = Xp.T @ Xp / len(Xp), Xp.T @ Xd / len(Xp)
    D = output_ridge(H, 0.1, kind)
    W_star = drift_corrected_target(W, H, C, D).double()
    # the objective minus tr((W_hat - W*)(H + D)(W_hat - W*)^T) is the same for any W_hat
    gaps = []
    for _ in range(3):
        W_hat = torch.randn(8, 16, generator=g, dtype=torch.float64)
        E = W_hat - W_star
        quad = float(torch.trace(E @ (H + torch.diag(D)) @ E.T))
        gaps.append(_drift_objective(W, Xp, Xd, D, W_hat) - quad)
    # observed 3.8e-7 (identity) / 6.5e-7 (diagonal) relative: W* is computed in fp32
    assert max(gaps) - min(gaps) < 1e-4 * abs(gaps[0])
    # and W* is its unconstrained minimiser: lower than W and than small perturbations of W*
    best = _drift_objective(W, Xp, Xd, D, W_star)
    assert best < _drift_objective(W, Xp, Xd, D, W)
    for _ in range(3):
        nudged = W_star + 1e-2 * torch.randn(8, 16, generator=g, dtype=torch.float64)
        assert best < _drift_objective(W, Xp, Xd, D, nudged)


def test_no_drift_gives_the_weight_back():
    Xp, _ = _inputs()
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    H = (Xp.T @ Xp / len(Xp)).float()
    W_star = drift_corrected_target(W, H, H, output_ridge(H, 0.1, "identity"))
    torch.testing.assert_close(W_star, W, rtol=0, atol=1e-5)  # observed 3.6e-7


def test_factorizing_the_target_never_ends_worse_than_sparsegpt_on_it():
    Xp, Xd = _inputs(n=32, N=400)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    H, C = (Xp.T @ Xp / len(Xp)).float(), (Xp.T @ Xd / len(Xp)).float()
    D = output_ridge(H, 0.1, "identity")
    W_star = drift_corrected_target(W, H, C, D)
    f = factorize(W_star, None, objective="output", H=H, output_damping=0.1,
                  wrapper_block_size=8, num_iterations=5)
    assert f.final_loss <= f.initial_loss
    Hd = H + torch.diag(D)
    assert f.final_loss == pytest.approx(output_loss(W_star, Hd, f.dense()), rel=1e-4)  # obs 9e-8


def test_target_rejects_bad_shapes_and_non_finite():
    W, H = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match=r"cross must be \[8, 8\]"):
        drift_corrected_target(W, H, torch.eye(4), torch.zeros(8))
    bad = torch.eye(8)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="H has non-finite"):
        drift_corrected_target(W, bad, torch.eye(8), torch.zeros(8))


@pytest.mark.parametrize(
    "fields",
    [{"objective": "proxy"}, {"calibration": "dense"}],
)
def test_drift_correction_needs_sequential_output(fields):
    with pytest.raises(ValueError, match="correct_drift=True .* needs objective='output'"):
        ARMORModifier(correct_drift=True, **fields)


def _paired_cross(pruned, dense, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force ``(X_p^T X_p / N, X_p^T X_d / N)`` for Linear ``name``: its inputs in
    ``pruned`` and in ``dense`` on the same calibration tokens, fp64."""
    seen = {}
    handles = []
    for key, model in (("p", pruned), ("d", dense)):
        module = dict(model.named_modules())[name]

        def hook(_m, args, key=key):
            seen.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

        handles.append(module.register_forward_pre_hook(hook, prepend=True))
    ids = torch.tensor(calibration_dataset()["input_ids"])
    with torch.no_grad():
        for row in ids:
            pruned(row[None])
            dense(row[None])
    for handle in handles:
        handle.remove()
    Xp, Xd = torch.cat(seen["p"]).double(), torch.cat(seen["d"]).double()
    return (Xp.T @ Xp / len(Xp)).float(), (Xp.T @ Xd / len(Xp)).float()


@pytest.mark.integration
def test_modifier_cross_statistic_against_paired_forward_passes(tmp_path, monkeypatch):
    folder = save_tiny_llama(tmp_path / "tiny")
    recorded = {}
    solve = ARMORModifier._solve

    def spy(self, module):
        stats = self._stats[module]
        recorded[self._module_names[module]] = (stats.hessian(), stats.cross_covariance())
        return solve(self, module)

    monkeypatch.setattr(ARMORModifier, "_solve", spy)
    modifier = armor(ignore=["re:.*lm_head"], num_iterations=2, wrapper_block_size=16,
                     correct_drift=True)
    model = run_oneshot(folder, [modifier])
    dense = load_tiny_llama(folder)
    assert sorted(recorded) == sorted(target_names())
    for name in target_names():
        H, C = recorded[name]
        result = modifier.results[name]
        assert result.final_loss <= result.initial_loss, name
        if name.startswith("model.layers.0."):
            # nothing before layer 0 is pruned: dense and pruned inputs coincide
            torch.testing.assert_close(C, H, rtol=0, atol=1e-6)  # observed 0.0
    # layer 1's q_proj input depends only on layer 0, which is final by then
    name = "model.layers.1.self_attn.q_proj"
    H_bf, C_bf = _paired_cross(model, dense, name)
    H, C = recorded[name]
    scale = float(C_bf.abs().max())
    assert float((C - C_bf).abs().max()) < 1e-4 * scale  # observed 1.9e-7 relative
    assert float((H - H_bf).abs().max()) < 1e-4 * float(H_bf.abs().max())  # observed 1.7e-7
    # and the drift is real: the pruned and dense inputs differ (observed 0.20 relative)
    assert float((C_bf - H_bf).abs().max()) > 1e-3 * scale
