"""Mutation testing of the modules that carry the README's claims (slow; not part of CI).

    python scripts/mutation.py [--per_module 25] [--seed 0] [--modules lpd/train.py,...] [--json out.json]
    python scripts/mutation.py --only lpd/train.py:412,main_train.py:77   # rerun given mutants
    python scripts/mutation.py --only lpd/train.py:412 --tests tests/test_train.py::test_x  # against these

Mutants are mutmut's (its operators on the files, configured in pyproject.toml [tool.mutmut]),
less string literals holding whitespace (messages, help text) and dropped ``help=`` arguments. A
seeded random sample of ``--per_module`` mutants per module runs, one at a time, in a copy of the
tree: each mutant against the tests of ITS module's test files that cover the mutated lines (one
coverage pass, per test, subprocesses included, finds them; every test of those files when no test
covers the lines or they run at import), with ``-x`` and a per-mutant timeout. Prints the score per module and every
survivor as a diff. A mutant is killed when a test fails (or errors, or times out).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The modules mutated and the test files that check each of them.
MODULE_TESTS = {
    "lpd/sampling.py": [
        "tests/test_sampling.py",
        "tests/test_speed_paths.py",
        "tests/test_claims_sampling.py",
    ],
    "lpd/editing.py": ["tests/test_editing.py", "tests/test_claims_editing.py"],
    "lpd/train.py": ["tests/test_train.py", "tests/test_fsdp.py", "tests/test_claims_training.py"],
    "lpd/recipe.py": ["tests/test_train.py", "tests/test_datasets.py"],
    "lpd/evaluate.py": [
        "tests/test_evaluate.py",
        "tests/test_main_eval.py",
        "tests/test_pipeline.py",
        "tests/test_claims_sampling.py",
    ],
    "lpd/metrics.py": [
        "tests/test_metrics.py",
        "tests/test_evaluate.py",
        "tests/test_claims_training.py",
    ],
    "lpd/pipeline.py": [
        "tests/test_pipeline.py",
        "tests/test_claims_sampling.py",
        "tests/test_claims_editing.py",
    ],
    "main_train.py": [
        "tests/test_train.py",
        "tests/test_fsdp.py",
        "tests/test_claims_training.py",
        "tests/test_claims_commands.py",
    ],
}
CONTEXT_ENV = (
    "LPD_MUTATION_TEST"  # the running test's node id, the coverage context of its subprocesses
)
PYTEST = ["-x", "-q", "-p", "no:cacheprovider", "-o", "addopts="]


# ---------------------------------------------------------------------------------------------- mutants


def mutants(path: str) -> list[tuple[int, Callable[[], str], tuple[int, int]]]:
    """(index in mutmut's list, its mutated source on call, (first, last) line mutated) of every kept mutant."""
    import libcst as cst
    from libcst.metadata import MetadataWrapper, PositionProvider
    from mutmut.mutation.file_mutation import create_mutations, deep_replace

    code = open(path).read()
    module, found, _, _ = create_mutations(path, code)
    where = MetadataWrapper(module, unsafe_skip_copy=True).resolve(PositionProvider)
    out = []
    for i, m in enumerate(found):
        old, new = m.original_node, m.mutated_node
        if isinstance(old, cst.SimpleString) and any(ch.isspace() for ch in old.evaluated_value):
            continue  # a message or help text
        if isinstance(old, cst.Call) and isinstance(new, cst.Call):
            kw = lambda call: {a.keyword.value for a in call.args if a.keyword is not None}  # noqa: E731
            if kw(old) - kw(new) == {"help"} and len(new.args) == len(old.args) - 1:
                continue
        span = where[old]
        out.append(
            (
                i,
                lambda old=old, new=new: deep_replace(module, old, new).code,
                (span.start.line, span.end.line),
            )
        )
    return out


def diff(path: str, original: str, mutated: str) -> str:
    lines = difflib.unified_diff(
        original.splitlines(True), mutated.splitlines(True), path, path, n=0
    )
    return "".join(list(lines)[2:])


# ---------------------------------------------------------------------------------------------- coverage


def coverage_pass(
    tree: str, files: list[str]
) -> tuple[dict[str, dict[int, list[str]]], dict[str, float]]:
    """Run ``files`` once under coverage: the test functions (node ids without parameters) covering each
    line of each module, and every test function's seconds."""
    work = tempfile.mkdtemp(prefix="cov-", dir=tree)
    rc = os.path.join(work, "coveragerc")
    with open(
        rc, "w"
    ) as f:  # subprocesses read it at start-up: their context is the test that started them
        f.write(
            f"[run]\ndata_file = {work}/data\nparallel = true\ncontext = ${{{CONTEXT_ENV}-}}\ninclude =\n"
            + "".join(f"    {tree}/{m}\n" for m in MODULE_TESTS)
            + "\n"
        )
    times = os.path.join(work, "times.json")
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import mutation; "
        f"sys.exit(mutation._measure({rc!r}, {times!r}, sys.argv[1:]))"
    )
    status, _ = _run([sys.executable, "-c", code, *PYTEST[1:], *files], tree, None, capture=False)
    if status not in (0, 1):
        raise SystemExit(f"the coverage pass of {' '.join(files)} ended with status {status}")
    import coverage

    cov = coverage.Coverage(data_file=os.path.join(work, "data"), config_file=False)
    cov.combine([work])
    data = cov.get_data()
    func = lambda test: test.split("[")[0]  # noqa: E731 - some parameter ids do not survive the command line
    lines = {
        m: {
            ln: sorted({func(c) for c in cs})
            for ln, cs in data.contexts_by_lineno(os.path.join(tree, m)).items()
        }
        for m in MODULE_TESTS
    }  # context "": run outside any test (at import), so by every test
    seconds: dict[str, float] = {}
    for test, t in json.load(open(times)).items():
        seconds[func(test)] = seconds.get(func(test), 0.0) + t
    return lines, seconds


