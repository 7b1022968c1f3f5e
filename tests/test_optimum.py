"""The optimum integration: ``optimum-cli armor`` and ``ARMORQuantizer`` give the same armor-ct as
``armor prune`` for the same seed; optimum itself still imports beside our plugin module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("optimum.quantization_base", reason="needs the [optimum] extra")

from transformers import AutoModelForCausalLM  # noqa: E402

from armor_modifier.cli import main  # noqa: E402
from tiny_llama import SEQ_LEN, sample_input  # noqa: E402

#: a fast ARMOR run on the tiny Llama (the options of tests/test_cli.py's end-to-end prune)
FAST = ["--num-samples", "4", "--seq-len", str(SEQ_LEN), "--wrapper-block-size", "16"]
FAST += ["--num-iterations", "2", "--seed", "3"]
OPTIMUM_CLI = Path(sys.executable).parent / "optimum-cli"



@pytest.fixture(scope="module")
def armor_prune_logits(tiny_folder, text_file, tmp_path_factory):
    """Logits of the ``armor prune`` result (the reference for both optimum entry points)."""
    out = tmp_path_factory.mktemp("cli") / "armor"
    assert (
        main(["prune", str(tiny_folder), "--dataset", str(text_file), *FAST, "-o", str(out)]) == 0
    )
    return _logits(out)


def _logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(sample_input()).logits


def _optimum_cli(argv: list[str], monkeypatch) -> int:
    """Run optimum-cli's own ``main`` in this process (its parser, our registered command)."""
    from optimum.commands import optimum_cli

    monkeypatch.setattr(sys, "argv", ["optimum-cli", *argv])
    try:
        optimum_cli.main()
    except SystemExit as exit_info:
        return int(exit_info.code or 0)
    return 0


def test_optimum_cli_help_lists_armor():
    result = subprocess.run(
        [str(OPTIMUM_CLI), "--help"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "armor" in result.stdout and "export" in result.stdout


def test_optimum_still_imports():
    """Our ``optimum.commands.register`` portion does not shadow the real optimum package: its
    modules come from the installed distribution, and ARMORQuantizer is its quantizer type."""
    import inspect

    import optimum.exporters
    import optimum.quantization_base

    from armor_modifier.integrations.optimum_quantizer import ARMORQuantizer

    ours = Path(__file__).parents[1] / "src"
    paths = [Path(optimum.quantization_base.__file__), *map(Path, optimum.exporters.__path__)]
    for path in (p.resolve() for p in paths):
        assert "site-packages" in path.parts and ours not in path.parents, path
    assert inspect.isabstract(optimum.quantization_base.OptimumQuantizer)
    assert issubclass(ARMORQuantizer, optimum.quantization_base.OptimumQuantizer)
    assert not inspect.isabstract(ARMORQuantizer)


def test_optimum_cli_armor_has_every_armor_command(monkeypatch, capsys):
    assert _optimum_cli(["armor", "--help"], monkeypatch) == 0
    out = capsys.readouterr().out
    for command in ("prune", "eval", "export-dense", "export-onnx"):
        assert command in out


def test_optimum_cli_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    code = _optimum_cli(
        ["armor", "export-dense", str(tmp_path / "nope"), str(tmp_path / "d")], monkeypatch
    )
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("armor: error: ")


@pytest.mark.integration
def test_optimum_cli_prune_equals_armor_prune(
    tiny_folder, text_file, armor_prune_logits, tmp_path, monkeypatch
):
    out = tmp_path / "optimum"
    argv = ["armor", "prune", str(tiny_folder), "--dataset", str(text_file), *FAST, "-o", str(out)]
    assert _optimum_cli(argv, monkeypatch) == 0
    assert torch.equal(_logits(out), armor_prune_logits)


@pytest.mark.integration
def test_armor_quantizer_equals_armor_prune(tiny_folder, text_file, armor_prune_logits, tmp_path):
    from optimum.quantization_base import OptimumQuantizer

    from armor_modifier.integrations.optimum_quantizer import ARMORQuantizer

    quantizer = ARMORQuantizer.from_pretrained(tiny_folder)
    assert isinstance(quantizer, OptimumQuantizer)
    out = quantizer.quantize(
        tmp_path / "q",
        calibration_dataset=str(text_file),
        num_samples=4,
        seq_len=SEQ_LEN,
        seed=3,
        wrapper_block_size=16,
        num_iterations=2,
    )
    assert out == (tmp_path / "q").resolve()
    assert torch.equal(_logits(out), armor_prune_logits)


def test_armor_quantizer_refuses_unknown_setting(tiny_folder, tmp_path):
    from armor_modifier.integrations.optimum_quantizer import ARMORQuantizer

    with pytest.raises(ValueError, match=r"unknown ARMOR settings \['block_size'\]"):
        ARMORQuantizer.from_pretrained(tiny_folder).quantize(tmp_path / "q", block_size=16)
    assert not (tmp_path / "q").exists()


def test_armor_quantizer_without_optimum_names_the_extra():
    code = (
        "import sys; sys.modules['optimum.quantization_base'] = None\n"
        "from armor_modifier.integrations.optimum_quantizer import ARMORQuantizer\n"
        "from armor_modifier.cli import build_parser; build_parser()\n"
        "try:\n    ARMORQuantizer.from_pretrained('x')\n"
        "except ImportError as err:\n    print(err)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert "pip install 'armor-modifier[optimum]'" in result.stdout
