"""Fault injection: real saves killed with SIGKILL or SIGINT at random instants.

A "zygote" process (this file run as a script) imports torch, transformers, llm-compressor and
armor-modifier once, builds two versions ("old", "new") of every output, and then forks one
worker per round, so a round costs a fork instead of a 5 s interpreter start. A worker saves into
a target folder over and over, alternating the versions; the test waits until its staging folder
appears, sleeps a seeded random fraction of a save, kills it (SIGKILL or SIGINT), and checks:

- the target is, file for file and byte for byte, the complete old or the complete new version
  (or, only with the two-rename fallback, missing with the complete old folder aside);
- the next run on the target (a real :func:`staged_replace`) restores or cleans, leaving nothing
  but the target in its folder, and the target unchanged;
- for the armor-ct model: it loads with ``AutoModelForCausalLM.from_pretrained`` and its logits
  are exactly those of the old or the new reference checkpoint.

Workers: ``staged_replace`` writing a few files (atomic exchange, and the two-rename fallback with
the renames slowed down so kills land between them), ``save_pretrained`` of a tiny ARMOR Llama
(the armor-ct save hook), ``armor export-dense --overwrite`` and ``armor prune --overwrite`` (the
CLI's ``main`` in the forked worker). The ``slow`` tests kill the real ``armor`` console script.
"""

from __future__ import annotations

import filecmp
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

OTHER = {"old": "new", "new": "old"}
SEEDS = {"old": 0, "new": 1}
#: files of the ``files`` worker, and their number of lines
FILES, LINES = 6, 2000
#: kills land uniformly in this many staging-folder lifetimes (measured in each test's first
#: round) after the staging folder appears: the writing, the swap, and the start of the next save
SPAN_SAVES = 1.5
STAGE_DEADLINE_S = 60.0


# ------------------------------------------------------------------------------------------------
# The zygote and its workers (run as ``python tests/test_fault_injection.py ROOT``)


def _prune_argv(root: Path, version: str, output: Path) -> list[str]:
    return [
        "prune",
        str(root / "tiny"),
        "--dataset",
        str(root / "train.txt"),
        "--num-samples",
        "2",
        "--seq-len",
        "16",
        "--wrapper-block-size",
        "16",
        "--num-iterations",
        "1",
        "--seed",
        str(SEEDS[version]),
        "--output",
        str(output),
    ]


def _argv(kind: str, root: Path, version: str, target: Path) -> list[str]:
    if kind == "export":
        return ["export-dense", str(root / "ref" / "model" / version), str(target), "--overwrite"]
    return [*_prune_argv(root, version, target), "--overwrite"]


def _write_files(folder: Path, version: str) -> None:
    for index in range(FILES):
        (folder / f"part-{index}.txt").write_text(f"{version} {index}\n" * LINES)


def _build_references(root: Path) -> dict:
    """Both versions of every output under ``root/ref/<kind>/<version>``; the models in memory."""
    import random as stdlib_random

    from armor_modifier.cli import main
    from armor_modifier.format.hooks import install_save_hook
    from checkpoint_helpers import armorize, tiny_llama
    from tiny_llama import VOCAB, save_tiny_llama

    ref = root / "ref"
    models = {}
    for version, seed in SEEDS.items():
        (ref / "files" / version).mkdir(parents=True)
        _write_files(ref / "files" / version, version)
        (ref / "files" / version / "tokenizer.json").write_text("kept by keep_extra_files")
        model = tiny_llama(root / "base" / version, seed=seed)
        armorize(model, seed=seed)
        install_save_hook(model)
        model.save_pretrained(ref / "model" / version)
        models[version] = model
    save_tiny_llama(root / "tiny")
    rng = stdlib_random.Random(0)
    (root / "train.txt").write_text(" ".join(f"w{rng.randrange(4, VOCAB)}" for _ in range(2000)))
    for version in SEEDS:
        for kind, argv in (
            (
                "export",
                ["export-dense", str(ref / "model" / version), str(ref / "export" / version)],
            ),
            ("prune", _prune_argv(root, version, ref / "prune" / version)),
        ):
            if main(argv) != 0:
                raise RuntimeError(f"building the {kind} reference failed: armor {argv}")
    return models


