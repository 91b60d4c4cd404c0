"""The systemd units in contrib/ are valid for systemd (systemd-analyze verify) and start the
proxy with options it has."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_verify(tmp_path):
    exe = Path(sys.executable).with_name("fastshadow")
    if not exe.exists():
        pytest.skip("the fastshadow console script is not installed next to this Python")
    service = (ROOT / "contrib" / "fastshadow@.service").read_text()
    assert "ExecStart=/usr/local/bin/fastshadow proxy --config /etc/fastshadow/%i.toml" in service
    (tmp_path / "fastshadow@disk0.service").write_text(service.replace("/usr/local/bin/fastshadow", str(exe)))
    shutil.copy(ROOT / "contrib" / "fastshadow@.socket", tmp_path / "fastshadow@disk0.socket")
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "fastshadow@disk0.service"),
                        str(tmp_path / "fastshadow@disk0.socket")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # The options ExecStart gives exist (a config file that is missing is the only complaint).
    r = subprocess.run([str(exe), "proxy", "--config", str(tmp_path / "disk0.toml")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "cannot read config file" in r.stderr


def test_readme_points_at_the_units():
    readme = (ROOT / "README.md").read_text()
    assert "contrib/fastshadow@.service" in readme and "contrib/fastshadow@.socket" in readme
