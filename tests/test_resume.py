"""Resume from a progress folder (``ARMORModifier(progress_dir=...)``, ``modifier/progress.py``).

A child process runs ``oneshot`` on the tiny Llama with a progress folder and, once layer 0's
file is written, waits; this process kills it from outside (SIGKILL, or SIGINT as a Ctrl-C would).
A second run with the same folder must load layer 0, solve layer 1, and give the uninterrupted
run's model bit for bit (every core, wrapper and logit). Bad progress is recomputed (a damaged
or mismatching layer file) or refused before any work (another run's folder). On a five-layer
Llama killed after layer 3, the resumed run skips the forward passes of layers 1 and 2
(``modifier/fast_forward.py``) and must give the same model.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from armor_modifier.core.errors import ARMORValueError
from armor_modifier.modifier.fast_forward import FRONTIER
from armor_modifier.modifier.progress import RUN_FILE

THIS = Path(__file__).resolve()
sys.path.insert(0, str(THIS.parent))

from tiny_llama import (  # noqa: E402
    RECONSTRUCTION_BEFORE,
    armor,
    calibration_dataset,
    load_tiny_llama,
    run_oneshot,
    sample_input,
    save_tiny_llama,
    w4a16_groups,
)

LAYER0 = "model.layers.0.safetensors"
VARIANTS = {
    "armor": {},
    "reconstruction": {
        "propagate_within_layer": True,
        "reconstruction_steps": 6,
        "reconstruction_learning_rate": 1e-3,
        "reconstruction_guard_fraction": 0.25,
        "reconstruction_eval_every": 2,
        **RECONSTRUCTION_BEFORE,
    },
    "reconstruction-model-target": {
        "reconstruction_steps": 6,
        "reconstruction_learning_rate": 1e-3,
        "reconstruction_guard_fraction": 0.25,
        "reconstruction_eval_every": 2,
        "reconstruction_target": "model",
        **RECONSTRUCTION_BEFORE,
    },
}

#: the child: oneshot with a progress folder, stalled once layer ``stall``'s file is written
CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from armor_modifier.modifier import fast_forward, progress
fast_forward.WRITE_SPACING = 0  # a frontier at every layer, however fast the layers go
from test_resume import _dataset, modifiers
from tiny_llama import run_oneshot
save = progress.LayerProgress.save
def stalled(self, key, *args, **kwargs):
    save(self, key, *args, **kwargs)
    if key == {stall!r}:
        time.sleep(120)
progress.LayerProgress.save = stalled
run_oneshot({folder!r}, modifiers({variant!r}, {progress_dir!r}, {gptq!r}),
            dataset=_dataset({variant!r}))
"""


def modifiers(variant: str, progress_dir: str | None, gptq: bool = False) -> list:
    """The recipe of every run here: ARMOR (+ the variant's fields), optionally + W4A16 GPTQ."""
    fields = {"wrapper_block_size": 16, "num_iterations": 2, "objective": "output"}
    recipe = [armor(ignore=["re:.*lm_head"], progress_dir=progress_dir, **fields,
                    **VARIANTS[variant])]  # fmt: skip
    if gptq:
        from armor_modifier.modifier import ARMORGPTQModifier

        recipe.append(ARMORGPTQModifier(ignore=["re:.*lm_head"], config_groups=w4a16_groups(16)))
    return recipe


def _dataset(variant: str):
    return calibration_dataset(16 if variant != "armor" else 8)


def _state(model) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, buffer in model.named_buffers():
        state[name] = buffer.detach().clone()
    with torch.no_grad():
        state["logits"] = model(sample_input()).logits
    return state


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


def _run(folder: Path, variant: str, progress_dir: Path | None, gptq: bool = False):
    recipe = modifiers(variant, None if progress_dir is None else str(progress_dir), gptq)
    model = run_oneshot(folder, recipe, dataset=_dataset(variant))
    return model, recipe[0]


