"""``matmul_precision="auto"``: bfloat16 products only where the device multiplies them natively,
and a solve under ``"auto"`` is exactly the solve under what it resolved to."""

from __future__ import annotations

import pytest
import torch

from armor_modifier.core import factorize
from armor_modifier.core.precision import native_bfloat16, resolve_matmul_precision
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
