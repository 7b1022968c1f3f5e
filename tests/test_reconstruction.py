"""``ARMORModifier``'s decoder-layer work on the tiny Llama: within-layer propagation and
reconstruction (``modifier/reconstruction.py``), against a plain run and brute-force replays.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from armor_modifier.core import ARMORValueError, is_2_of_4
from armor_modifier.core.precision import resolve_matmul_precision
from armor_modifier.core.reconstruct import guard_split
from armor_modifier.runtime import ARMOR_A, ARMOR_B, armor_linears
from tiny_llama import (
    RECONSTRUCTION_BEFORE,
    armor,
    calibration_dataset,
    input_statistics,
    load_tiny_llama,
    run_oneshot,
    sample_input,
)

BLOCK = 16
WINDOWS = 32  # calibration windows of the refinement tests (8 held out at 0.25)
REFINE = {
    "reconstruction_steps": 30,
    "reconstruction_learning_rate": 1e-3,
    "reconstruction_guard_fraction": 0.25,
    "reconstruction_eval_every": 5,
    **RECONSTRUCTION_BEFORE,
}


def _armor(**fields):
    return armor(
        targets=["Linear"],
        ignore=["re:.*lm_head"],
        wrapper_block_size=BLOCK,
        num_iterations=2,
        objective="output",
        **fields,
    )


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in armor_linears(model).items():
        out[f"{name}.weight"] = module.weight.detach().clone()
        out[f"{name}.A"] = getattr(module, ARMOR_A).detach().clone()
        out[f"{name}.B"] = getattr(module, ARMOR_B).detach().clone()
    return out


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(sample_input()).logits


def test_zero_steps_is_todays_result_bit_for_bit(tiny_llama_folder: Path) -> None:
    plain = run_oneshot(tiny_llama_folder, [_armor()])
    explicit = _armor(reconstruction_steps=0, reconstruction_parameters="wrappers")
    zero = run_oneshot(tiny_llama_folder, [explicit])
    a, b = _state(plain), _state(zero)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(plain), _logits(zero))
    assert explicit.reconstructions == []


def _layer0_guard_error(model: nn.Module, dense: nn.Module, guard: list[int]) -> float:
    """Brute force: layer 0's relative output error on the guard windows, against the dense
    layer 0 on the same inputs (layer 0's inputs are the embeddings, unchanged by pruning)."""
    ids = torch.tensor(calibration_dataset(WINDOWS)["input_ids"])[guard]
    captured: dict[str, torch.Tensor] = {}

    def grab(key):
        def hook(_m, args, kwargs, out):
            captured[key + "_in"] = args[0] if args else kwargs["hidden_states"]
            captured[key + "_out"] = out[0] if isinstance(out, tuple) else out

        return hook

    num = den = 0.0
    for row in ids:
        handles = [
            m.model.layers[0].register_forward_hook(grab(k), with_kwargs=True)
            for k, m in (("s", model), ("d", dense))
        ]
        with torch.no_grad():
            model(row[None])
            dense(row[None])
        for h in handles:
            h.remove()
        assert torch.equal(captured["s_in"], captured["d_in"])
        num += float((captured["s_out"] - captured["d_out"]).double().pow(2).sum())
        den += float((captured["d_out"] - captured["d_in"]).double().pow(2).sum())
    return num / den


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_refinement_keeps_2of4_and_never_raises_the_held_out_error(
    tiny_llama_folder: Path, precision: str
) -> None:
    """With ``reconstruction_precision="bfloat16"`` too: the fit steps run under autocast, the
    held-out errors the modifier reports are the float32 ones (recomputed below)."""
    dataset = calibration_dataset(WINDOWS)
    plain = run_oneshot(tiny_llama_folder, [_armor()], dataset=dataset)
    modifier = _armor(**{**REFINE, "reconstruction_precision": precision})
    refined = run_oneshot(tiny_llama_folder, [modifier], dataset=dataset)
    for name, module in armor_linears(refined).items():
        assert is_2_of_4(module.weight != 0), name
    results = {r.layer: r.result for r in modifier.reconstructions}
    assert list(results) == ["model.layers.0", "model.layers.1"]
    assert all(r.final_error <= r.initial_error and not r.rolled_back for r in results.values())
    assert any(r.accepted for r in results.values())  # observed: both layers accepted

    _, guard = guard_split(WINDOWS, REFINE["reconstruction_guard_fraction"])
    dense = load_tiny_llama(tiny_llama_folder)
    before = _layer0_guard_error(plain, dense, guard)
    after = _layer0_guard_error(refined, dense, guard)
    # the modifier's own figures, recomputed by plain forwards (observed to agree to ~1e-7)
    assert before == pytest.approx(results["model.layers.0"].initial_error, rel=1e-4)
    assert after == pytest.approx(results["model.layers.0"].final_error, rel=1e-4)
    assert after <= before


def test_the_defaults_fit_two_windows_a_step_in_the_devices_precision(
    tiny_llama_folder: Path,
) -> None:
    """Without the pins: 2 windows per Adam step and ``"auto"`` precision, which every layer's
    result records as what it resolved to on the CPU; nothing is half-written (2:4 cores)."""
    modifier = _armor(reconstruction_steps=4, reconstruction_guard_fraction=0.25,
                      reconstruction_eval_every=2)  # fmt: skip
    assert modifier.reconstruction_windows_per_step == 2
    assert modifier.reconstruction_precision == "auto"
    refined = run_oneshot(tiny_llama_folder, [modifier], dataset=calibration_dataset(WINDOWS))
    expected = resolve_matmul_precision("auto", torch.device("cpu"))
    assert [r.result.precision for r in modifier.reconstructions] == [expected] * 2
    assert all(is_2_of_4(m.weight != 0) for m in armor_linears(refined).values())


def _layer0_attention_error(model: nn.Module, dense: nn.Module, guard: list[int]) -> float:
    """Brute force: layer 0's attention block output error on the guard windows relative to
    the dense block's output size (both on the embeddings, which pruning leaves alone)."""
    ids = torch.tensor(calibration_dataset(WINDOWS)["input_ids"])[guard]
    out: dict[str, torch.Tensor] = {}

    def grab(key):
        def hook(_m, _args, output):
            out[key] = output[0]

        return hook

    num = den = 0.0
    for row in ids:
        handles = [m.model.layers[0].self_attn.register_forward_hook(grab(k))
                   for k, m in (("s", model), ("d", dense))]  # fmt: skip
        with torch.no_grad():
            model(row[None])
            dense(row[None])
        for h in handles:
            h.remove()
        num += float((out["s"] - out["d"]).double().pow(2).sum())
        den += float(out["d"].double().pow(2).sum())
    return num / den


def test_block_units_fit_attention_then_mlp(tiny_llama_folder: Path) -> None:
    """``reconstruction_unit="block"``: per layer the attention block, then the MLP; the
    attention unit's reported errors are the brute-force block errors of the plain and the
    refined model, the MLP unit's final error the layer's output error; cores stay 2:4."""
    dataset = calibration_dataset(WINDOWS)
    plain = run_oneshot(tiny_llama_folder, [_armor()], dataset=dataset)
    modifier = _armor(**REFINE, reconstruction_unit="block")
    refined = run_oneshot(tiny_llama_folder, [modifier], dataset=dataset)
    results = {r.layer: r.result for r in modifier.reconstructions}
    assert list(results) == [f"model.layers.{i}.{b}" for i in (0, 1) for b in ("self_attn", "mlp")]
    assert all(r.final_error <= r.initial_error and not r.rolled_back for r in results.values())
    assert any(r.accepted for r in results.values())  # observed: layer 0's two accepted
    for name, module in armor_linears(refined).items():
        assert is_2_of_4(module.weight != 0), name
    _, guard = guard_split(WINDOWS, REFINE["reconstruction_guard_fraction"])
    dense = load_tiny_llama(tiny_llama_folder)
    attention = results["model.layers.0.self_attn"]
    # the modifier's figures recomputed by plain forwards (float32 against float64 sums; the
    # layer-level check beside this one observed agreement to ~1e-7)
    assert _layer0_attention_error(plain, dense, guard) == pytest.approx(
        attention.initial_error, rel=1e-4
    )
    assert _layer0_attention_error(refined, dense, guard) == pytest.approx(
        attention.final_error, rel=1e-4
    )
    assert _layer0_guard_error(refined, dense, guard) == pytest.approx(
        results["model.layers.0.mlp"].final_error, rel=1e-4
    )
    with pytest.raises(ValueError, match="(?s)reconstruction_unit.*should be 'layer' or 'block'"):
        _armor(reconstruction_unit="head")


def test_non_finite_refinement_rolls_back(
    tiny_llama_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = calibration_dataset(WINDOWS)
    plain = run_oneshot(tiny_llama_folder, [_armor()], dataset=dataset)
    original_step = torch.optim.Adam.step

    def poisoned(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    modifier = _armor(**REFINE)
    refined = run_oneshot(tiny_llama_folder, [modifier], dataset=dataset)
    assert [r.result.rolled_back for r in modifier.reconstructions] == [True, True]
    a, b = _state(plain), _state(refined)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refined_model_saves_and_reloads_with_identical_logits(
    tiny_llama_folder: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    modifier = _armor(**REFINE)
    model = run_oneshot(tiny_llama_folder, [modifier], dataset=calibration_dataset(WINDOWS))
    assert any(r.result.accepted for r in modifier.reconstructions)
    model.save_pretrained(tmp_path / "ct")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    assert torch.equal(_logits(model), _logits(reloaded))


def test_model_target_and_wrappers_only_run(tiny_llama_folder: Path) -> None:
    dataset = calibration_dataset(WINDOWS)
    plain = _state(run_oneshot(tiny_llama_folder, [_armor()], dataset=dataset))
    modifier = _armor(**REFINE, reconstruction_target="model", reconstruction_parameters="wrappers")
    model = run_oneshot(tiny_llama_folder, [modifier], dataset=dataset)
    state = _state(model)
    # wrappers only: layer 0's cores are the unrefined ones (layer 1's differ: its inputs come
    # from the refined layer 0)
    layer0 = [k for k in plain if k.startswith("model.layers.0.") and k.endswith(".weight")]
    assert len(layer0) == 7 and all(torch.equal(state[k], plain[k]) for k in layer0)
    assert any(r.result.accepted for r in modifier.reconstructions)
    assert all(r.result.final_error <= r.result.initial_error for r in modifier.reconstructions)


def test_propagation_feeds_o_proj_the_compressed_attention(
    tiny_llama_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With propagation, the Hessian o_proj is factorised with is that of its inputs in the
    final model (compressed q/k/v), recomputed by brute force; without it, it is not."""
    import armor_modifier.modifier.compressor as base

    seen: dict[int, torch.Tensor] = {}
    original = base.factorize

    def spy(W, h, settings, H=None, **kw):
        seen[W.data_ptr()] = H.clone()
        return original(W, h, settings, H=H, **kw)

    monkeypatch.setattr(base, "factorize", spy)
    name = "model.layers.1.self_attn.o_proj"
    for propagate in (True, False):
        seen.clear()
        model = load_tiny_llama(tiny_llama_folder)
        ptr = model.get_submodule(name).weight.data_ptr()
        from llmcompressor import oneshot

        from tiny_llama import SEQ_LEN, build_tokenizer

        dataset = calibration_dataset()
        oneshot(
            model=model,
            processor=build_tokenizer(),
            dataset=dataset,
            recipe=[_armor(propagate_within_layer=propagate)],
            num_calibration_samples=len(dataset),
            max_seq_length=SEQ_LEN,
            shuffle_calibration_samples=False,
        )
        _, H_final = input_statistics(model, [name])[name]
        gap = float((seen[ptr] - H_final).norm() / H_final.norm())
        if propagate:
            assert gap < 1e-5  # observed 3e-8 (float32 rounding of the same sums)
        else:
            assert gap > 1e-3  # observed 0.05: statistics of the dense q/k/v


def test_input_groups_follow_the_llama_forward(tiny_llama_folder: Path) -> None:
    from armor_modifier.modifier.reconstruction import _input_groups

    model = load_tiny_llama(tiny_llama_folder)
    layer = model.model.layers[0]
    order: list[tuple[nn.Linear, torch.Tensor]] = []
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_pre_hook(lambda m, a: order.append((m, a[0]))) for m in linears]
    with torch.no_grad():
        model(sample_input())
    for h in handles:
        h.remove()
    groups = _input_groups(order[: len(linears)], linears)
    names = {m: n.split(".")[-1] for n, m in layer.named_modules()}
    assert [[names[m] for m in g] for g in groups] == [
        ["q_proj", "k_proj", "v_proj"],
        ["o_proj"],
        ["gate_proj", "up_proj"],
        ["down_proj"],
    ]


def test_too_few_windows_for_a_guard_slice(tiny_llama_folder: Path) -> None:
    with pytest.raises(ARMORValueError, match="at least 4 calibration samples"):
        run_oneshot(tiny_llama_folder, [_armor(**REFINE)], dataset=calibration_dataset(3))


def test_dense_calibration_is_refused() -> None:
    with pytest.raises(ValueError, match="calibration='sequential'"):
        _armor(reconstruction_steps=5, calibration="dense")
    with pytest.raises(ValueError, match="calibration='sequential'"):
        armor(propagate_within_layer=True, objective="proxy")


def test_a_layer_that_cannot_be_replayed_is_named_before_compression(
    tiny_llama_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    original = LlamaDecoderLayer.forward

    def noisy(self, hidden_states, *args, **kwargs):
        return original(self, hidden_states, *args, **kwargs) + torch.rand(1)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", noisy)
    modifier = _armor(**REFINE)
    with pytest.raises(ARMORValueError, match="LlamaDecoderLayer gives a different output"):
        run_oneshot(tiny_llama_folder, [modifier], dataset=calibration_dataset(WINDOWS))
    assert modifier.compressed_modules == []


def test_a_target_outside_every_decoder_layer_is_refused(tmp_path: Path) -> None:
    from tiny_llama import UNTIED, save_tiny_llama

    folder = save_tiny_llama(tmp_path / "untied", **UNTIED)
    modifier = armor(
        targets=["re:.*lm_head"],
        objective="output",
        wrapper_block_size=BLOCK,
        propagate_within_layer=True,
    )
    with pytest.raises(ARMORValueError, match="lm_head is in no decoder layer"):
        run_oneshot(folder, [modifier])


def test_every_armor_forward_is_the_block_diagonal_product() -> None:
    """The runtime's forward, wherever it runs: the hooks :func:`attach_wrappers` registers, the
    hooks and core forward reconstruction swaps in for trainable tensors
    (``trainable_factors``), and the exporter's ``FactoredLinear`` all compute
    ``block_diag(A) core block_diag(B) x + bias`` (brute force with ``torch.block_diag``,
    float64, unequal block sizes)."""
    from armor_modifier.modifier.reconstruction import trainable_factors
    from armor_modifier.onnx.modules import FactoredLinear
    from armor_modifier.runtime import attach_wrappers

    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    m, n = 8, 12
    x = randn(3, 5, n)

    def reference(A: torch.Tensor, core: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        dense = torch.block_diag(*A) @ core @ torch.block_diag(*B)
        return x @ dense.T + linear.bias.detach()

    linear = nn.Linear(n, m, dtype=torch.float64)
    A, B, core = randn(2, 4, 4), randn(2, 6, 6), randn(m, n)
    with torch.no_grad():
        linear.weight.copy_(core)
    attach_wrappers(linear, A, B)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), reference(A, core, B))
        factored = FactoredLinear(core, A, B, linear.bias)
        torch.testing.assert_close(factored(x), reference(A, core, B))

    moving = [randn(m, n), randn(2, 4, 4), randn(2, 6, 6)]
    names = [("l", linear, "weight"), ("l", linear, ARMOR_A), ("l", linear, ARMOR_B)]
    with torch.no_grad(), trainable_factors({"l": linear}, names, moving):
        torch.testing.assert_close(linear(x), reference(moving[1], moving[0], moving[2]))
    with torch.no_grad():  # on exit the module's own factors are back
        torch.testing.assert_close(linear(x), reference(A, core, B))


def test_the_summary_line_gives_the_reconstruction_time_beside_the_solve() -> None:
    from types import SimpleNamespace

    from armor_modifier.modifier.report import summarize

    module = SimpleNamespace(shape=(64, 32), wrapper_block_size=4, loss_ratio=0.5, num_fallbacks=0,
                             num_sanitized_h=0, objective="output", init="sparsegpt",
                             num_damping_increases=0, num_h_failures=0, seconds=3.0)  # fmt: skip
    units = [SimpleNamespace(result=SimpleNamespace(seconds=s)) for s in (2.0, 2.5)]
    assert summarize([module]).endswith(", 3.0 s solving")
    assert summarize([module], units).endswith(
        ", 3.0 s solving, 4.5 s reconstruction (1.50x the solve)"
    )