def _interrupt(folder: Path, variant: str, progress_dir: Path, how: signal.Signals,
               gptq: bool = False, layer: int = 0) -> None:  # fmt: skip
    """Run the child until layer ``layer``'s progress is on disk, then send it ``how``."""
    stall = f"model.layers.{layer}"
    code = CHILD.format(tests=str(THIS.parent), folder=str(folder), variant=variant,
                        progress_dir=str(progress_dir), gptq=gptq, stall=stall)  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    child = subprocess.Popen([sys.executable, "-c", code], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (progress_dir / f"{stall}.safetensors").exists():
            if child.poll() is not None:
                tail = child.stderr.read().decode()[-2000:]
                raise AssertionError(f"the child ended early: {tail}")
            assert time.monotonic() < deadline, f"{stall}'s progress never appeared"
            time.sleep(0.1)
        child.send_signal(how)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not (progress_dir / f"model.layers.{layer + 1}.safetensors").exists()


@pytest.mark.integration
@pytest.mark.parametrize(
    "variant, how",
    [("armor", signal.SIGKILL), ("armor", signal.SIGINT),
     ("reconstruction", signal.SIGKILL), ("reconstruction-model-target", signal.SIGKILL)],
)  # fmt: skip
def test_a_killed_run_resumes_to_the_uninterrupted_model_bit_for_bit(
    tiny_llama_folder, tmp_path, variant, how
):
    reference, _ = _run(tiny_llama_folder, variant, None)
    progress_dir = tmp_path / "progress"
    _interrupt(tiny_llama_folder, variant, progress_dir, how)
    resumed, modifier = _run(tiny_llama_folder, variant, progress_dir)
    _assert_same(_state(reference), _state(resumed))
    progress = modifier._progress
    assert (progress.loaded, progress.solved) == (["model.layers.0"], ["model.layers.1"])
    assert [r.layer for r in modifier.reconstructions] == (
        [] if variant == "armor" else ["model.layers.0", "model.layers.1"]
    )
    # no temporary file left behind; the frontier (layer 1's inputs) where nothing else needs them
    frontier = [] if variant == "reconstruction-model-target" else [FRONTIER]
    assert sorted(p.name for p in progress_dir.iterdir()) == sorted(
        [RUN_FILE, LAYER0, "model.layers.1.safetensors", *frontier]
    )


@pytest.fixture(scope="module")
def five_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with five decoder layers (room for layers skipped between two real ones)."""
    return save_tiny_llama(tmp_path_factory.mktemp("five_layers"), num_hidden_layers=5)


def _counting_forwards(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """Calls of each decoder layer's own forward (by layer index), from now on (models loaded
    from now on keep counting: compressed-tensors' offload wrapper holds the function)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    calls: dict[int, int] = {}
    forward = LlamaDecoderLayer.forward

    @functools.wraps(forward)
    def counting(self, hidden_states, *args, **kwargs):
        if hidden_states.device.type != "meta":  # not the tracer's shape pass
            index = self.self_attn.layer_idx
            calls[index] = calls.get(index, 0) + 1
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", counting)
    return calls


LAYERS_0_TO_3 = [f"model.layers.{i}" for i in range(4)]


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["armor", "reconstruction"])
def test_a_resumed_run_skips_the_passes_of_the_layers_it_loads(
    five_layers, tmp_path, monkeypatch, variant
):
    """Killed once layer 3's file exists (its inputs are the frontier, and it was solved from
    them): the resumed run never runs layers 0-2, runs layer 3 only to propagate (its stored
    inputs in, its loaded factors applied), solves layer 4, and gives the uninterrupted model bit
    for bit."""
    reference, _ = _run(five_layers, variant, None)
    progress_dir = tmp_path / "progress"
    _interrupt(five_layers, variant, progress_dir, signal.SIGKILL, layer=3)
    assert (progress_dir / FRONTIER).exists()
    calls = _counting_forwards(monkeypatch)
    resumed, modifier = _run(five_layers, variant, progress_dir)
    calls = dict(calls)  # the model keeps the counting forward: later calls are not oneshot's
    _assert_same(_state(reference), _state(resumed))
    progress = modifier._progress
    assert (progress.loaded, progress.solved) == (LAYERS_0_TO_3, ["model.layers.4"])
    assert progress.fast_forward.skipped == LAYERS_0_TO_3
    batches = len(_dataset(variant))
    assert [calls.get(i, 0) for i in range(4)] == [0, 0, 0, batches]
    assert calls[4] >= 2 * batches  # both passes, and reconstruction's replays


@pytest.mark.integration
def test_a_frontier_that_lags_skips_up_to_it_and_forwards_after(five_layers, tmp_path,
                                                                monkeypatch):  # fmt: skip
    """Frontier writes spaced out so far that only layer 1's inputs are kept: a rerun skips
    layers 0 and 1, forwards through the loaded layers 2-4, and gives the same model."""
    from armor_modifier.modifier import fast_forward

    progress_dir = tmp_path / "progress"
    monkeypatch.setattr(fast_forward, "WRITE_SPACING", 1e9)
    first, _ = _run(five_layers, "armor", progress_dir)
    monkeypatch.undo()
    again, modifier = _run(five_layers, "armor", progress_dir)
    _assert_same(_state(first), _state(again))
    progress = modifier._progress
    assert progress.loaded == [f"model.layers.{i}" for i in range(5)] and progress.solved == []
    assert progress.fast_forward.skipped == ["model.layers.0", "model.layers.1"]