def _measure(rc: str, times_path: str, args: list[str]) -> int:
    """In the child: pytest under coverage, the context switched to each test's node id."""
    import coverage
    import pytest

    os.environ["COVERAGE_PROCESS_START"] = (
        rc  # subprocesses start coverage from the .pth coverage installs
    )
    cov = coverage.Coverage(config_file=rc)
    times: dict[str, float] = {}

    class Contexts:
        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_protocol(self, item, nextitem):
            os.environ[CONTEXT_ENV] = item.nodeid
            cov.switch_context(item.nodeid)
            t0 = time.monotonic()
            yield
            times[item.nodeid] = time.monotonic() - t0
            cov.switch_context("")
            os.environ[CONTEXT_ENV] = ""

    cov.start()
    try:
        status = pytest.main(args, plugins=[Contexts()])
    finally:
        cov.stop()
        cov.save()
    with open(times_path, "w") as f:
        json.dump(times, f)
    return int(status)


# ---------------------------------------------------------------------------------------------- running


def _run(
    cmd: list[str], cwd: str, timeout: float | None, capture: bool = True
) -> tuple[int | None, str]:
    """Exit status of ``cmd`` in its own process group (killed with it), None on timeout; and its output."""
    env = dict(
        os.environ, PYTHONPATH=cwd, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1"
    )  # one thread: no spinning
    with tempfile.TemporaryFile("w+") as log:
        out = log if capture else None
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=out, start_new_session=True
        )
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.seek(0)
        return status, log.read()


def verdict(status: int | None, output: str) -> str:
    """killed (a test failed, or collecting one did: the mutant breaks an import), timeout, survived, or error N."""
    if status is None:
        return "timeout"
    if status in (1, 2, 3) or (
        status == 4 and ("ERROR collecting" in output or "while loading conftest" in output)
    ):
        return "killed"
    return "survived" if status == 0 else f"error {status}"


