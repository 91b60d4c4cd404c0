"""`fastshadow bench --scale` end to end, tiny: real qemu-storage-daemon exports, one isolated proxy
serving several devices, several load-generator sessions at once. No timing assertions: the
counts, the thread count, and the memory the proxy holds and gives back (shadow memfd blocks
read through /proc/PID/fd) are checked."""

from __future__ import annotations

import os
from pathlib import Path

from fastshadow.bench.scale import ScaleConfig, markdown, read_json, run_scale

RING_PAGES = 3          # desc, avail, used of a 256-entry queue: one page each (csrc/README.md)


def test_scale_points_serve_every_device_and_give_memory_back(workdir, tmp_path):
    log: list[str] = []
    cfg = ScaleConfig(devices=[1, 3], queues=[2], duration=0.3, bounce_sweep=[4 << 20, 32 << 20],
                      sweep_devices=2, sweep_queues=2, idle_trim_ms=100, out=tmp_path / "out",
                      workdir=workdir / "scale", plots=False, command="test")
    res = run_scale(cfg, log=log.append)
    assert [(p.devices, p.queues) for p in res.points] == [(1, 2), (3, 2)], log
    assert [p.bounce_per_queue for p in res.sweep] == [4 << 20, 32 << 20], log
    cpus = len(os.sched_getaffinity(0))
    for p in res.points + res.sweep:
        # the proxy's default: one data-plane thread per device, up to the CPUs
        assert p.threads == min(p.devices, cpus)
        assert p.requests > 0 and p.lat_p99_ns >= p.lat_p50_ns > 0
        queues = p.devices * p.queues
        # before any request only the rings are resident, whatever the bounce size ...
        assert p.idle.shadow_resident == queues * RING_PAGES * 4096, p
        assert p.idle.shadow_size >= queues * p.bounce_per_queue
        # ... the load faults bounce pages in, and the idle trim gives them all back
        assert p.busy.shadow_resident > p.idle.shadow_resident
        assert p.trim_seen and p.trimmed.shadow_resident == p.idle.shadow_resident, p
    assert res.sweep[0].idle.shadow_resident == res.sweep[1].idle.shadow_resident
    assert sum("starting" in line for line in log) == 4      # one progress line per point, before it
    again = read_json(Path(cfg.out) / "results.json")
    assert again == res
    table = markdown(res)
    assert table.count("\n| 3 | 2 | ") == 1 and "| 32m | 2 x 2 |" in table