@pytest.mark.integration
@pytest.mark.parametrize(
    "case", ["flipped byte", "batches reversed", "norm changed", "other data", "fewer batches"]
)
def test_a_frontier_is_used_only_when_it_checks_out(five_layers, tmp_path, case):
    """A damaged frontier is not used (the loaded layers are forwarded: same model); batches in
    another order still find their stored inputs by key (same model); a decoder layer's norm
    changed refuses the frontier, and then layer 1, loaded without statistics, stops the run;
    other calibration data (the first batch differs) forwards through the layers; a subset of
    the stored batches stops the run at layer 0's end, before any work."""
    from loguru import logger

    progress_dir = tmp_path / "progress"
    reference, _ = _run(five_layers, "armor", None)
    _interrupt(five_layers, "armor", progress_dir, signal.SIGKILL, layer=3)
    dataset, folder = _dataset("armor"), five_layers
    if case == "flipped byte":
        path = progress_dir / FRONTIER
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif case == "batches reversed":
        dataset = dataset.select(range(len(dataset) - 1, -1, -1))
    elif case == "other data":
        dataset = calibration_dataset(8, seed=7)
    elif case == "fewer batches":
        dataset = dataset.select(range(len(dataset) - 1))
    else:
        model = load_tiny_llama(five_layers)
        with torch.no_grad():
            model.model.layers[1].input_layernorm.weight[0] += 0.5
        folder = tmp_path / "other-norm"
        model.save_pretrained(folder)
        from tiny_llama import build_tokenizer

        build_tokenizer().save_pretrained(folder)
    warnings: list[str] = []
    handle = logger.add(lambda m: warnings.append(str(m)), level="WARNING")
    recipe = modifiers("armor", str(progress_dir))
    try:
        if case in ("norm changed", "fewer batches"):
            refusal = {"norm changed": r"model\.layers\.1: its calibration inputs",
                       "fewer batches": r"7 calibration batches here, 8 in the stored run"}
            with pytest.raises(ARMORValueError, match=refusal[case]):
                run_oneshot(folder, recipe, dataset=dataset)
        else:
            model = run_oneshot(folder, recipe, dataset=dataset)
    finally:
        logger.remove(handle)
    progress = recipe[0]._progress
    if case in ("batches reversed", "fewer batches"):
        assert progress.fast_forward.skipped == LAYERS_0_TO_3
        assert not any("frontier" in w for w in warnings), warnings
    elif case == "other data":  # everything recomputed from layer 0, as a fresh run on that data
        assert progress.fast_forward.skipped == [] and progress.loaded == []
        fresh = run_oneshot(five_layers, modifiers("armor", None), dataset=dataset)
        _assert_same(_state(fresh), _state(model))
    else:
        why = "checksum" if case == "flipped byte" else "other parameters"
        assert progress.fast_forward.skipped == []
        assert any(FRONTIER in w and why in w for w in warnings), warnings
    if case in ("flipped byte", "batches reversed"):
        _assert_same(_state(reference), _state(model))


@pytest.mark.integration
def test_resume_with_gptq_after_armor_is_bit_for_bit(tiny_llama_folder, tmp_path):
    reference, _ = _run(tiny_llama_folder, "armor", None, gptq=True)
    progress_dir = tmp_path / "progress"
    _interrupt(tiny_llama_folder, "armor", progress_dir, signal.SIGKILL, gptq=True)
    resumed, modifier = _run(tiny_llama_folder, "armor", progress_dir, gptq=True)
    _assert_same(_state(reference), _state(resumed))
    assert modifier._progress.loaded == ["model.layers.0"]


