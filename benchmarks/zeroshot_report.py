"""Zero-shot table and plot from ``armor eval --tasks ... --output NAME.json`` files.

One row per JSON file (the method is the file's stem, the order the command line's): WikiVital and
PTB perplexity where the file has them, each task's headline accuracy (``acc_norm`` where lm-eval
defines it, else ``acc``) with its standard error, the mean, and the share of SparseGPT's mean
accuracy drop from dense that the row recovers (``-`` when that drop is itself within one
combined standard error); the same for the mean without BoolQ, whose accuracy on small models
tracks their bias towards "yes" or "no" more than reading. A difference to SparseGPT smaller than
one combined standard error ``sqrt(se_a^2 + se_b^2)`` is marked with ``~`` (within noise).
With per-example scores in the files, two more tables: each row against SparseGPT on the same
examples (paired), and how closely each row's answers follow the dense model's
(:func:`fidelity`: same choice, choice KL).

Usage::

    python benchmarks/zeroshot_report.py results/dense.json results/sparsegpt.json \\
        results/armor.json --plot docs/benchmark_zeroshot.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def load(paths: list[Path]) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in paths}


def _ppl(row: dict, text: str) -> str:
    found = [v["ppl"] for k, v in row.get("perplexity", {}).items() if k.startswith(text + "/")]
    return f"{found[0]:.2f}" if found else "-"


def _within(a: dict, b: dict) -> bool:
    return abs(a["value"] - b["value"]) < math.hypot(a["stderr"], b["stderr"])


def mean_without(zs: dict, task: str) -> tuple[float, float]:
    """The mean and its standard error over the tasks other than ``task``."""
    from armor_harness.zeroshot import mean_of_tasks

    rest = [s for s in zs["scores"] if s["task"] != task]
    return mean_of_tasks([s["value"] for s in rest], [s["stderr"] for s in rest])


def recovered(mean: float, base: tuple[float, float], top: tuple[float, float]) -> str:
    """Share of the baseline's drop from dense that ``mean`` recovers; ``-`` when that drop is
    within one combined standard error (a share of noise means nothing)."""
    drop = top[0] - base[0]
    if drop <= math.hypot(base[1], top[1]):
        return "- (drop within noise)"
    return f"{100 * (mean - base[0]) / drop:.0f} %"


def paired(a: dict, b: dict, skip: str | None = None) -> tuple[float, float] | None:
    """Mean over tasks of ``a - b`` and its standard error from the per-example scores of both
    (the same rows), or ``None`` when a file has none. Per task the standard error is that of the
    mean paired difference, ``sd(d) / sqrt(n)``; across tasks ``sqrt(sum se_t^2) / k``."""
    diffs, errors = [], []
    for sa in a["scores"]:
        if sa["task"] == skip:
            continue
        sb = next(x for x in b["scores"] if x["task"] == sa["task"])
        if not sa.get("correct") or not sb.get("correct"):
            return None
        d = [sa["correct"][row] - sb["correct"][row] for row in sa["correct"]]
        mean = sum(d) / len(d)
        var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
        diffs.append(mean)
        errors.append(math.sqrt(var / len(d)))
    k = len(diffs)
    return sum(diffs) / k, math.sqrt(sum(e**2 for e in errors)) / k


def fidelity(row: dict, dense: dict) -> tuple[float, float] | None:
    """How closely a model's answers follow the dense model's on the same examples, from the
    per-example choice log-likelihoods of both (``None`` when a file has none): the share of
    examples whose highest-likelihood choice is dense's, and the mean over examples of
    ``KL(softmax(dense's choice log-likelihoods) || softmax(the row's))`` in nats, each averaged
    over the tasks. Neither needs the gold answer, so both are less noisy than accuracy."""
    agree, kls = [], []
    for sa in row["scores"]:
        sb = next(x for x in dense["scores"] if x["task"] == sa["task"])
        if not sa.get("loglikelihoods") or not sb.get("loglikelihoods"):
            return None
        same, kl = [], []
        for key, q in sa["loglikelihoods"].items():
            p = sb["loglikelihoods"][key]
            same.append(float(max(range(len(q)), key=q.__getitem__)
                              == max(range(len(p)), key=p.__getitem__)))  # fmt: skip
            log_p, log_q = _log_softmax(p), _log_softmax(q)
            kl.append(sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q, strict=True)))
        agree.append(sum(same) / len(same))
        kls.append(sum(kl) / len(kl))
    return sum(agree) / len(agree), sum(kls) / len(kls)


def _log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - total for v in values]


def fidelity_table(rows: dict[str, dict], dense: str = "dense") -> str:
    """Markdown: agreement with dense's choice and the choice KL to dense, per row."""
    if dense not in rows:
        return ""
    lines = ["| method | same choice as dense | choice KL to dense (nats) |", "|---|---|---|"]
    for name, row in rows.items():
        if name == dense:
            continue
        found = fidelity(row["zero_shot"], rows[dense]["zero_shot"])
        if found is None:
            return ""
        lines.append(f"| {name} | {100 * found[0]:.1f} % | {found[1]:.4f} |")
    return "\n".join(lines)


