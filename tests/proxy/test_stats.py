"""Live stats of a running proxy (`--stats-interval`, `--stats-file`): one isolated
device doing block I/O to a real qemu-storage-daemon, one direct device nobody
connected to, both served by one process."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from fastshadow.proxy.config import ConfigError, DeviceConfig, ProxyConfig

from .blkfront import BlkFront


def read_stats(path, want, timeout=15.0) -> dict:
    """The stats file once `want(snapshot)` holds."""
    deadline = time.monotonic() + timeout
    snap = None
    while time.monotonic() < deadline:
        try:
            snap = json.loads(path.read_text())
        except (OSError, ValueError):  # not written yet (never partial: replaced atomically)
            snap = None
        if snap is not None and want(snap):
            return snap
        time.sleep(0.05)
    raise AssertionError(f"stats file never matched; last: {snap}")


def device(snap: dict, name: str) -> dict:
    [d] = [d for d in snap["devices"] if d["name"] == name]
    return d


def test_stats_file_and_log_lines(workdir, start_qsd, start_proxy):
    start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", size=1 << 20)
    stats = workdir / "stats.json"
    proxy = start_proxy(["--listen", str(workdir / "iso.sock"), "--backend", str(workdir / "qsd.sock"),
                         "--mode", "isolated",
                         "--listen", str(workdir / "dir.sock"), "--backend", str(workdir / "nobody.sock"),
                         "--mode", "direct",
                         "--stats-interval", "0.2", "--stats-file", str(stats)],
                        [str(workdir / "iso.sock"), str(workdir / "dir.sock")])
    idle = read_stats(stats, lambda s: len(s["devices"]) == 2)
    assert device(idle, "dev1") == {"name": "dev1", "mode": "direct", "device": "blk", "connected": False,
                                    "sessions": 0, "queues": [], "isolation": "direct", "backend_reconnects": 0,
                                    "qemu": None, "backend": None, "dataplane_thread": None,
                                    "shadow_resident_bytes": 0}
    data = os.urandom(8192)
    with BlkFront(str(workdir / "iso.sock")) as blk:
        blk.bring_up()
        blk.write(3, data)
        assert blk.read(3, len(data)) == data
        snap = read_stats(stats, lambda s: device(s, "dev0")["queues"]
                          and device(s, "dev0")["queues"][0]["stats"]["completed"] == 2)
        iso = device(snap, "dev0")
        assert iso["connected"] and iso["sessions"] == 1 and iso["mode"] == "isolated"
        [q0] = iso["queues"]
        st = q0["stats"]
        assert q0["index"] == 0 and st["requests"] == 2 and st["inflight"] == 0 and st["refused"] == 0
        # Bytes the backend read from the shadow (2 headers + the written data) and wrote
        # (the read data + 2 status bytes).
        assert st["bytes_in"] == 2 * 16 + len(data) and st["bytes_out"] == len(data) + 2
        assert st["bounce_bytes"] == 0 and q0["refused_by_reason"] == {}
        # The data plane's own histograms: both requests, once per hop, in true microseconds.
        assert {h["hop"]: sum(h["counts"]) for h in q0["latency"]} == {
            "kick_to_shadowed": 2, "backend": 2, "call_to_used": 2, "end_to_end": 2}
        assert {h["unit"] for h in q0["latency"]} == {"us"}
        assert snap["interval_s"] == 0.2 and snap["uptime_s"] > 0
        # one data-plane thread (one isolated device); its shadow holds the 3 ring pages and the
        # bounce pages the requests used (given back only after --idle-trim-ms)
        assert iso["dataplane_thread"] == 0 and iso["shadow_resident_bytes"] >= 4 * 4096
    lines = proxy.wait_log(r"info stats dev=dev0 mode=isolated connected=True sessions=1 queues=1 requests=2 ")
    assert re.search(r"req_per_s=(-|[\d.]+) mb_in_per_s=(-|[\d.]+) mb_out_per_s=(-|[\d.]+)", lines[0]), lines[0]
    assert re.search(r" bounce_kib=\d+ backpressure_ms=[\d.]+( |$)", lines[0]), lines[0]
    proxy.wait_log(r"info stats dev=dev1 mode=direct connected=False sessions=0$")
    # The front-end left: the device shows it.
    read_stats(stats, lambda s: not device(s, "dev0")["connected"])


def test_stats_config_is_checked(tmp_path):
    dev = DeviceConfig(name="d", listen=str(tmp_path / "l.sock"), backend=str(tmp_path / "b.sock"))
    with pytest.raises(ConfigError, match="stats_interval -1: want seconds >= 0"):
        ProxyConfig(device=[dev], stats_interval=-1).validate()
    with pytest.raises(ConfigError, match="its directory does not exist"):
        ProxyConfig(device=[dev], stats_file=str(tmp_path / "no" / "stats.json")).validate()
    assert ProxyConfig(device=[dev], stats_file=str(tmp_path / "s.json")).stats_period == 5.0
    assert ProxyConfig(device=[dev]).stats_period == 0.0


def test_stats_file_is_replaced_without_following_planted_links(tmp_path):
    from fastshadow.proxy.stats import write_atomically
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    path = tmp_path / "stats.json"
    for pid in range(os.getpid() - 2, os.getpid() + 3):    # the names a predictable scheme would use
        (tmp_path / f"stats.json.tmp.{pid}").symlink_to(victim)
    write_atomically(str(path), b'{"devices": []}')
    write_atomically(str(path), b'{"devices": [1]}')
    assert victim.read_text() == "keep me"
    assert json.loads(path.read_text()) == {"devices": [1]} and oct(path.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_symlink()) == ["stats.json", "victim"]
