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

Fork safety (a fork copies every lock as it is, and only the forking thread): the zygote runs with
:data:`FORK_SAFE_ENV` and tqdm set to a thread-only lock and no monitor thread, builds only the two
in-memory models itself (the reference folders are written by a forked child), and checks before
every fork that it is one thread and has made no cross-process lock (:func:`_assert_fork_safe`).
Before, tqdm's multiprocessing lock and monitor thread were made in the zygote by the references'
progress bars: every worker shared that one semaphore, and a worker SIGKILLed while holding it
hung every later worker in its next progress bar (faulthandler stack of a stuck ``export`` worker:
``tqdm/std.py:102 acquire`` < ``std.py:666 __new__`` < ``core_model_loading.py:1752`` <
``export_dense``). A worker ends on a flag its SIGINT handler sets, as well as on the
``KeyboardInterrupt`` that handler raises, so a Ctrl-C whose exception is lost (raised in a
finalizer, printed as "Exception ignored") still ends it after the save; a worker that is not done
in time gets a stack dump (faulthandler, SIGUSR1) before it is killed.
"""

from __future__ import annotations

import faulthandler
import filecmp
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
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
#: Seconds a worker gets to make its staging folder; at most 0.65 s observed (a prune worker; the
#: others 0.16 s) over 20 runs of this module beside four CPU-heavy processes on the 2-core machine
STAGE_DEADLINE_S = 60.0
#: The zygote's environment, in force before it imports anything (its workers inherit it): no
#: library it loads starts a thread or shows a progress bar. Threads seen in the zygote without it:
#: one at ``import torch`` (OpenMP), ``jemalloc_bg_thd`` at ``import datasets`` (pyarrow's
#: jemalloc), two ``ThreadPoolExecutor`` workers per ``from_pretrained`` (transformers 5 shuts its
#: loading pool down without waiting), and tqdm's monitor threads.
FORK_SAFE_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "JE_ARROW_MALLOC_CONF": "background_thread:false",
    "HF_DEACTIVATE_ASYNC_LOAD": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' bars (read when it is imported)
    "TQDM_DISABLE": "1",  # every other tqdm bar (disabled bars still take tqdm's lock)
}
#: Where a forked worker's faulthandler writes its threads' stacks on SIGUSR1 (under the root)
STACKS = "stacks"


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


def _build_models(root: Path) -> dict:
    """The old and the new tiny ARMOR Llama (with the armor-ct save hook), kept in memory."""
    from armor_modifier.format.hooks import install_save_hook
    from checkpoint_helpers import armorize, tiny_llama

    models = {}
    for version, seed in SEEDS.items():
        model = tiny_llama(root / "base" / version, seed=seed)
        armorize(model, seed=seed)
        install_save_hook(model)
        models[version] = model
    return models


def _build_references(root: Path, models: dict) -> None:
    """Both versions of every output under ``root/ref/<kind>/<version>`` (in a forked child)."""
    import random as stdlib_random

    from armor_modifier.cli import main
    from tiny_llama import VOCAB, save_tiny_llama

    ref = root / "ref"
    for version, model in models.items():
        (ref / "files" / version).mkdir(parents=True)
        _write_files(ref / "files" / version, version)
        (ref / "files" / version / "tokenizer.json").write_text("kept by keep_extra_files")
        model.save_pretrained(ref / "model" / version)
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


def _work(request: dict, root: Path, models: dict, stopped) -> None:
    """A worker: save ``request["target"]`` until ``stopped()``, alternating the versions."""
    from armor_modifier import staging
    from armor_modifier.cli import main

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
        if stopped():
            return
        version = request["first"] if index % 2 == 0 else OTHER[request["first"]]
        if kind == "files":
            with staging.staged_replace(target, keep_extra_files=True) as stage:
                _write_files(stage, version)
        elif kind == "model":
            models[version].save_pretrained(target)
        elif main(_argv(kind, root, version, target)) != 0:
            raise RuntimeError(f"armor {kind} failed on {target}")


def _child(job, root: Path) -> int:
    """In a forked child: run ``job(stopped)``; the exit code (130 after a SIGINT, 3 on an error).

    The SIGINT handler sets a flag and raises ``KeyboardInterrupt``: the exception interrupts a
    save wherever it is (what the tests check), and the flag ends the loop after the save when the
    exception was lost (raised inside a finalizer, Python prints "Exception ignored" and goes on).
    """
    interrupted = []

    def on_sigint(_signum, _frame):
        interrupted.append(time.monotonic())
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    stacks = open(root / STACKS / f"{os.getpid()}.txt", "w")  # noqa: SIM115  (kept open)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    try:
        job(lambda: bool(interrupted))
    except KeyboardInterrupt:
        return 130
    except BaseException:
        traceback.print_exc()
        return 3
    if interrupted:
        print(f"worker {os.getpid()}: SIGINT's KeyboardInterrupt was lost; ended by the flag")
        return 130
    return 0


def _fork(job, root: Path, reply) -> int:
    """Fork a child that runs :func:`_child` and leaves with ``os._exit``; return its pid."""
    _assert_fork_safe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            reply.close()  # only the zygote answers the test
            code = _child(job, root)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


#: Where the zygote records every cross-process lock made in it (none may be, see below)
_CROSS_PROCESS_LOCKS: list[str] = []


def _record_cross_process_locks() -> None:
    """Note where any multiprocessing lock or semaphore is made (a fork shares it with the child,
    so one held by a killed worker would never come free for the next)."""
    import multiprocessing.synchronize

    make = multiprocessing.synchronize.SemLock.__init__

    def recording_make(self, *args, **kwargs):
        _CROSS_PROCESS_LOCKS.append("".join(traceback.format_stack(limit=12)))
        make(self, *args, **kwargs)

    multiprocessing.synchronize.SemLock.__init__ = recording_make


def _threads() -> list[str]:
    """This process's threads: ``name(tid)`` per OS thread, Python's names where known."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    found = []
    for tid in sorted(os.listdir("/proc/self/task"), key=int):
        try:
            comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:  # ended meanwhile
            continue
        found.append(f"{names.get(int(tid), comm)}({tid})")
    return found