def _work(request: dict, root: Path, models: dict) -> None:
    """A worker: save ``request["target"]`` forever, alternating the versions."""
    from armor_modifier.cli import main
    from armor_modifier.format import staging

    if request["fallback"]:
        staging._exchange = lambda a, b: False
    if request["stretch"] or request["gap"]:
        rename = os.rename

        def slow_rename(src, dst):
            rename(src, dst)
            aside = ".armor-old-" in os.fspath(dst)
            time.sleep(request["gap"] if aside and request["gap"] else request["stretch"])

        os.rename = slow_rename
    kind, target = request["kind"], Path(request["target"])
    for index in itertools.count():
        version = request["first"] if index % 2 == 0 else OTHER[request["first"]]
        if kind == "files":
            with staging.staged_replace(target, keep_extra_files=True) as stage:
                _write_files(stage, version)
        elif kind == "model":
            models[version].save_pretrained(target)
        elif main(_argv(kind, root, version, target)) != 0:
            raise RuntimeError(f"armor {kind} failed on {target}")


def _zygote(root: Path) -> None:
    """Answer one JSON line per request on the original stdout; everything else goes to stderr."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    # a shell starts background jobs with SIGINT ignored, and Python then installs no Ctrl-C
    # handler: the SIGINT kills below would do nothing (seen when the suite ran under `cmd &`)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch

    torch.set_num_threads(1)
    import llmcompressor  # noqa: F401  (imported once here, not in every prune worker)

    import armor_modifier  # noqa: F401

    models = _build_references(root)
    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request["do"] == "start":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    reply.close()
                    _work(request, root, models)
                except KeyboardInterrupt:
                    code = 130
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stderr.flush()
                    os._exit(code)
            reply.write(json.dumps({"pid": pid}) + "\n")
        else:
            reply.write(json.dumps(_reap(request["pid"])) + "\n")


#: Seconds a SIGINT gets to end a worker. A fresh-clone CI run on a machine loaded by two
#: benchmark processes once saw one worker of six outlive 30 s (cause not found; it passed 6 of 6
#: times alone); 90 s tells a slow unwind from a stuck one on a loaded 2-core machine.
SIGINT_GRACE = 90


def _reap(pid: int) -> dict:
    """Wait for the killed worker (SIGKILL it if a SIGINT has not ended it in SIGINT_GRACE s)."""
    deadline = time.monotonic() + SIGINT_GRACE
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                "stuck": False,
            }
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"signal": signal.SIGKILL, "code": None, "stuck": True}
        time.sleep(0.005)


if __name__ == "__main__":
    _zygote(Path(sys.argv[1]))
    sys.exit(0)


# ------------------------------------------------------------------------------------------------
# The tests


class Zygote:
    def __init__(self, root: Path):
        self.root = root
        self.log = root / "zygote.log"
        self._log_file = open(self.log, "w")  # noqa: SIM115  (closed in close())
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        self._ask(None)

    def _ask(self, request: dict | None) -> dict:
        if request is not None:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            pytest.fail(f"the zygote died; its log ends with:\n{self.log_tail()}")
        return json.loads(line)

    def start(self, **request) -> int:
        return self._ask({"do": "start", **request})["pid"]

    def reap(self, pid: int) -> dict:
        return self._ask({"do": "reap", "pid": pid})

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self._log_file.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    started = time.perf_counter()
    process = Zygote(tmp_path_factory.mktemp("faults"))
    print(f"zygote ready in {time.perf_counter() - started:.1f} s")
    yield process
    process.close()


def _same_tree(a: Path, b: Path) -> bool:
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*"))
    if files != sorted(str(p.relative_to(b)) for p in b.rglob("*")):
        return False
    plain = [name for name in files if (a / name).is_file()]
    _match, mismatch, errors = filecmp.cmpfiles(a, b, plain, shallow=False)
    return not mismatch and not errors


def _version(folder: Path, refs: dict[str, Path]) -> str:
    if not folder.exists():
        return "missing"
    for version, ref in refs.items():
        if _same_tree(folder, ref):
            return version
    return "mixed"


def _stages(target: Path, pid: int) -> set[str]:
    """Staging folders of ``pid`` beside ``target`` (also nested ones; not write probes)."""
    prefixes = (f".{target.name}.armor-stage-{pid}-", f"..{target.name}.armor-stage-{pid}-")
    names = os.listdir(target.parent)
    return {n for n in names if n.startswith(prefixes) and not n.endswith("-probe")}


def _wait_for_stage(target: Path, pid: int, describe) -> str:
    """Poll (1 ms) until ``pid`` has made a staging folder beside ``target``; return its name."""
    deadline = time.monotonic() + STAGE_DEADLINE_S
    while not (stages := _stages(target, pid)):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"no staging folder of {pid} within {STAGE_DEADLINE_S} s; {describe()}")
        time.sleep(0.001)
    return min(stages)


def _stage_lifetime(target: Path, pid: int, describe) -> float:
    """Seconds from the appearance of ``pid``'s first staging folder to its swap."""
    name = _wait_for_stage(target, pid, describe)
    start = time.monotonic()
    while name in os.listdir(target.parent) and time.monotonic() < start + STAGE_DEADLINE_S:
        time.sleep(0.0005)
    return time.monotonic() - start


