"""The ``armor`` command line: help, the bad-input contract, and a tiny end-to-end prune."""

import json
import re

import pytest

from armor_modifier.cli import main
from tiny_llama import SEQ_LEN


def _error_line(capsys) -> str:
    """The one error line (progress bars of model loading may precede it on stderr)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("armor: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


@pytest.mark.parametrize(
    "argv", [["--help"], ["prune", "--help"], ["eval", "--help"], ["export-dense", "--help"]]
)
def test_help_explains_every_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: armor" in out


def test_prune_missing_model_folder(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_prune_refuses_non_empty_output_without_overwrite(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["prune", str(tiny_folder), "--output", str(out)]) == 2
    assert "--overwrite" in _error_line(capsys)
    assert (out / "keep.txt").read_text() == "mine"


def test_prune_recipe_that_does_not_parse(tiny_folder, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("stage:\n  modifiers: [unclosed\n")
    code = main(
        ["prune", str(tiny_folder), "--recipe", str(recipe), "--output", str(tmp_path / "out")]
    )
    assert code == 2
    assert "does not parse" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_prune_seq_len_above_context(tiny_folder, text_file, tmp_path, capsys):
    code = main(
        [
            "prune",
            str(tiny_folder),
            "--dataset",
            str(text_file),
            "--seq-len",
            "100000",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "context" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_eval_text_too_short(tiny_folder, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("w5 w6 w7")
    assert main(["eval", str(tiny_folder), "--dataset", str(short), "--seq-len", "16"]) == 2
    assert "too short" in _error_line(capsys).lower()


def test_eval_unknown_dataset(tiny_folder, capsys):
    assert main(["eval", str(tiny_folder), "--dataset", "wikitext2"]) == 2
    assert "wikitext" in _error_line(capsys).lower()


def test_export_dense_missing_source(tmp_path, capsys):
    assert main(["export-dense", str(tmp_path / "nope"), str(tmp_path / "dst")]) == 2
    assert "does not exist" in _error_line(capsys)


@pytest.mark.integration
def test_prune_eval_and_export_end_to_end(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "armor"
    code = main(
        [
            "prune",
            str(tiny_folder),
            "--dataset",
            str(text_file),
            "--num-samples",
            "4",
            "--seq-len",
            str(SEQ_LEN),
            "--wrapper-block-size",
            "16",
            "--num-iterations",
            "2",
            "--output",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "armor-ct"
    assert (out / "tokenizer.json").exists()
    capsys.readouterr()
    eval_args = ["--dataset", str(text_file), "--seq-len", str(SEQ_LEN), "--max-windows", "2"]
    assert main(["eval", str(out), *eval_args]) == 0
    pruned_ppl = _perplexity_row(capsys.readouterr().out)
    dense = tmp_path / "dense"
    assert main(["export-dense", str(out), str(dense)]) == 0
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(dense), *eval_args]) == 0
    # The dense export multiplies A core B out: same model up to fp32 rounding (observed equal to
    # the printed 3 decimals); a different model would print another perplexity.
    assert _perplexity_row(capsys.readouterr().out) == pytest.approx(pruned_ppl, rel=1e-4)
    assert main(["eval", str(tiny_folder), *eval_args]) == 0
    assert _perplexity_row(capsys.readouterr().out) != pruned_ppl  # pruning changed the model


def test_prune_with_distillation_prints_the_held_out_kl(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["prune", str(tiny_folder), "--dataset", str(text_file), "--num-samples", "4",
                 "--seq-len", str(SEQ_LEN), "--wrapper-block-size", "16", "--num-iterations", "1",
                 "--distill-steps", "4", "--distill-num-samples", "8", "--distill-eval-every",
                 "2", "--distill-learning-rate", "1e-3", "--output", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("distilled in"))
    before, after = (float(v) for v in re.findall(r"(\d+\.\d+) (?:->|nats)", line))
    assert after <= before, line
    assert (out / "config.json").is_file()


def _perplexity_row(out: str) -> float:
    """The perplexity printed in ``armor eval``'s one table row of 2 windows."""
    rows = [line for line in out.splitlines() if re.match(rf"\| .+ \| 2 x {SEQ_LEN} \| ", line)]
    assert len(rows) == 1, out
    value = float(rows[0].split("|")[3])
    assert 1.0 < value < float("inf")
    return value


