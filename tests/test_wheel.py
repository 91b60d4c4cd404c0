"""fastshadow as a user gets it: `pip install .` (not editable) of this source tree into a fresh
virtualenv, then the installed commands, run away from the source tree.

The tree is copied first (the files git tracks), so the build's artefacts stay out of the
repository. Checks that the wheel carries what a source checkout reads from its folders:
the bcc program (bpf/ as package data of fastshadow.trace.bpf), the benchmark as
fastshadow.bench with its C load generator (no top-level `bench` in site-packages), the test
guest's C sources, and both cffi extensions (a real `fastshadow bench --quick` run: direct,
through the proxy, and isolated through the data plane).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need_binary

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(work dir, the venv's bin/, its site-packages) with fastshadow installed from a copy of the tree."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the files to copy come from `git ls-files`")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file():  # (a file deleted but not yet committed is skipped)
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, timeout=120)
    bin_ = work / "venv" / "bin"
    r = subprocess.run([str(bin_ / "python"), "-m", "pip", "install", "--quiet", str(src)],
                       capture_output=True, text=True, timeout=900, cwd=work)
    assert r.returncode == 0, f"pip install . failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    site = subprocess.run([str(bin_ / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, cwd=work).stdout.strip()
    return work, bin_, Path(site)


def run(venv, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    work, bin_, _ = venv
    # cwd is the work dir, not the tree: `python -m` must find the installed package.
    return subprocess.run([str(bin_ / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout,
                          cwd=work)


def test_the_wheel_holds_what_the_folders_hold(venv):
    _, _, site = venv
    pkg = site / "fastshadow"
    assert (pkg / "trace" / "bpf" / "hops.bpf.c").is_file()
    assert (pkg / "bench" / "loadgen.py").is_file() and list((pkg / "bench").glob("_loadgen*.so"))
    assert list(pkg.glob("_dataplane*.so"))
    assert (pkg / "guest" / "checker.c").is_file() and (pkg / "guest" / "init.sh").is_file()
    assert not (site / "bench").exists() and not (site / "bpf").exists()
    r = run(venv, "python", "-c", "import bench")
    assert r.returncode != 0 and "No module named 'bench'" in r.stderr


def test_trace_finds_its_probe_program(venv):
    _, _, site = venv
    r = run(venv, "fastshadow", "trace", "--check")
    # Root, headers, tracefs or bcc may be missing where this runs; the program must not be.
    assert r.returncode in (0, 1), r.stdout + r.stderr
    [line] = [ln for ln in r.stdout.splitlines() if "probe program" in ln]
    assert line.startswith("[    ok ]") and line.endswith(str(site / "fastshadow" / "trace" / "bpf" / "hops.bpf.c"))
    r = run(venv, "fastshadow", "trace", "--ebpf", "--queue", "1")
    assert r.returncode == 0, r.stderr
    assert "where a notification spends its time" in r.stdout and "if (q_ != 1) return 0;" in r.stdout


def test_bench_quick_runs_every_mode(venv):
    """The real `fastshadow bench --quick` (about 30 s here): the load generator, and proxies
    started as `python -m fastshadow.cli proxy` by the venv's own Python, isolated included."""
    need_binary("qemu-storage-daemon")
    work, _, _ = venv
    out = work / "bench-out"
    r = run(venv, "fastshadow", "bench", "--quick", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    done = {run_["mode"] for run_ in res["runs"]}
    assert done == {"direct", "proxy-direct", "isolated"}, res["skipped"]
    assert "no plots: matplotlib is not installed" in r.stdout + r.stderr  # the `plot` extra was not asked for