def _check_after_kill(target: Path, refs: dict[str, Path], fallback: bool, stats: dict) -> str:
    """Assert the state a kill left, run the next save, assert it cleaned up; return the version."""
    from armor_modifier.format.staging import copy_extra_files, staged_replace

    others = sorted(name for name in os.listdir(target.parent) if name != target.name)
    state = _version(target, refs)
    stats["leftovers"] += bool(others)
    if state == "missing":
        asides = [name for name in others if name.startswith(f".{target.name}.armor-old-")]
        assert fallback and len(asides) == 1, (state, others)
        state = _version(target.parent / asides[0], refs)
        stats["aside"] += 1
    assert state in refs, f"{target} is {state} after the kill; beside it: {others}"
    with staged_replace(target) as stage:  # the next run on the target
        assert _version(target, refs) == state
        copy_extra_files(target, stage)
    assert os.listdir(target.parent) == [target.name]
    assert _version(target, refs) == state
    return state


def _new_target(zygote, kind: str, name: str) -> tuple[Path, dict[str, Path]]:
    """``runs/<name>/model``, a copy of the old reference, alone in its folder; and the refs."""
    from armor_modifier.format.staging import copy_extra_files

    refs = {version: zygote.root / "ref" / kind / version for version in SEEDS}
    target = zygote.root / "runs" / name / "model"
    target.mkdir(parents=True)
    copy_extra_files(refs["old"], target)
    return target, refs


def _kill_in_the_gap(zygote, target, refs, state: str, sig: int, stats: dict) -> str:
    """Kill a two-rename swap while the target is renamed aside (the worker sleeps there)."""
    gap = 30.0 if sig == signal.SIGKILL else 0.3
    pid = zygote.start(
        kind="files", target=str(target), first=OTHER[state], fallback=True, stretch=0, gap=gap
    )
    aside = f".{target.name}.armor-old-{pid}-"
    deadline = time.monotonic() + STAGE_DEADLINE_S
    while not any(name.startswith(aside) for name in os.listdir(target.parent)):
        assert time.monotonic() < deadline, zygote.log_tail()
        time.sleep(0.001)
    os.kill(pid, sig)
    status = zygote.reap(pid)
    assert status["code"] in (None, 130), f"worker failed: {status}\n{zygote.log_tail()}"
    stats["kills"] += 1
    stats["sigint"] += sig == signal.SIGINT
    asides = stats["aside"]
    new_state = _check_after_kill(target, refs, True, stats)
    if sig == signal.SIGKILL:  # target missing until the next run put the old folder back
        assert (stats["aside"], new_state) == (asides + 1, state)
    else:  # Ctrl-C is held back until the swap is done
        assert (status["code"], stats["aside"], new_state) == (130, asides, OTHER[state])
    return new_state


