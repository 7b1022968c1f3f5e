"""The ``armor`` command line: help, the bad-input contract, and a tiny end-to-end prune."""

import json
import random

import pytest

from armor_modifier.cli import main
from tiny_llama import SEQ_LEN, VOCAB, save_tiny_llama


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(" ".join(f"w{rng.randrange(4, VOCAB)}" for _ in range(4000)))
    return path


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
    assert (
        main(
            [
                "eval",
                str(out),
                "--dataset",
                str(text_file),
                "--seq-len",
                str(SEQ_LEN),
                "--max-windows",
                "2",
                "--split",
                "test",
            ]
        )
        == 0
    )
    assert "| " in capsys.readouterr().out
    dense = tmp_path / "dense"
    assert main(["export-dense", str(out), str(dense)]) == 0
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
