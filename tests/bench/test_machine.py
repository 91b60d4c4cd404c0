"""The bench's record of the machine: what a sleep/wake-up costs (runner.wake_round_trip_us), and
when a run shared it with other work (Cpu.noisy)."""

import os
import subprocess
import sys

import pytest

from fastshadow.bench.runner import wake_round_trip_us


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to wake across")
def test_wake_round_trip_is_measured_across_two_cpus_and_restores_affinity():
    before = os.sched_getaffinity(0)
    rtt = wake_round_trip_us(rounds=200)
    assert rtt is not None and 0 < rtt < 1e5     # µs: a round trip, not ns or s
    assert os.sched_getaffinity(0) == before


def test_wake_round_trip_is_none_on_one_cpu():
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                          "from fastshadow.bench.runner import wake_round_trip_us; print(wake_round_trip_us())"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None"


def test_a_run_is_noisy_when_other_work_or_steal_took_the_machine():
    """Cpu.noisy: the one rule for the report's warning and `--retry-noisy` (bench/report.py)."""
    from fastshadow.bench.report import Cpu
    quiet = Cpu(loadgen=1.0, backend=1.0, proxy=1.0, other=0.19, steal=0.09)
    assert not quiet.noisy(2.0)
    assert Cpu(loadgen=1.0, backend=1.0, other=0.21, steal=0.0).noisy(2.0)
    assert Cpu(loadgen=1.0, backend=1.0, other=0.0, steal=0.11).noisy(2.0)
    assert not Cpu(loadgen=1.0, backend=1.0).noisy(2.0)     # not measured: not called noisy