def _kill_rounds(
    zygote, kind, rounds, seed, fallback=False, stretch=0.0, check=None, gap_first=False
) -> dict:
    rng = random.Random(seed)
    target, refs = _new_target(zygote, kind, f"{kind}-{seed}")
    state = "old"
    stats = dict.fromkeys(("kills", "sigint", "flips", "leftovers", "aside", "stuck"), 0)
    if gap_first:
        for sig in (signal.SIGKILL, signal.SIGINT):
            state = _kill_in_the_gap(zygote, target, refs, state, sig, stats)
    span = None
    for _round in range(rounds):
        sig = rng.choice((signal.SIGKILL, signal.SIGINT))
        pid = zygote.start(
            kind=kind,
            target=str(target),
            first=OTHER[state],
            fallback=fallback,
            stretch=stretch,
            gap=0,
        )
        if span is None:  # first round: measure how long a save keeps its staging folder
            span = SPAN_SAVES * _stage_lifetime(target, pid, zygote.log_tail)
            stats["span_ms"] = round(1000 * span, 1)
        else:
            _wait_for_stage(target, pid, zygote.log_tail)
            time.sleep(rng.uniform(0, span))
        os.kill(pid, sig)
        status = zygote.reap(pid)
        assert status["code"] in (None, 130), f"worker failed: {status}\n{zygote.log_tail()}"
        stats["kills"] += 1
        stats["sigint"] += sig == signal.SIGINT
        stats["stuck"] += status["stuck"]
        new_state = _check_after_kill(target, refs, fallback, stats)
        stats["flips"] += new_state != state
        state = new_state
        if check is not None:
            check(target, state)
    print(f"{kind} (fallback={fallback}): {stats}")
    assert stats["flips"] + stats["leftovers"] > 0, f"no kill hit a running save: {stats}"
    assert stats["stuck"] == 0, (
        f"a SIGINT did not end the worker within {SIGINT_GRACE} s: {stats}"
    )
    return stats


def test_killed_staged_replace_leaves_old_or_new(zygote):
    _kill_rounds(zygote, "files", rounds=10, seed=1)


def test_killed_two_rename_fallback_leaves_old_or_new_or_restorable(zygote):
    """Without RENAME_EXCHANGE: first a SIGKILL and a SIGINT exactly between the two renames (the
    worker sleeps there), then random kills with 3 ms after each rename."""
    _kill_rounds(zygote, "files", rounds=10, seed=2, fallback=True, stretch=0.003, gap_first=True)


def test_killed_armor_ct_save_loads_as_old_or_new(zygote):
    import torch
    from transformers import AutoModelForCausalLM

    import armor_modifier  # noqa: F401  (registers the armor-ct loader)

    ids = torch.randint(4, 128, (1, 16), generator=torch.Generator().manual_seed(0))

    def logits(folder: Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            return model(ids).logits

    expected = {v: logits(zygote.root / "ref" / "model" / v) for v in SEEDS}
    assert not torch.equal(expected["old"], expected["new"])

    def check(target: Path, state: str) -> None:
        # bit-exact: same files, loaded the same way (observed max |diff| 0.0)
        assert torch.equal(logits(target), expected[state])

    _kill_rounds(zygote, "model", rounds=8, seed=3, check=check)


def test_killed_export_dense_overwrite_leaves_old_or_new(zygote):
    _kill_rounds(zygote, "export", rounds=6, seed=4)


def test_killed_prune_overwrite_leaves_old_or_new(zygote):
    _kill_rounds(zygote, "prune", rounds=6, seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["export", "prune"])
def test_killed_armor_console_script_leaves_old_or_new(zygote, kind):
    """The real ``armor`` console script in a fresh interpreter, killed 3 times during its save."""
    armor = Path(sys.executable).with_name("armor")
    command = [str(armor)] if armor.exists() else [sys.executable, "-m", "armor_modifier.cli"]
    rng = random.Random(6)
    target, refs = _new_target(zygote, kind, f"script-{kind}")
    state = "old"
    stats = dict.fromkeys(("kills", "flips", "leftovers", "aside"), 0)
    log = zygote.root / f"script-{kind}.log"
    for _round in range(3):
        sig = rng.choice((signal.SIGKILL, signal.SIGINT))
        with open(log, "a") as out:
            threads = ["--threads", "1"] if kind == "prune" else []
            argv = [*command, *_argv(kind, zygote.root, OTHER[state], target), *threads]
            process = subprocess.Popen(argv, stdout=out, stderr=out)
        _wait_for_stage(target, process.pid, lambda: log.read_text()[-2000:])
        time.sleep(rng.uniform(0, 0.05))  # its saves took 15-70 ms in the fast tests
        process.send_signal(sig)
        code = process.wait(timeout=60)
        assert code in (-signal.SIGKILL, -signal.SIGINT, 0, 130), log.read_text()[-2000:]
        stats["kills"] += 1
        new_state = _check_after_kill(target, refs, False, stats)
        stats["flips"] += new_state != state
        state = new_state
    print(f"console script {kind}: {stats}")
