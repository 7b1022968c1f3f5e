"""What resuming costs: ``armor prune --resume`` on a real model, uninterrupted, killed, resumed.

Three runs of the same command (``armor prune MODEL --resume DIR --output OUT`` plus ``--args``):

1. uninterrupted, with a progress folder: its wall time, and the seconds the progress itself
   cost (fingerprints, reads, writes; from the summary line): the *writing cost*;
2. the same command with a fresh folder, killed with SIGKILL as soon as layer ``--kill-after``'s
   progress file exists;
3. the same command again (the folder of run 2): it loads layers 0..k and solves the rest.

*Time to reach layer k*: from the start of a run to the first log line of layer ``k + 1``'s first
Linear, minus that Linear's own solve time (printed in the line), for run 1 and run 3; their
ratio is the *resume cost*. Finally the armor-ct files of runs 1 and 3 are compared byte for byte.

Usage::

    python benchmarks/resume_cost.py --model smollm2 --kill-after 14 \\
        --args "--wrapper-block-size 32 --num-iterations 10" --json rows.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SOLVE_LINE = re.compile(r"ARMOR (model\.layers\.(\d+)\.\S+) .*, ([\d.]+) s$")
PROGRESS_LINE = re.compile(
    r"ARMOR progress .*: (\d+) layers loaded(?: \((\d+) fast-forwarded\))?, (\d+) solved, "
    r"([\d.]+) s"
)


def run(command: list[str], kill_file: Path | None, reach_layer: int) -> dict:
    """Run ``command``; note when layer ``reach_layer + 1`` first logs; SIGKILL it once
    ``kill_file`` exists."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, bufsize=1)  # fmt: skip
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = False
    while child.poll() is None:
        if kill_file is not None and kill_file.exists():
            child.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    child.wait()
    reader.join(timeout=10)
    row: dict = {"killed": killed, "seconds": time.perf_counter() - start,
                 "returncode": child.returncode}  # fmt: skip
    for at, line in lines:
        solve = SOLVE_LINE.search(line)
        if solve and int(solve.group(2)) == reach_layer + 1 and "reach_s" not in row:
            row["reach_s"] = at - float(solve.group(3))
        progress = PROGRESS_LINE.search(line)
        if progress:
            row["loaded"], row["solved"] = int(progress.group(1)), int(progress.group(3))
            row["skipped"] = int(progress.group(2) or 0)
            row["progress_s"] = float(progress.group(4))
    if child.returncode not in (0, -signal.SIGKILL):
        row["tail"] = [line for _, line in lines[-20:]]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--kill-after", type=int, default=14, help="layer k")
    parser.add_argument("--args", default="--wrapper-block-size 32 --num-iterations 10",
                        help="further armor prune options (one string)")  # fmt: skip
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="resume-cost-"))
    armor = [sys.executable, "-m", "armor_modifier.cli", "prune", args.model,
             "--threads", "1", *shlex.split(args.args)]  # fmt: skip
    try:
        first = run([*armor, "--resume", str(work / "p1"), "--output", str(work / "o1")],
                    None, args.kill_after)  # fmt: skip
        kill_file = work / "p2" / f"model.layers.{args.kill_after}.safetensors"
        killed = run([*armor, "--resume", str(work / "p2"), "--output", str(work / "o2")],
                     kill_file, args.kill_after)  # fmt: skip
        resumed = run([*armor, "--resume", str(work / "p2"), "--output", str(work / "o2")],
                      None, args.kill_after)  # fmt: skip
        files = sorted(p.name for p in (work / "o1").glob("*.safetensors"))
        identical = all(
            (work / "o1" / f).read_bytes() == (work / "o2" / f).read_bytes() for f in files
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "model": args.model,
        "options": args.args,
        "kill_after": args.kill_after,
        "first": first,
        "killed": killed,
        "resumed": resumed,
        "writing_share": first.get("progress_s", float("nan")) / first["seconds"],
        "resume_share": resumed.get("reach_s", float("nan")) / first.get("reach_s", float("nan")),
        "identical_armor_ct": identical,
    }
    print(json.dumps(result, indent=1))
    print(
        f"writing cost {result['writing_share']:.2%} of the uninterrupted run; resumed run reached "
        f"layer {args.kill_after} in {result['resume_share']:.1%} of the first run's time; "
        f"armor-ct files identical: {identical}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
