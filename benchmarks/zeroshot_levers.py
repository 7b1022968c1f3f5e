"""The accuracy levers' table: ``armor eval --output`` files -> a ``docs/results/`` results file.

Each row is one evaluation file (``NAME=FILE``, the order of the command line) with what made it
and what that cost (``--what NAME=TEXT``, ``--seconds NAME=S``). A row gets the perplexities the
file holds, each task's headline accuracy and standard error, the seven-task mean, the share of
SparseGPT's mean drop from dense it recovers (``-`` when that drop is within noise), the mean
paired difference to SparseGPT on the same examples, the same three without BoolQ, and how
closely it follows the dense model's answers (``zeroshot_report.fidelity``: same choice, choice
KL). The header (title, protocol, command) comes from ``--header``, a JSON file, so that the
command written down is the one that ran.

Usage::

    python benchmarks/zeroshot_levers.py --header H.json \\
        --output docs/results/zeroshot_levers.json \\
        dense=t/dense.json sparsegpt=t/sparsegpt.json armor=t/armor.json \\
        --what armor="armor prune smollm2 --num-iterations 10" --seconds armor=309
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zeroshot_report import fidelity, mean_without, paired, recovered  # noqa: E402


def _pairs(items: list[str], what: str) -> dict[str, str]:
    found = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{what} {item!r} is not NAME=VALUE")
        found[name] = value
    return found


def rows_of(files: dict[str, Path], what: dict[str, str], seconds: dict[str, str]) -> list[dict]:
    """One results row per evaluation file (fractions, not percentages)."""
    data = {name: json.loads(path.read_text()) for name, path in files.items()}
    dense = data.get("dense", {}).get("zero_shot")
    base = data.get("sparsegpt", {}).get("zero_shot")
    rows = []
    for name, run in data.items():
        zs = run["zero_shot"]
        row: dict = {
            "table": "main",
            "method": name,
            "what": what.get(name, ""),
            "perplexity": {k: {"ppl": round(v["ppl"], 2)} for k, v in run["perplexity"].items()},
            "zero_shot": {
                "mean": round(zs["mean"], 4),
                "mean_stderr": round(zs["mean_stderr"], 4),
                "scores": [{k: (round(s[k], 4) if isinstance(s[k], float) else s[k])
                            for k in ("task", "metric", "value", "stderr", "examples")}
                           for s in zs["scores"]],  # fmt: skip
            },
        }
        if name in seconds:
            row["seconds"] = float(seconds[name])
        if any(s["task"] == "boolq" for s in zs["scores"]):
            no_boolq = mean_without(zs, "boolq")
            row["mean_without_boolq"] = round(no_boolq[0], 4)
            row["mean_without_boolq_stderr"] = round(no_boolq[1], 4)
            if dense is not None and base is not None and name not in ("dense", "sparsegpt"):
                row["drop_recovered_without_boolq"] = recovered(
                    no_boolq[0], mean_without(base, "boolq"), mean_without(dense, "boolq")
                )
            found = paired(zs, base, skip="boolq") if base is not None else None
            if found is not None and name != "sparsegpt":
                row["paired_without_boolq"] = {"mean": round(found[0], 4),
                                               "stderr": round(found[1], 4)}  # fmt: skip
        if dense is not None and base is not None and name not in ("dense", "sparsegpt"):
            row["drop_recovered"] = recovered(zs["mean"], (base["mean"], base["mean_stderr"]),
                                              (dense["mean"], dense["mean_stderr"]))  # fmt: skip
        if base is not None and name != "sparsegpt":
            found = paired(zs, base)
            if found is not None:
                row["paired"] = {"mean": round(found[0], 4), "stderr": round(found[1], 4)}
        if dense is not None and name != "dense":
            found = fidelity(zs, dense)
            if found is not None:
                row["same_choice"] = round(found[0], 4)
                row["choice_kl"] = round(found[1], 4)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="NAME=armor-eval-output.json, in row order")
    parser.add_argument("--header", type=Path, required=True, help="the results file's header")
    parser.add_argument("--output", type=Path, required=True, help="the results file to write")
    parser.add_argument("--what", action="append", default=[], help="NAME=what made the row")
    parser.add_argument("--seconds", action="append", default=[], help="NAME=wall seconds")
    args = parser.parse_args()
    files = {name: Path(path) for name, path in _pairs(args.files, "file").items()}
    rows = rows_of(files, _pairs(args.what, "--what"), _pairs(args.seconds, "--seconds"))
    header = json.loads(args.header.read_text())
    args.output.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.output} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
