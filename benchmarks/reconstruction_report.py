"""Table and plots of the decoder-layer reconstruction runs (issue 12) from side-by-side rows.

Reads the JSON lines that ``benchmarks/smollm2_side_by_side.py --also-valid --tag=...`` wrote and
writes ``OUT.md`` (test and valid tables, the gap to dense that each row closes of SparseGPT's,
reconstruction time and mean held-out gain) and ``OUT.png``: perplexity against refinement steps
(0 = per-Linear ARMOR) and the mean held-out layer-error ratio against the step, from each layer's
guard history.

Usage::

    python benchmarks/reconstruction_report.py --results benchmarks/results/rec.jsonl \
        --out benchmarks/results/rec

Published figures live in ``docs/results/reconstruction.json``, rendered into docs/results.md by
``benchmarks/results_doc.py``; the plot linked there is docs/benchmark_reconstruction.png.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from smollm2_side_by_side import table_lines


def load(results: Path) -> list[dict]:
    """The newest line per label: dense and SparseGPT first, then by calibration and steps."""
    rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
    latest = list({r["method"]: r for r in rows}.values())

    def key(r: dict) -> tuple:
        m = r["method"]
        base = 0 if m.startswith("dense") else 1 if m.startswith("sparsegpt-cal") else 2
        return (base, "-cal16" in m, "-mixed" in m, m.startswith("armor"), steps_of(m) or 0, m)

    return sorted(latest, key=key)


def extra_lines(rows: list[dict]) -> list[str]:
    lines = ["| method | calibration | reconstruction s | layers refined | mean held-out gain |",
             "|---|---|---|---|---|"]
    for r in rows:
        rec = r.get("reconstruction")
        setup = r["setup"]
        cal = f"{setup['num_samples']} x {setup['seq_len']} {setup.get('calibration', 'wikivital')}"
        if rec:
            lines.append(f"| {r['method']} | {cal} | {rec['seconds']:.0f} | "
                         f"{rec['refined']}/{rec['layers']} | {rec['mean_gain']:.1%} |")
        else:
            lines.append(f"| {r['method']} | {cal} | - | - | - |")
    return lines


def steps_of(method: str) -> int | None:
    """Refinement steps of a per-Linear-ARMOR b32 row with 64 windows (0: none), else None."""
    match = re.search(r"^armor-output-b32-it10-rec(\d+)(-cal64)?$", method)
    if match:
        return int(match.group(1))
    return 0 if re.fullmatch(r"armor-output-b32-it10(-cal64)?", method) else None


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    curve = sorted((s, r) for r in rows if r["method"].endswith("-cal64")
                   and (s := steps_of(r["method"])) is not None)
    for text, marker in (("wikivital", "o"), ("ptb", "s")):
        xs = [s for s, _ in curve]
        left.plot(xs, [r["ppl"][text] for _, r in curve], marker=marker, label=f"{text} test")
        left.plot(xs, [r["ppl_valid"][text] for _, r in curve], marker=marker, ls="--",
                  label=f"{text} valid")
    dense = next((r for r in rows if r["method"].startswith("dense")), None)
    if dense:
        for text in ("wikivital", "ptb"):
            left.axhline(dense["ppl"][text], color="grey", lw=0.8, ls=":")
    left.set_yscale("log")
    left.set_xlabel("Adam steps per decoder layer (0: per-Linear ARMOR)")
    left.set_ylabel("perplexity (64 windows)")
    left.set_title("ARMOR b32 + reconstruction, 64 x 512 calibration")
    left.legend(fontsize=7)
    left.grid(True, which="both", alpha=0.3)
    for r in rows:
        histories = r.get("reconstruction", {}).get("histories")
        if not histories:
            continue
        steps = sorted({s for h in histories for s, _ in h})
        ratios = []
        for step in steps:
            per_layer = [dict(h).get(step) / h[0][1] for h in histories
                         if dict(h).get(step) is not None and h[0][1] > 0]
            ratios.append(sum(per_layer) / len(per_layer))
        right.plot(steps, ratios, marker=".", label=r["method"])
    right.set_xlabel("Adam step")
    right.set_ylabel("held-out layer error / unrefined (mean over layers)")
    right.set_title("held-out (guard) error during refinement")
    right.legend(fontsize=7)
    right.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--notes", type=Path, default=None)
    args = ap.parse_args()
    rows = load(args.results)
    setup = rows[0]["setup"]
    lines = [
        "# Decoder-layer reconstruction on SmolLM2-135M-Instruct (Q4_1)",
        "",
        f"Measured {setup['date']} on this project's 2-core CPU machine with "
        "`benchmarks/smollm2_side_by_side.py` (commands below); table and plot by "
        "`benchmarks/reconstruction_report.py`. Evaluation: the first "
        f"{setup['eval_windows']} windows of {setup['seq_len']} tokens of each text. Row labels "
        "end in the calibration set: `-cal64` = 64 x 512 WikiVital-train tokens, `-cal16` = 16 x "
        "512, `-mixed64` = 32 x 512 WikiVital-train + 32 x 512 PTB-train tokens (PTB is then no "
        "longer out of domain). Gap closed: the share of SparseGPT's perplexity gap to dense that "
        "a row removes, against the dense and SparseGPT rows of the same table (SparseGPT "
        "calibrated on WikiVital alone, also for the mixed row).",
        "",
        "## Test splits (reported)",
        "",
        *table_lines(rows),
        "",
        "## Valid splits (defaults are chosen here)",
        "",
        *table_lines(rows, "ppl_valid"),
        "",
        "## Reconstruction cost and held-out gain",
        "",
        *extra_lines(rows),
        "",
        f"![perplexity and held-out error against refinement steps]({args.out.name}.png)",
    ]
    if args.notes is not None:
        lines += ["", args.notes.read_text().rstrip()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