# ---- issue 11: bad input fails before any work, with one line naming the value and the rule


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--wrapper-block-size", "0", "wrapper_block_size must be a positive multiple of 4"),
        ("--wrapper-block-size", "3", "wrapper_block_size must be a positive multiple of 4"),
        ("--wrapper-block-size", "-4", "wrapper_block_size must be a positive multiple of 4"),
        ("--num-iterations", "-1", "num_iterations must be an integer >= 0, got -1"),
        ("--max-wrapper-overhead", "0", "max_wrapper_overhead must be a number > 0"),
        ("--output-damping", "-0.5", "output_damping must be a number >= 0 (try 0.1), got -0.5"),
        ("--reconstruction-steps", "-1", "reconstruction_steps must be an integer >= 0, got -1"),
        ("--reconstruction-guard-fraction", "1.5", "guard_fraction must be in (0, 1), got 1.5"),
        ("--reconstruction-learning-rate", "0", "learning_rate must be a finite number > 0"),
        ("--distill-steps", "-2", "distill_steps must be an integer >= 0, got -2"),
        ("--distill-learning-rate", "inf", "distill_learning_rate must be a finite number > 0"),
    ],
)
def test_prune_bad_solver_option_names_field_value_and_rule(
    tiny_folder, text_file, tmp_path, capsys, option, value, message
):
    code = main(["prune", str(tiny_folder), "--dataset", str(text_file), option, value,
                 "--output", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    line = _error_line(capsys)
    assert message in line and f"(the option is {option})" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("foo: bar\n", "contains no ARMORModifier (modifiers found: none)"),
        ("stage: 5\n", "contains no ARMORModifier (modifiers found: none)"),
        ("s:\n  m:\n    ARMORModifier: {}\n", "contains no ARMORModifier (modifiers found: none)"),
        ("s:\n  pruning_modifiers: {}\n", "contains no ARMORModifier (modifiers found: none)"),
        (
            "x_stage:\n  pruning_modifiers:\n    NoSuchModifier: {}\n",
            "is not a valid llm-compressor recipe: No modifier of type 'NoSuchModifier' found.",
        ),
        (
            "x_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      targets: Linear\n"
            "      scheme: FP8_DYNAMIC\n",
            "contains no ARMORModifier (modifiers found: ['QuantizationModifier'])",
        ),
    ],
)
def test_prune_recipe_without_armor_fails_before_work(
    tiny_folder, text_file, tmp_path, capsys, yaml_text, message
):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml_text)
    code = main(["prune", str(tiny_folder), "--dataset", str(text_file), "--recipe", str(recipe),
                 "--output", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    line = _error_line(capsys)
    assert message in line, line
    assert not (tmp_path / "out").exists()


def test_prune_output_under_a_file_fails_before_loading(tiny_folder, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    loaded = []
    monkeypatch.setattr("armor_modifier.cli._load", lambda model: loaded.append(model))
    code = main(["prune", str(tiny_folder), "--output", str(blocker / "out")])
    assert code == 2
    assert f"{blocker} is a file, not a folder" in _error_line(capsys)
    assert loaded == []  # the model was never loaded


def test_export_dense_output_under_a_file(tiny_folder, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export-dense", str(tiny_folder), str(blocker / "out")]) == 2
    assert f"{blocker} is a file, not a folder" in _error_line(capsys)


def test_relative_model_path_that_does_not_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "nope_dir", "--output", "out"]) == 2
    assert _error_line(capsys) == (
        "armor: error: model folder nope_dir does not exist (pass a model folder, a hub id like "
        "org/name, or a benchmark model: smollm2, qwen2.5-coder-0.5b)"
    )
    assert not (tmp_path / "out").exists()


def test_threads_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "smollm2", "--threads", "-1"])
    assert exit_info.value.code == 2
    assert "--threads must be at least 1, got -1" in capsys.readouterr().err


