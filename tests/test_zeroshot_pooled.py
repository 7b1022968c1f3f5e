"""benchmarks/zeroshot_pooled.py: the pooled share of SparseGPT's drop recovered, against shares
counted by hand on made-up per-example scores."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "zeroshot_pooled.py"


@pytest.fixture(scope="module")
def pooled():
    spec = importlib.util.spec_from_file_location("zeroshot_pooled", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scores(**tasks: str) -> dict[str, dict[str, float]]:
    """``task="1101"`` -> example ids "0".."3" with those scores."""
    return {task: {str(i): float(c) for i, c in enumerate(bits)} for task, bits in tasks.items()}


DENSE = scores(piqa="11111111", arc="11110000")
BASE0 = scores(piqa="11110000", arc="11000000")
METHOD0 = scores(piqa="11111100", arc="11100000")
BASE1 = scores(piqa="11111100", arc="10000000")
METHOD1 = scores(piqa="11111100", arc="11000000")
EVERY = {task: sorted(DENSE[task]) for task in DENSE}


def test_pooled_share_counted_by_hand(pooled):
    # seed 0: task means dense (1 + .5) / 2 = .75, SparseGPT (.5 + .25) / 2 = .375, method
    # (.75 + .375) / 2 = .5625 -> drop .375, gain .1875; seed 1: SparseGPT (.75 + .125) / 2
    # = .4375, method (.75 + .25) / 2 = .5 -> drop .3125, gain .0625
    assert pooled.pooled_share(DENSE, [(BASE0, METHOD0)], EVERY) == pytest.approx(0.5)
    assert pooled.pooled_share(DENSE, [(BASE1, METHOD1)], EVERY) == pytest.approx(0.2)
    both = pooled.pooled_share(DENSE, [(BASE0, METHOD0), (BASE1, METHOD1)], EVERY)
    assert both == pytest.approx((0.1875 + 0.0625) / (0.375 + 0.3125))


def test_a_draw_with_repeats_weights_the_repeated_example(pooled):
    # piqa examples 0, 0, 5, 6: dense 1, SparseGPT (1 + 1 + 0 + 0) / 4, method (1 + 1 + 1 + 0) / 4
    draw = {"piqa": ["0", "0", "5", "6"]}
    assert pooled.pooled_share(DENSE, [(BASE0, METHOD0)], draw) == pytest.approx(0.25 / 0.5)


def test_no_drop_gives_nan(pooled):
    assert math.isnan(pooled.pooled_share(DENSE, [(DENSE, METHOD0)], EVERY))


def test_method_equal_to_dense_recovers_everything_in_every_resample(pooled):
    found = pooled.summarise(DENSE, [(BASE0, DENSE), (BASE1, DENSE)], resamples=200, target=0.5)
    assert found["pooled"] == 1.0
    assert found["interval_90"] == [1.0, 1.0]
    assert found["resamples_at_or_above_target"] == 1.0


def test_interval_holds_the_pooled_share_and_is_reproducible(pooled):
    pairs = [(BASE0, METHOD0), (BASE1, METHOD1)]
    first = pooled.summarise(DENSE, pairs, resamples=300, target=0.5)
    assert first == pooled.summarise(DENSE, pairs, resamples=300, target=0.5)
    low, high = first["interval_90"]
    assert low < first["pooled"] < high
    assert first["per_seed"] == [0.5, 0.2]


def test_no_drop_at_all_is_refused_by_name(pooled):
    with pytest.raises(SystemExit, match="no drop to recover"):
        pooled.summarise(DENSE, [(DENSE, METHOD0)], resamples=20, target=0.5)


def test_percentile_against_sorted_values(pooled):
    assert pooled.percentile([3.0, 1.0, 2.0, 4.0, 5.0], 0.5) == 3.0
    assert pooled.percentile([1.0, 2.0], 0.25) == pytest.approx(1.25)


def test_other_examples_are_refused(pooled):
    other = scores(piqa="1111111", arc="11110000")
    with pytest.raises(SystemExit, match="same --tasks, --half and --limit"):
        pooled.check_same_examples(DENSE, [BASE0, other], ["base.json", "other.json"])


def _file(path: Path, per_task: dict[str, dict[str, float]]) -> Path:
    run = {"zero_shot": {"scores": [{"task": t, "correct": c} for t, c in per_task.items()]}}
    path.write_text(json.dumps(run))
    return path


def test_command_line_leaves_boolq_out_and_writes_json(tmp_path):
    with_boolq = [{**s, "boolq": {"0": 0.0, "1": 0.0}} for s in (DENSE, BASE0, METHOD0)]
    with_boolq[1]["boolq"] = {"0": 1.0, "1": 1.0}  # SparseGPT far ahead on BoolQ: ignored
    files = [
        _file(tmp_path / f"{n}.json", s) for n, s in zip(("d", "b", "m"), with_boolq, strict=True)
    ]
    out = tmp_path / "summary.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dense",
            str(files[0]),
            "--seed",
            str(files[1]),
            str(files[2]),
            "--resamples",
            "50",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["pooled"] == 0.5
    assert json.loads(out.read_text())["tasks"] == ["arc", "piqa"]


def test_command_line_names_a_file_without_per_example_scores(tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"zero_shot": {"scores": [{"task": "piqa"}]}}))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dense", str(bare), "--seed", str(bare), str(bare)],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "no per-example scores for ['piqa']" in done.stderr