@pytest.mark.integration
@pytest.mark.parametrize("frontier", [True, False])
def test_a_finished_run_reloads_every_layer(tiny_llama_folder, tmp_path, monkeypatch, frontier):
    """With the frontier (layer 1's inputs, from which layer 1 was solved) no layer runs its
    calibration pass or collects statistics. Without it, layer 0 is loaded after collecting its
    statistics (they are compared); layer 1, after a loaded layer 0, is loaded without
    statistics: its inputs' digest is compared instead."""
    from armor_modifier.modifier.compressor import LinearCompressor

    progress_dir = tmp_path / "progress"
    first, _ = _run(tiny_llama_folder, "armor", progress_dir)
    if not frontier:
        (progress_dir / FRONTIER).unlink()
    calibrated: set[str] = set()
    add_input = LinearCompressor.add_input

    def recording(self, module, x):
        calibrated.add(self.names[module])
        add_input(self, module, x)

    monkeypatch.setattr(LinearCompressor, "add_input", recording)
    again, modifier = _run(tiny_llama_folder, "armor", progress_dir)
    _assert_same(_state(first), _state(again))
    assert modifier._progress.loaded == ["model.layers.0", "model.layers.1"]
    assert modifier._progress.solved == []
    assert sorted(modifier.results) == sorted(first_names(first))
    if frontier:
        assert calibrated == set()
        assert modifier._progress.fast_forward.skipped == ["model.layers.0", "model.layers.1"]
    else:
        assert calibrated and all(name.startswith("model.layers.0.") for name in calibrated)