def test_prune_recipe_with_a_bad_field_names_it(tiny_folder, text_file, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "armor_stage:\n  pruning_modifiers:\n    ARMORModifier:\n      wrapper_block_size: 30\n"
    )
    code = main(["prune", str(tiny_folder), "--dataset", str(text_file), "--recipe", str(recipe),
                 "--output", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    line = _error_line(capsys)
    assert "is not a valid llm-compressor recipe: wrapper_block_size must be a positive " in line
    assert "got 30" in line, line


def test_prune_recipe_refuses_flags_it_would_ignore(tiny_folder, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("armor_stage:\n  pruning_modifiers:\n    ARMORModifier: {}\n")
    code = main(["prune", str(tiny_folder), "--recipe", str(recipe), "--num-iterations", "3",
                 "--quantize", "w4a16", "--output", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    assert (
        "--recipe sets every ARMOR and quantization option itself; drop ['--num-iterations', "
        "'--quantize'] or write them into the recipe"
    ) in _error_line(capsys)


def test_prune_overhead_above_one_is_refused(tiny_folder, tmp_path, capsys):
    code = main(["prune", str(tiny_folder), "--max-wrapper-overhead", "10",
                 "--output", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    assert "max_wrapper_overhead is a fraction of each weight and at most 1" in _error_line(capsys)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("quantize", "fmt"), [("w4a16-gptq", "pack-quantized"), ("w8a8-gptq", "int-quantized")]
)
def test_prune_with_mask_preserving_gptq(tiny_folder, text_file, tmp_path, capsys, quantize, fmt):
    out = tmp_path / "armor"
    code = main(["prune", str(tiny_folder), "--dataset", str(text_file), "--num-samples", "4",
                 "--seq-len", str(SEQ_LEN), "--wrapper-block-size", "16", "--num-iterations", "1",
                 "--quantize", quantize, "--output", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "armor-ct" and qc["format"] == fmt
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["group_size"] == (64 if quantize == "w4a16-gptq" else None)
    assert weights["actorder"] is None


def test_gptq_reconstruction_without_gptq_is_refused(tiny_folder, tmp_path, capsys):
    code = main(["prune", str(tiny_folder), "--quantize", "w4a16", "--gptq-reconstruction-steps",
                 "3", "--output", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    assert (
        "gptq_reconstruction_steps=3 fits the cores GPTQ quantized, but quantize='w4a16': choose "
        "w4a16-gptq or w8a8-gptq"
    ) in _error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_prune_with_reconstruction_after_gptq(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "armor"
    code = main(["prune", str(tiny_folder), "--dataset", str(text_file), "--num-samples", "8",
                 "--seq-len", str(SEQ_LEN), "--wrapper-block-size", "16", "--num-iterations", "1",
                 "--reconstruction-steps", "0", "--quantize", "w4a16-gptq",
                 "--gptq-reconstruction-steps", "2", "--output", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    recipe = (out / "recipe.yaml").read_text()
    assert "ARMORGPTQModifier" in recipe and "reconstruction_steps: 2" in recipe, recipe


def test_prune_with_propagation_and_reconstruction(tiny_folder, text_file, tmp_path, capsys):
    out = tmp_path / "armor"
    code = main(["prune", str(tiny_folder), "--dataset", str(text_file), "--num-samples", "8",
                 "--seq-len", str(SEQ_LEN), "--wrapper-block-size", "16", "--num-iterations", "1",
                 "--propagate-within-layer", "--reconstruction-steps", "4",
                 "--reconstruction-guard-fraction", "0.25", "--reconstruction-eval-every", "2",
                 "--output", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    recipe = json.loads((out / "config.json").read_text())["quantization_config"]["armor"]
    recorded = recipe["recipe"]
    assert recorded["propagate_within_layer"] is True
    assert recorded["reconstruction_steps"] == 4
    assert recorded["reconstruction_guard_fraction"] == 0.25


def _prune_args(tiny_folder, text_file, out, *extra):
    return ["prune", str(tiny_folder), "--dataset", str(text_file), "--num-samples", "4",
            "--seq-len", str(SEQ_LEN), "--wrapper-block-size", "16", "--num-iterations", "2",
            "--output", str(out), *extra]  # fmt: skip


def test_prune_resume_loads_the_layers_done_and_writes_the_same_files(
    tiny_folder, text_file, tmp_path, capsys
):
    """A progress folder outside the output stays; a rerun loads every layer from it (layer files
    not rewritten) and writes byte-identical armor-ct files; inside the output (the default) it
    does not block the rerun and goes with the old folder once the new one is in place."""
    import shutil

    progress = tmp_path / "progress"
    first = tmp_path / "first"
    assert main(_prune_args(tiny_folder, text_file, first, "--resume", str(progress))) == 0
    layers = sorted(progress.glob("model.layers.*.safetensors"))
    assert [p.name for p in layers] == ["model.layers.0.safetensors", "model.layers.1.safetensors"]
    written = {p: p.stat().st_mtime_ns for p in layers}
    second = tmp_path / "second"
    assert main(_prune_args(tiny_folder, text_file, second, "--resume", str(progress))) == 0
    assert {p: p.stat().st_mtime_ns for p in layers} == written  # loaded, not solved again
    for file in first.glob("*.safetensors"):
        assert file.read_bytes() == (second / file.name).read_bytes(), file.name

    third = tmp_path / "third"
    shutil.copytree(progress, third / "armor-progress")  # as a killed `--resume` run leaves it
    assert main(_prune_args(tiny_folder, text_file, third, "--resume")) == 0
    assert not (third / "armor-progress").exists()
    for file in first.glob("*.safetensors"):
        assert file.read_bytes() == (third / file.name).read_bytes(), file.name
    capsys.readouterr()
    assert main(["prune", str(tiny_folder), "--recipe", "r.yaml", "--resume",
                 "--output", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "--resume with --recipe" in _error_line(capsys)