def paired_table(rows: dict[str, dict], baseline: str = "sparsegpt") -> str:
    """Markdown: each row minus the baseline, paired on the same examples (points)."""
    if baseline not in rows:
        return ""
    base = rows[baseline]["zero_shot"]
    lines = [
        f"| method | mean - {baseline}, 7 tasks (paired) | 6 tasks, no BoolQ (paired) |",
        "|---|---|---|",
    ]
    for name, row in rows.items():
        if name == baseline:
            continue
        cells = [name]
        for skip in (None, "boolq"):
            found = paired(row["zero_shot"], base, skip)
            cells.append("-" if found is None else f"{100 * found[0]:+.2f} ± {100 * found[1]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: dict[str, dict], baseline: str = "sparsegpt", dense: str = "dense") -> str:
    """The markdown table (accuracies in %)."""
    first = next(iter(rows.values()))["zero_shot"]
    tasks = [(s["task"], s["metric"]) for s in first["scores"]]
    head = ["method", "WikiVital ppl", "PTB ppl"]
    head += [f"{t} ({'norm' if m == 'acc_norm' else 'acc'})" for t, m in tasks]
    head += ["mean", "drop recovered", "mean w/o BoolQ", "drop recovered w/o BoolQ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows.get(baseline, {}).get("zero_shot")
    top = rows.get(dense, {}).get("zero_shot")
    for name, row in rows.items():
        zs = row["zero_shot"]
        cells = [name, _ppl(row, "wikivital"), _ppl(row, "ptb")]
        for score in zs["scores"]:
            mark = ""
            if base is not None and name not in (baseline, dense):
                other = next(s for s in base["scores"] if s["task"] == score["task"])
                mark = " ~" if _within(score, other) else ""
            cells.append(f"{100 * score['value']:.1f} ± {100 * score['stderr']:.1f}{mark}")
        cells.append(f"**{100 * zs['mean']:.2f}** ± {100 * zs['mean_stderr']:.2f}")
        other = name in (baseline, dense) or base is None or top is None
        cells.append("-" if other else recovered(
            zs["mean"], (base["mean"], base["mean_stderr"]), (top["mean"], top["mean_stderr"])
        ))  # fmt: skip
        no_boolq = mean_without(zs, "boolq")
        cells.append(f"{100 * no_boolq[0]:.2f} ± {100 * no_boolq[1]:.2f}")
        cells.append("-" if other else recovered(
            no_boolq[0], mean_without(base, "boolq"), mean_without(top, "boolq")
        ))  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path) -> None:
    """Grouped bars: one group per task (and the mean), one bar per method, standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(rows.values()))["zero_shot"]
    labels = [s["task"] for s in first["scores"]] + ["mean"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for i, (name, row) in enumerate(rows.items()):
        zs = row["zero_shot"]
        values = [100 * s["value"] for s in zs["scores"]] + [100 * zs["mean"]]
        errors = [100 * s["stderr"] for s in zs["scores"]] + [100 * zs["mean_stderr"]]
        xs = [k + (i - (len(rows) - 1) / 2) * width for k in range(len(labels))]
        ax.bar(xs, values, width, yerr=errors, capsize=2, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("accuracy % (acc_norm where defined)")
    ax.legend(fontsize=8, ncol=len(rows))
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="armor eval --output files")
    parser.add_argument("--plot", type=Path, help="also write the bar chart to this PNG")
    args = parser.parse_args()
    rows = load(args.results)
    print(table(rows))
    for extra in (paired_table(rows), fidelity_table(rows)):
        if extra:
            print("\n" + extra)
    if args.plot is not None:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