def _assert_fork_safe() -> None:
    """Refuse to fork unless this process is one thread and has made no cross-process lock."""
    threads = _threads()
    if len(threads) != 1 or threading.active_count() != 1 or _CROSS_PROCESS_LOCKS:
        raise RuntimeError(
            f"the zygote may not fork: threads {threads} (Python: {threading.enumerate()}); "
            f"cross-process locks made at:\n" + "\n".join(_CROSS_PROCESS_LOCKS)
        )


def _zygote(root: Path) -> None:
    """Answer one JSON line per request on the original stdout; everything else goes to stderr."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    # a shell starts background jobs with SIGINT ignored, and Python then installs no Ctrl-C
    # handler: the SIGINT kills below would do nothing (seen when the suite ran under `cmd &`)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.update(FORK_SAFE_ENV)  # also when this file is run by hand
    (root / STACKS).mkdir()
    _record_cross_process_locks()
    import tqdm.std

    # no monitor thread, and a thread-only lock instead of a multiprocessing one (each process
    # has its own copy: the zygote never holds it when it forks, being single-threaded)
    tqdm.std.tqdm.monitor_interval = 0
    tqdm.std.tqdm.set_lock(threading.RLock())
    import torch

    torch.set_num_threads(1)
    import llmcompressor  # noqa: F401  (imported once here, not in every prune worker)

    import armor_modifier  # noqa: F401

    models = _build_models(root)
    builder = _fork(lambda _stopped: _build_references(root, models), root, reply)
    status = _reap(builder, root, grace=None)
    if status["code"] != 0:
        raise RuntimeError(f"building the references failed: {status}")
    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request["do"] == "start":
            job = lambda stop, request=request: _work(request, root, models, stop)  # noqa: E731
            pid = _fork(job, root, reply)
            reply.write(json.dumps({"pid": pid}) + "\n")
        else:
            reply.write(json.dumps(_reap(request["pid"], root)) + "\n")


#: Seconds a SIGINT gets to end a worker before its stacks are dumped and it is killed (90 s when
#: the workers could hang on a lock from the zygote). Observed from the SIGINT to the exit, over
#: 400 SIGINTs in 20 runs of this module beside four CPU-heavy processes on the 2-core machine: at
#: most 0.35 s (0.3 s of it the swap the fallback test holds a Ctrl-C back for), 0.05 s otherwise.
SIGINT_GRACE = 20


def _dump_stacks(root: Path, pid: int) -> str:
    """The Python stacks of every thread of a forked worker (faulthandler on SIGUSR1), and its
    OS threads with what they wait in; the worker keeps running."""
    try:
        tasks = [
            f"{Path(task, 'comm').read_text().strip()}:{Path(task, 'wchan').read_text()}"
            for task in sorted(Path(f"/proc/{pid}/task").iterdir())
        ]
        os.kill(pid, signal.SIGUSR1)
    except (OSError, ProcessLookupError) as err:
        return f"(no stacks of worker {pid}: {err})"
    path = root / STACKS / f"{pid}.txt"
    deadline = time.monotonic() + 10  # written at once by the C signal handler (within 2 s seen)
    while not (path.exists() and path.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # let the handler finish writing
    text = path.read_text() if path.exists() else "(none written)"
    return f"worker {pid}, threads (name:waiting in) {tasks}; stacks:\n{text}"


def _reap(pid: int, root: Path, grace: float | None = SIGINT_GRACE) -> dict:
    """Wait for the killed worker (dump and SIGKILL it if it has not ended within ``grace`` s)."""
    started = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                "exit_s": round(time.monotonic() - started, 3),
                "stuck": False,
            }
        if grace is not None and time.monotonic() > started + grace:
            stacks = _dump_stacks(root, pid)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"signal": signal.SIGKILL, "code": None, "stuck": True, "stacks": stacks}
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
            env={**os.environ, **FORK_SAFE_ENV},
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

    def dump_stacks(self, pid: int) -> str:
        return _dump_stacks(self.root, pid)

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


def _wait_for_stage(target: Path, pid: int, describe, dump=None) -> str:
    """Poll (1 ms) until ``pid`` has made a staging folder beside ``target``; return its name.

    On the deadline the process is killed, after ``dump(pid)`` has taken its stacks (workers)."""
    deadline = time.monotonic() + STAGE_DEADLINE_S
    while not (stages := _stages(target, pid)):
        if time.monotonic() > deadline:
            stacks = dump(pid) if dump is not None else ""
            os.kill(pid, signal.SIGKILL)
            pytest.fail(
                f"no staging folder of {pid} within {STAGE_DEADLINE_S} s; {stacks}\n{describe()}"
            )
        time.sleep(0.001)
    return min(stages)


def _stage_lifetime(target: Path, pid: int, describe, dump) -> float:
    """Seconds from the appearance of ``pid``'s first staging folder to its swap."""
    name = _wait_for_stage(target, pid, describe, dump)
    start = time.monotonic()
    while name in os.listdir(target.parent) and time.monotonic() < start + STAGE_DEADLINE_S:
        time.sleep(0.0005)
    return time.monotonic() - start


