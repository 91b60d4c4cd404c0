"""The CI skip rule (tests/ci_skips.py), run on small test files in a pytest subprocess:
with CI=true a skip of any kind fails the run and is listed; without it, skips are
reported as usual and the run passes; failures stay failures either way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = '''
import pytest

def test_runs():
    assert 1 + 1 == 2

def test_skips_itself():
    pytest.skip("dpdk-testpmd is not installed")

@pytest.mark.skipif(True, reason="needs root")
def test_skipif_marker():
    pass

@pytest.fixture
def tool():
    pytest.skip("virtiofsd is not installed")

def test_fixture_skips(tool):
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False
'''


def run_pytest(tmp_path: Path, source: str, ci: str | None, name: str = "test_tiny.py",
               plugin: str = "tests.ci_skips"):
    (tmp_path / name).write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", plugin, "-p", "no:cacheprovider",
                           "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path / name)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_skips_fail_the_run_under_ci(tmp_path, ci):
    r = run_pytest(tmp_path, TINY, ci)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert "CI=true: skipped tests fail the run" in out
    assert "3 test(s) skipped" in out
    assert "SKIPPED-IN-CI test_tiny.py::test_skips_itself: dpdk-testpmd is not installed" in out
    assert "SKIPPED-IN-CI test_tiny.py::test_skipif_marker: needs root" in out
    assert "SKIPPED-IN-CI test_tiny.py::test_fixture_skips: virtiofsd is not installed" in out
    assert "test_expected_failure" not in out.split("CI=true: skipped tests fail the run")[1]   # xfail is no skip


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_skips_are_only_reported_outside_ci(tmp_path, ci):
    r = run_pytest(tmp_path, TINY, ci)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 skipped" in r.stdout and "SKIPPED-IN-CI" not in r.stdout


def test_a_module_level_skip_counts_too(tmp_path):
    src = 'import pytest\npytest.skip("no tracefs", allow_module_level=True)\n\ndef test_x():\n    pass\n'
    r = run_pytest(tmp_path, src, "true")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "SKIPPED-IN-CI test_tiny.py: no tracefs" in r.stdout


def test_nothing_skipped_passes_under_ci(tmp_path):
    r = run_pytest(tmp_path, "def test_ok():\n    assert True\n", "true")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SKIPPED-IN-CI" not in r.stdout


def test_a_failure_stays_a_failure_under_ci(tmp_path):
    r = run_pytest(tmp_path, "import pytest\ndef test_bad():\n    assert False\n"
                             "def test_skip():\n    pytest.skip('x')\n", "true")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed" in r.stdout and "SKIPPED-IN-CI test_tiny.py::test_skip: x" in r.stdout


def test_the_suites_conftest_applies_the_rule(tmp_path):
    # tests/conftest.py, loaded as the suite loads it, registers the rule under CI=true.
    r = run_pytest(tmp_path, TINY, "true", plugin="tests.conftest")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "SKIPPED-IN-CI test_tiny.py::test_skips_itself: dpdk-testpmd is not installed" in r.stdout
    r = run_pytest(tmp_path, TINY, None, plugin="tests.conftest")
    assert r.returncode == 0, r.stdout + r.stderr


# -- scripts/setup under CI: what a test would skip for fails the setup first ---------------

def run_setup(env_extra: dict, *prefix: str):
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "FASTSHADOW_TRACEFS")}
    env.update(env_extra)
    return subprocess.run([*prefix, "bash", str(ROOT / "scripts" / "setup")], capture_output=True, text=True,
                          env=env, timeout=600)


def test_setup_fails_under_ci_when_tracefs_cannot_be_mounted(tmp_path):
    where = str(tmp_path / "no-such-dir" / "tracing")      # mount(8) fails: the directory does not exist
    r = run_setup({"CI": "true", "FASTSHADOW_TRACEFS": where})
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"setup: CI=true: could not mount tracefs at {where}" in r.stderr
    # Outside CI the same machine only gets a warning (the tracing tests then say why they skip).
    r = run_setup({"FASTSHADOW_TRACEFS": where})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "could not mount tracefs (tracing tests will say why they skip)" in r.stdout


def test_setup_fails_under_ci_when_not_root():
    as_nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups") if os.geteuid() == 0 else ()
    r = run_setup({"CI": "true"}, *as_nobody)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "setup: CI=true: run as root" in r.stderr


def test_setup_passes_under_ci_on_this_machine():
    r = run_setup({"CI": "true"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tracing is possible" in r.stdout + r.stderr
