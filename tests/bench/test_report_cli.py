"""`python -m fastshadow.bench.report FILE`: a file it cannot read gets one line saying why, not a traceback."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def report(*args):
    return subprocess.run([sys.executable, "-m", "fastshadow.bench.report", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_a_missing_file_is_one_line(tmp_path):
    out = report(tmp_path / "none.json")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith("none.json: No such file or directory")


def test_a_scale_run_is_sent_to_the_scale_report():
    out = report(ROOT / "bench" / "results" / "scale" / "results.json")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "python -m fastshadow.bench.scale" in out.stderr


def test_a_results_json_prints_its_table():
    out = report(ROOT / "bench" / "results" / "haltpoll" / "results.json")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("machine: ") and "idle: haltpoll, polls up to 200 us before halting" in out.stdout


def test_the_scale_report_says_what_it_cannot_read(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastshadow.bench.scale", str(ROOT / "bench" / "results" / "haltpoll" /
                          "results.json")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "python -m fastshadow.bench.report reads the others" in out.stderr


def test_a_file_that_is_not_a_scale_run_gets_no_scale_hint(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    out = report(tmp_path / "x.json")
    assert out.returncode == 2 and "bench.scale" not in out.stderr
