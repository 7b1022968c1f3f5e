"""SparseGPT's zero-shot drop that a method recovers, pooled over calibration seeds, with a
bootstrap interval over the examples.

One seed's share recovered, ``(method - SparseGPT) / (dense - SparseGPT)`` of the task means, is
noisy at a few hundred examples per task: its numerator and denominator are differences of a few
points with standard errors near one point. This script pools the seeds given (each a SparseGPT
file and a method file, both ``armor eval --tasks ... --output`` files on the same examples as the
dense file) into one share,

    share = mean over seeds (method_s - SparseGPT_s) / mean over seeds (dense - SparseGPT_s),

with every mean the mean over tasks of the task accuracies (BoolQ left out by default, as the
results tables' "w/o BoolQ" columns do), and resamples the examples to say how sure that share
is: each resample draws, task by task, as many examples as the task has, with replacement, the
same draw for every file (the comparison stays paired), and recomputes the share. The interval is
the resamples' 5th to 95th percentile; "resamples at or above the target" is the share of
resamples whose share reaches ``--target`` (resamples in which SparseGPT loses nothing have no
share and are left out; ``resamples_without_drop`` counts them). The resampling covers the
examples' noise only: the seeds' spread shows in the per-seed shares printed beside.

Usage::

    python benchmarks/zeroshot_pooled.py --dense t/dense.json \\
        --seed t/sparsegpt-s0.json t/armor-s0.json --seed t/sparsegpt-s1.json t/armor-s1.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

#: Per task: example id -> the example's headline score (1.0 right, 0.0 wrong).
Scores = dict[str, dict[str, float]]


def scores_of(run: dict, skip: tuple[str, ...]) -> Scores:
    """The per-example headline scores of an ``armor eval --output`` file, tasks in ``skip`` left
    out. :raises SystemExit: when the file holds no per-example scores."""
    found = {
        s["task"]: s.get("correct") for s in run["zero_shot"]["scores"] if s["task"] not in skip
    }
    missing = [task for task, correct in found.items() if not correct]
    if missing:
        raise SystemExit(f"no per-example scores for {missing}: rerun armor eval with --output")
    return found


def _mean(scores: Scores, draw: dict[str, list[str]]) -> float:
    return sum(sum(scores[t][k] for k in keys) / len(keys) for t, keys in draw.items()) / len(draw)


def pooled_share(
    dense: Scores, seeds: list[tuple[Scores, Scores]], draw: dict[str, list[str]]
) -> float:
    """The pooled share of SparseGPT's drop recovered on the examples ``draw`` names (task ->
    example ids, repeats allowed); ``nan`` when SparseGPT's pooled drop is not positive."""
    top = _mean(dense, draw)
    drop = sum(top - _mean(base, draw) for base, _ in seeds)
    gain = sum(_mean(method, draw) - _mean(base, draw) for base, method in seeds)
    return gain / drop if drop > 0 else float("nan")


def check_same_examples(dense: Scores, files: list[Scores], names: list[str]) -> None:
    """:raises SystemExit: naming the file whose tasks or examples differ from the dense file's."""
    for scores, name in zip(files, names, strict=True):
        if scores.keys() != dense.keys() or any(scores[t].keys() != dense[t].keys() for t in dense):
            raise SystemExit(
                f"{name} was not scored on the dense file's tasks and examples: "
                "evaluate every file with the same --tasks, --half and --limit"
            )


def every_example(dense: Scores) -> dict[str, list[str]]:
    """The draw that takes each of every task's examples once (task -> sorted example ids)."""
    return {task: sorted(dense[task]) for task in dense}


def bootstrap(
    dense: Scores, seeds: list[tuple[Scores, Scores]], resamples: int, rng_seed: int = 0
) -> list[float]:
    """``resamples`` pooled shares, each on one paired resample of every task's examples."""
    rng = random.Random(rng_seed)
    ids = every_example(dense)
    shares = []
    for _ in range(resamples):
        draw = {task: rng.choices(keys, k=len(keys)) for task, keys in ids.items()}
        shares.append(pooled_share(dense, seeds, draw))
    return shares


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by linear interpolation between order statistics."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarise(
    dense: Scores,
    seeds: list[tuple[Scores, Scores]],
    resamples: int,
    target: float,
    rng_seed: int = 0,
) -> dict:
    """Per-seed and pooled shares, the pooled share's 90 % bootstrap interval, and the share of
    resamples at or above ``target``."""
    every = every_example(dense)
    share = pooled_share(dense, seeds, every)
    drawn = [] if math.isnan(share) else bootstrap(dense, seeds, resamples, rng_seed)
    shares = [s for s in drawn if not math.isnan(s)]
    if not shares:
        raise SystemExit(
            "SparseGPT's pooled accuracy is not below dense's on these examples: there is no "
            "drop to recover a share of (evaluate more examples, or report the paired difference)"
        )
    return {
        "tasks": sorted(dense),
        "examples": sum(len(v) for v in every.values()),
        "per_seed": [round(pooled_share(dense, [pair], every), 4) for pair in seeds],
        "pooled": round(share, 4),
        "interval_90": [round(percentile(shares, 0.05), 4), round(percentile(shares, 0.95), 4)],
        "target": target,
        "resamples_at_or_above_target": round(sum(s >= target for s in shares) / len(shares), 4),
        "resamples": resamples,
        "resamples_without_drop": len(drawn) - len(shares),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, required=True, help="the dense model's eval file")
    parser.add_argument(
        "--seed",
        nargs=2,
        action="append",
        type=Path,
        required=True,
        metavar=("SPARSEGPT", "METHOD"),
        help="one calibration seed's two files",
    )
    parser.add_argument("--skip", default="boolq", help="comma-separated tasks left out ('' none)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--target", type=float, default=0.5, help="share to compare against")
    parser.add_argument("--json", type=Path, help="write the summary here too")
    args = parser.parse_args()
    if args.resamples < 1:
        raise SystemExit(f"--resamples must be at least 1, got {args.resamples}")
    skip = tuple(t for t in args.skip.split(",") if t)
    dense = scores_of(json.loads(args.dense.read_text()), skip)
    seeds, names, files = [], [], []
    for base_path, method_path in args.seed:
        pair = (
            scores_of(json.loads(base_path.read_text()), skip),
            scores_of(json.loads(method_path.read_text()), skip),
        )
        seeds.append(pair)
        files += pair
        names += [str(base_path), str(method_path)]
    check_same_examples(dense, files, names)
    summary = summarise(dense, seeds, args.resamples, args.target)
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