@pytest.mark.integration
def test_a_layer_loaded_without_statistics_is_refused_when_its_inputs_differ(
    tiny_llama_folder, tmp_path
):
    """Layer 1's stored input digest altered (as another torch build's forward would): the run
    has no statistics to recompute layer 1 from, so it stops naming the file; nothing is written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    progress_dir = tmp_path / "progress"
    _run(tiny_llama_folder, "armor", progress_dir)
    (progress_dir / FRONTIER).unlink()  # the path through the loaded layers' passes
    path = progress_dir / "model.layers.1.safetensors"
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={**metadata, "inputs": "0" * 64})
    before = {p.name: p.read_bytes() for p in progress_dir.iterdir()}
    with pytest.raises(ARMORValueError, match=r"model\.layers\.1: its calibration inputs .* "
                       r"without statistics.*model\.layers\.1\.safetensors"):  # fmt: skip
        _run(tiny_llama_folder, "armor", progress_dir)
    assert {p.name: p.read_bytes() for p in progress_dir.iterdir()} == before


@pytest.mark.integration
def test_only_the_first_targets_inputs_let_a_layer_skip_statistics(tiny_llama_folder, tmp_path):
    """After a loaded layer 0, layer 1 skips its statistics when its first target's input comes
    first; when another target's comes first (the first one got no token, as an MoE expert can),
    it collects them; a rank that got no batch fingerprints the layer as the ranks that skipped
    (an inputs digest, no statistics), so the ranks agree."""
    from armor_modifier.modifier.progress import LayerProgress

    progress_dir = tmp_path / "progress"
    _, modifier = _run(tiny_llama_folder, "armor", progress_dir)
    stored = {n for targets in modifier._progress._layer_targets.values() for n in targets.values()}
    dense = load_tiny_llama(tiny_llama_folder)
    names = {m: n for n, m in dense.named_modules() if n in stored}
    layer = {m: n for m, n in names.items() if n.startswith("model.layers.1.")}
    first, *rest = layer

    def after_layer_0() -> LayerProgress:
        progress = LayerProgress(progress_dir, modifier._progress.run_info, names).open()
        progress.note("model.layers.0", loaded=True)
        return progress

    assert after_layer_0().wants_statistics(first, torch.zeros(2, first.in_features)) is False
    assert after_layer_0().wants_statistics(rest[-1], torch.zeros(2, rest[-1].in_features))
    fingerprint = after_layer_0().fingerprint("model.layers.1", layer, {})
    assert "inputs" in fingerprint and "statistics" not in fingerprint


def first_names(model) -> list[str]:
    from armor_modifier.runtime import is_armor_linear

    return [name for name, module in model.named_modules() if is_armor_linear(module)]


@pytest.mark.integration
@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "another model", "other data"])
def test_a_bad_layer_file_is_recomputed_with_a_warning(tiny_llama_folder, tmp_path, damage):
    from loguru import logger

    progress_dir = tmp_path / "progress"
    reference, _ = _run(tiny_llama_folder, "armor", progress_dir)
    path = progress_dir / LAYER0
    data = bytearray(path.read_bytes())
    dataset = _dataset("armor")
    folder = tiny_llama_folder
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "another model":
        model = load_tiny_llama(tiny_llama_folder)
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
        folder = tmp_path / "other-model"
        model.save_pretrained(folder)
        from tiny_llama import build_tokenizer

        build_tokenizer().save_pretrained(folder)
    else:
        dataset = calibration_dataset(8, seed=7)
    warnings: list[str] = []
    handle = logger.add(lambda m: warnings.append(str(m)), level="WARNING")
    try:
        recipe = modifiers("armor", str(progress_dir))
        model = run_oneshot(folder, recipe, dataset=dataset)
    finally:
        logger.remove(handle)
    progress = recipe[0]._progress
    expected = {"truncated": "unreadable", "flipped byte": "checksum",
                "another model": "dense weights", "other data": "calibration statistics"}
    assert any(expected[damage] in w and "model.layers.0" in w for w in warnings), warnings
    assert "model.layers.0" in progress.solved
    if damage in ("truncated", "flipped byte"):  # same inputs: the recomputed model is the same
        assert progress.loaded == ["model.layers.1"]
        _assert_same(_state(reference), _state(model))
    else:  # layer 0 changed, so layer 1's inputs did too: both recomputed, matching a fresh run
        assert progress.loaded == []
        fresh = run_oneshot(folder, modifiers("armor", None), dataset=dataset)
        _assert_same(_state(fresh), _state(model))


@pytest.mark.integration
def test_another_runs_folder_is_refused_before_any_work(tiny_llama_folder, tmp_path):
    progress_dir = tmp_path / "progress"
    _run(tiny_llama_folder, "armor", progress_dir)
    recipe = modifiers("armor", str(progress_dir))
    recipe[0] = armor(ignore=["re:.*lm_head"], progress_dir=str(progress_dir),
                      wrapper_block_size=16, num_iterations=3, objective="output")  # fmt: skip
    with pytest.raises(ARMORValueError, match=r"recipe\.num_iterations: 2 there, 3 here"):
        run_oneshot(tiny_llama_folder, recipe, dataset=_dataset("armor"))
    assert recipe[0].compressed_modules == []
    (progress_dir / RUN_FILE).write_text(json.dumps({"format": "1"}))
    with pytest.raises(ARMORValueError, match="belongs to another run"):
        run_oneshot(tiny_llama_folder, modifiers("armor", str(progress_dir)),
                    dataset=_dataset("armor"))  # fmt: skip


@pytest.mark.integration
def test_layer_files_of_another_run_are_not_loaded_without_run_json(tiny_llama_folder, tmp_path):
    """run.json removed: the other recipe's layer files still say whose they are, and are
    recomputed (the result is a fresh run's of the new recipe)."""
    progress_dir = tmp_path / "progress"
    _run(tiny_llama_folder, "armor", progress_dir)
    (progress_dir / RUN_FILE).unlink()
    fields = {"wrapper_block_size": 16, "num_iterations": 3, "objective": "output"}
    other = [armor(ignore=["re:.*lm_head"], progress_dir=str(progress_dir), **fields)]
    model = run_oneshot(tiny_llama_folder, other, dataset=_dataset("armor"))
    assert other[0]._progress.loaded == [] and len(other[0]._progress.solved) == 2
    fresh = run_oneshot(tiny_llama_folder, [armor(ignore=["re:.*lm_head"], **fields)],
                        dataset=_dataset("armor"))  # fmt: skip
    _assert_same(_state(fresh), _state(model))


@pytest.mark.slow
def test_the_armor_command_on_smollm2_resumes_bit_for_bit(tmp_path):
    """The real ``armor prune smollm2 --resume``: killed after layer 3, resumed, the armor-ct
    files byte for byte those of an uninterrupted run (benchmarks/resume_cost.py, 2 iterations)."""
    pytest.importorskip("armor_harness")
    out = tmp_path / "cost.json"
    script = THIS.parents[1] / "benchmarks" / "resume_cost.py"
    subprocess.run(
        [sys.executable, str(script), "--model", "smollm2", "--kill-after", "3",
         "--args", "--wrapper-block-size 32 --num-iterations 2", "--json", str(out)],
        check=True, timeout=3600,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["killed"]["killed"] and result["first"]["returncode"] == 0
    assert (result["resumed"]["loaded"], result["resumed"]["solved"]) == (4, 26)
    assert result["identical_armor_ct"]


def test_propagate_error_is_read_only_inside_the_sequential_pipeline():
    """Outside llm-compressor's sequential pipeline (here, or under another pipeline) there is
    no ``propagate_error`` to read, so fast-forwarding stays off; the skip tests above show it
    read inside."""
    from armor_modifier.modifier.fast_forward_setup import pipeline_propagates

    dataset_args = type("DatasetArguments", (), {"propagate_error": True})()

    def __call__():  # an unrelated __call__ holding dataset_args, as BasicPipeline's does
        assert dataset_args.propagate_error
        return pipeline_propagates()

    assert pipeline_propagates() is None and __call__() is None