def _check_after_kill(target: Path, refs: dict[str, Path], fallback: bool, stats: dict) -> str:
    """Assert the state a kill left, run the next save, assert it cleaned up; return the version."""
    from armor_modifier.staging import copy_extra_files, staged_replace

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
    from armor_modifier.staging import copy_extra_files

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
        if time.monotonic() > deadline:
            stacks = zygote.dump_stacks(pid)
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"{pid} set no folder aside in {STAGE_DEADLINE_S} s; {stacks}")
        time.sleep(0.001)
    os.kill(pid, sig)
    status = _reaped(zygote, pid, sig, stats)
    asides = stats["aside"]
    new_state = _check_after_kill(target, refs, True, stats)
    if sig == signal.SIGKILL:  # target missing until the next run put the old folder back
        assert (stats["aside"], new_state) == (asides + 1, state)
    else:  # Ctrl-C is held back until the swap is done
        assert (status["code"], stats["aside"], new_state) == (130, asides, OTHER[state])
    return new_state


def _reaped(zygote, pid: int, sig: int, stats: dict) -> dict:
    """Reap the worker just sent ``sig``; fail (with its stacks) unless it ended in time."""
    status = zygote.reap(pid)
    assert not status["stuck"], (
        f"a SIGINT did not end worker {pid} within {SIGINT_GRACE} s:\n{status['stacks']}\n"
        f"{zygote.log_tail()}"
    )
    assert status["code"] in (None, 130), f"worker failed: {status}\n{zygote.log_tail()}"
    stats["kills"] += 1
    if sig == signal.SIGINT:
        stats["sigint"] += 1
        stats["sigint_exit_max_s"] = max(stats.get("sigint_exit_max_s", 0.0), status["exit_s"])
    return status


def _kill_rounds(
    zygote, kind, rounds, seed, fallback=False, stretch=0.0, check=None, gap_first=False
) -> dict:
    rng = random.Random(seed)
    target, refs = _new_target(zygote, kind, f"{kind}-{seed}")
    state = "old"
    stats = dict.fromkeys(("kills", "sigint", "flips", "leftovers", "aside"), 0)
    if gap_first:
        for sig in (signal.SIGKILL, signal.SIGINT):
            state = _kill_in_the_gap(zygote, target, refs, state, sig, stats)
    span = None
    for _round in range(rounds):
        sig = rng.choice((signal.SIGKILL, signal.SIGINT))
        started = time.monotonic()
        pid = zygote.start(
            kind=kind,
            target=str(target),
            first=OTHER[state],
            fallback=fallback,
            stretch=stretch,
            gap=0,
        )
        if span is None:  # first round: measure how long a save keeps its staging folder
            span = SPAN_SAVES * _stage_lifetime(target, pid, zygote.log_tail, zygote.dump_stacks)
            stats["span_ms"] = round(1000 * span, 1)
        else:
            _wait_for_stage(target, pid, zygote.log_tail, zygote.dump_stacks)
            waited = round(time.monotonic() - started, 2)
            stats["stage_wait_max_s"] = max(stats.get("stage_wait_max_s", 0.0), waited)
            time.sleep(rng.uniform(0, span))
        os.kill(pid, sig)
        _reaped(zygote, pid, sig, stats)
        new_state = _check_after_kill(target, refs, fallback, stats)
        stats["flips"] += new_state != state
        state = new_state
        if check is not None:
            check(target, state)
    print(f"{kind} (fallback={fallback}): {stats}")
    assert stats["flips"] + stats["leftovers"] > 0, f"no kill hit a running save: {stats}"
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
