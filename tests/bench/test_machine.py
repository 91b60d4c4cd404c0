"""The bench's record of the machine: what a sleep/wake-up costs (runner.wake_round_trip_us)."""

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