def copy_tree(dest: str) -> None:
    """The tracked and the new (not ignored) files of the checkout."""
    names = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, names):
        src = os.path.join(ROOT, name)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--modules", default=",".join(MODULE_TESTS), help="comma list (default: all seven)"
    )
    p.add_argument("--per_module", type=int, default=25, help="mutants sampled per module")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--only",
        default=None,
        help="comma list of mutant ids (MODULE:INDEX) to run instead of a sample",
    )
    p.add_argument(
        "--timeout_factor",
        type=float,
        default=5.0,
        help="per-mutant limit: 60 s + this x the tests' time",
    )
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--coverage_cache",
        default=None,
        help="reuse the coverage pass saved here (delete it when tests change)",
    )
    p.add_argument(
        "--tests",
        default=None,
        help="comma list of test node ids run against every mutant instead (no coverage pass)",
    )
    args = p.parse_args(argv)
    signal.signal(
        signal.SIGTERM, lambda *a: sys.exit(143)
    )  # the finally blocks restore the copy and remove it
    os.chdir(ROOT)  # mutmut reads its configuration from pyproject.toml here
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    if set(modules) - set(MODULE_TESTS):
        p.error(f"--modules: choose from {', '.join(MODULE_TESTS)}")
    only = [o.rsplit(":", 1) for o in args.only.split(",")] if args.only else None
    if only:
        modules = sorted({m for m, _ in only}, key=list(MODULE_TESTS).index)
    rng = random.Random(args.seed)
    chosen = []  # (module, index, mutated source on call, lines)
    for m in modules:
        found = mutants(m)
        if only:
            want = {int(i) for mm, i in only if mm == m}
            chosen += [(m, *x) for x in found if x[0] in want]
        else:
            chosen += [(m, *x) for x in sorted(rng.sample(found, min(args.per_module, len(found))))]
        print(f"{m}: {len(found)} mutants", flush=True)
    files = sorted({f for m in modules for f in MODULE_TESTS[m]})
    results = []
    with tempfile.TemporaryDirectory(prefix="lpd-mutation-") as tree:
        copy_tree(tree)
        t0 = time.monotonic()
        if args.tests:
            given = [t.strip() for t in args.tests.split(",") if t.strip()]
            covered, times = {m: {} for m in MODULE_TESTS}, {t: 60.0 for t in given}  # unmeasured
        elif args.coverage_cache and os.path.exists(args.coverage_cache):
            covered, times = json.load(open(args.coverage_cache))
            covered = {m: {int(ln): t for ln, t in lines.items()} for m, lines in covered.items()}
        else:
            covered, times = coverage_pass(tree, files)
            if args.coverage_cache:
                with open(args.coverage_cache, "w") as f:
                    json.dump([covered, times], f)
        print(f"coverage: {len(times)} test functions, {time.monotonic() - t0:.0f} s", flush=True)
        for n, (m, index, render, (first, last)) in enumerate(chosen):
            original, source = open(os.path.join(ROOT, m)).read(), render()
            mine = {t for t in times if args.tests or t.split("::")[0] in MODULE_TESTS[m]}
            tests = {t for ln in range(first, last + 1) for t in covered[m].get(ln, [])}
            tests = sorted(
                mine if "" in tests or not tests & mine else tests & mine, key=lambda t: times[t]
            )
            limit = 60 + args.timeout_factor * sum(times[t] for t in tests)
            path = os.path.join(tree, m)
            with open(path, "w") as f:
                f.write(source)
            t1 = time.monotonic()
            try:
                status, output = _run(
                    [sys.executable, "-m", "pytest", *PYTEST, *tests], tree, limit
                )
            finally:
                with open(path, "w") as f:
                    f.write(original)
            result = verdict(status, output)
            results.append(
                dict(
                    id=f"{m}:{index}",
                    module=m,
                    verdict=result,
                    tests=len(tests),
                    seconds=round(time.monotonic() - t1, 1),
                    diff=diff(m, original, source),
                )
            )
            if result.startswith("error"):
                results[-1]["output"] = output[-2000:]
            print(
                f"[{n + 1}/{len(chosen)}] {m}:{index} {result} ({len(tests)} tests, "
                f"{time.monotonic() - t1:.0f} s)",
                flush=True,
            )
            save(args.json, args, results)
    print("\nmodule              sampled  killed  timeout  survived  error  score")
    for m in modules:
        c = Counter(
            r["verdict"] if r["verdict"] in ("killed", "timeout", "survived") else "error"
            for r in results
            if r["module"] == m
        )
        done = c["killed"] + c["timeout"] + c["survived"]
        score = (c["killed"] + c["timeout"]) / done if done else float("nan")
        print(
            f"{m:<20}{sum(c.values()):>7}{c['killed']:>8}{c['timeout']:>9}{c['survived']:>10}{c['error']:>7}"
            f"{score:>7.0%}"
        )
    print("\nsurvivors:")
    for r in results:
        if r["verdict"] != "killed" and r["verdict"] != "timeout":
            print(f"\n{r['id']} ({r['verdict']}, {r['tests']} tests)\n{r['diff']}", end="")
    return 0


def save(path: str | None, args: argparse.Namespace, results: list[dict]) -> None:
    """The results so far (after every mutant: a stopped run keeps them)."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(
                dict(seed=args.seed, per_module=args.per_module, results=results), f, indent=1
            )
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
