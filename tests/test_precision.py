"""``matmul_precision="auto"`` and ``reconstruction_precision="auto"``: bfloat16 only where the
device multiplies it natively, and a solve or a fit under ``"auto"`` is exactly the one under what
it resolved to."""

from __future__ import annotations

import pytest
import torch

from armor_modifier.core import factorize
from armor_modifier.core.precision import native_bfloat16, resolve_matmul_precision
from armor_modifier.core.reconstruct import ReconstructionSettings, reconstruct_layer
from armor_modifier.core.sparsity import top2_of_4_mask
from armor_modifier.modifier.reconstruction import LayerReconstruction
from armor_modifier.modifier.report import ARMORModuleResult

CPU = torch.device("cpu")


def _cpu_units(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (False, False, "float32"), (True, False, "bfloat16"), (False, True, "bfloat16"),
])  # fmt: skip
def test_auto_follows_the_cpus_bfloat16_units(monkeypatch, avx512_bf16, amx, expected):
    _cpu_units(monkeypatch, avx512_bf16, amx)
    assert native_bfloat16(CPU) == (expected == "bfloat16")
    assert resolve_matmul_precision("auto", CPU) == expected
    for explicit in ("float32", "bfloat16"):  # an explicit choice is never overridden
        assert resolve_matmul_precision(explicit, CPU) == explicit


def test_a_torch_without_the_cpu_checks_gets_float32(monkeypatch):
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, check, raising=False)
    assert resolve_matmul_precision("auto", CPU) == "float32"


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(300, 64, generator=g) @ torch.randn(64, 64, generator=g) / 8
    return torch.randn(32, 64, generator=g), X.T @ X / 300


@pytest.mark.parametrize("units", [False, True])
def test_auto_solves_exactly_as_its_resolution(monkeypatch, units):
    """Bit for bit the factors of the explicit precision ``auto`` picked, which the result
    records; the other precision's factors differ (so the comparison can fail)."""
    _cpu_units(monkeypatch, units, False)
    W, H = _problem()
    common = dict(objective="output", H=H, wrapper_block_size=16, num_iterations=4)
    auto = factorize(W, None, **common)
    picked, other = ("bfloat16", "float32") if units else ("float32", "bfloat16")
    same = factorize(W, None, **common, matmul_precision=picked)
    different = factorize(W, None, **common, matmul_precision=other)
    assert auto.matmul_precision == picked and different.matmul_precision == other
    assert torch.equal(auto.dense(), same.dense()) and auto.loss_history == same.loss_history
    assert not torch.equal(auto.dense(), different.dense())


def test_the_proxy_objective_reports_float32(monkeypatch):
    """No output-aware descent, no product with H: nothing ran in bfloat16."""
    _cpu_units(monkeypatch, True, False)
    W, H = _problem(1)
    f = factorize(W, H.diagonal(), objective="proxy", wrapper_block_size=16, num_iterations=2)
    assert f.matmul_precision == "float32"


def test_the_log_line_names_bfloat16_products(monkeypatch):
    _cpu_units(monkeypatch, True, False)
    W, H = _problem(2)
    f = factorize(W, None, objective="output", H=H, wrapper_block_size=16, num_iterations=2)
    line = ARMORModuleResult.from_factors("layers.0.mlp.down_proj", f, 16, 300).log_line()
    assert line.endswith(", bfloat16 products")
    f32 = factorize(W, None, objective="output", H=H, wrapper_block_size=16, num_iterations=2,
                    matmul_precision="float32")  # fmt: skip
    assert "bfloat16" not in ARMORModuleResult.from_factors("x", f32, 16, 300).log_line()


def _fit(precision: str) -> tuple[torch.Tensor, object]:
    """20 reconstruction steps of a residual 2:4 layer ``x + x S^T`` towards a dense one on
    correlated inputs (so the kept weights can make up for the pruned ones)."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(16, 16, generator=g) / 4
    mixing = torch.eye(16) + torch.randn(16, 16, generator=g) / 4
    X = [torch.randn(64, 16, generator=g) @ mixing for _ in range(8)]
    T = [x + x @ W.T for x in X]
    M = top2_of_4_mask(W.abs()).float()
    S = W * M
    settings = ReconstructionSettings(steps=20, learning_rate=1e-2, guard_fraction=0.25,
                                      eval_every=5, precision=precision)  # fmt: skip
    result = reconstruct_layer(lambda i: X[i] + X[i] @ S.T, X, T, [S], [M], settings)
    return S, result


@pytest.mark.parametrize("units", [False, True])
def test_auto_reconstructs_exactly_as_its_resolution(monkeypatch, units):
    """The fit under ``"auto"`` is bit for bit the explicit precision's, which the result and the
    log line record; the other precision's fit differs (so the comparison can fail)."""
    _cpu_units(monkeypatch, units, False)
    picked, other = ("bfloat16", "float32") if units else ("float32", "bfloat16")
    S_auto, auto = _fit("auto")
    S_same, same = _fit(picked)
    S_other, different = _fit(other)
    assert auto.precision == same.precision == picked and different.precision == other
    assert auto.accepted  # observed: guard error 0.128 -> 0.075 in both precisions
    assert torch.equal(S_auto, S_same) and auto.history == same.history
    assert not torch.equal(S_auto, S_other)
    line = LayerReconstruction("model.layers.0", auto, 8).log_line()
    assert line.endswith(", bfloat16 autocast") == units


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_cuda_follows_the_devices_compute_capability():
    """bfloat16 tensor cores from compute capability 8.0 (Ampere) on; a solve there records it."""
    device = torch.device("cuda", 0)
    native = torch.cuda.get_device_capability(device)[0] >= 8
    assert resolve_matmul_precision("auto", device) == ("bfloat16" if native else "float32")
    W, H = _problem(3)
    f = factorize(W.to(device), None, objective="output", H=H.to(device), wrapper_block_size=16,
                  num_iterations=2)  # fmt: skip
    assert f.matmul_precision == ("bfloat16" if native else "float32")
