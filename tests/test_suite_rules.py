"""Rules the suite keeps about itself (tests/README.md), checked by reading its source with `ast`:

* every test can fail by an assertion, not only by crashing: its body asserts, expects an
  exception (`pytest.raises`/`pytest.fail`/`raise AssertionError`), or calls a helper of the
  suite that does (helpers are followed through any number of calls, across tests/);
* no test asserts on wall-clock time: an `assert` may not read `time.monotonic()`,
  `time.time()`, `time.perf_counter()` (or a name computed from them). Waiting for an event
  with a deadline is fine (the deadline raises, it is not asserted); how long something took
  belongs to the benchmark (`fastshadow bench`).
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CLOCKS = {"monotonic", "monotonic_ns", "time", "time_ns", "perf_counter", "perf_counter_ns"}


def _files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _called_names(fn: ast.AST) -> set[str]:
    out = set()
    for n in ast.walk(fn):
        if isinstance(n, ast.Call):
            f = n.func
            out.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return out


def _asserts_itself(fn: ast.AST) -> bool:
    for n in ast.walk(fn):
        if isinstance(n, ast.Assert):
            return True
        if isinstance(n, ast.Raise) and n.exc is not None and "AssertionError" in ast.unparse(n.exc):
            return True
    return bool(_called_names(fn) & {"raises", "fail", "warns"})


def test_every_test_can_fail_by_an_assertion():
    parsed = {p: ast.parse(p.read_text(), str(p)) for p in _files()}
    # Which function names of the suite assert (directly or through other helpers of the suite).
    calls: dict[str, set[str]] = {}
    asserting: set[str] = set()
    for tree in parsed.values():
        for fn in _functions(tree):
            calls.setdefault(fn.name, set()).update(_called_names(fn))
            if _asserts_itself(fn):
                asserting.add(fn.name)
    while True:
        more = {name for name, called in calls.items() if name not in asserting and called & asserting}
        if not more:
            break
        asserting |= more
    silent = []
    for path, tree in parsed.items():
        if not path.name.startswith("test_"):
            continue
        for fn in _functions(tree):
            # A fixture's teardown check (e.g. make_rig's guest-RAM canaries) does not count:
            # calling a fixture the test receives is not an assertion of the test's own.
            fixtures = {a.arg for a in fn.args.args}
            if fn.name.startswith("test_") and not (_asserts_itself(fn) or
                                                    (_called_names(fn) - fixtures) & asserting):
                silent.append(f"{path.relative_to(TESTS)}:{fn.lineno} {fn.name}")
    assert not silent, "tests that can only fail by crashing:\n" + "\n".join(silent)


def _reads_clock(node: ast.AST, clocky: set[str]) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in CLOCKS:
            return True
        if isinstance(n, ast.Name) and n.id in clocky:
            return True
    return False


def test_no_assertion_on_wall_clock_time():
    found = []
    for path in _files():
        for fn in _functions(ast.parse(path.read_text(), str(path))):
            clocky: set[str] = set()
            for n in ast.walk(fn):          # names holding a time (t0 = monotonic(); took = monotonic() - t0)
                if isinstance(n, ast.Assign) and _reads_clock(n.value, clocky):
                    clocky |= {t.id for t in n.targets if isinstance(t, ast.Name)}
            for n in ast.walk(fn):
                if isinstance(n, ast.Assert) and _reads_clock(n.test, clocky):
                    found.append(f"{path.relative_to(TESTS)}:{n.lineno} {ast.unparse(n.test)[:80]}")
    assert not found, "assertions on wall-clock time (make them event-driven or move them to bench):\n" + \
        "\n".join(found)
