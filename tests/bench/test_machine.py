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


def test_the_idle_policy_is_read_from_sysfs_and_none_where_absent(tmp_path):
    from fastshadow.bench.runner import idle_policy
    gov, poll = tmp_path / "current_governor", tmp_path / "guest_halt_poll_ns"
    assert idle_policy(gov, poll) == {"cpuidle_governor": None, "guest_halt_poll_ns": None}
    (tmp_path / "current_governor_ro").write_text("menu\n")     # kernels before 5.x: read-only file
    assert idle_policy(gov, poll) == {"cpuidle_governor": "menu", "guest_halt_poll_ns": None}
    gov.write_text("haltpoll\n")
    poll.write_text("200000\n")
    assert idle_policy(gov, poll) == {"cpuidle_governor": "haltpoll", "guest_halt_poll_ns": 200000}


def test_the_machine_record_holds_this_machines_idle_policy():
    from fastshadow.bench.runner import idle_policy, machine_info
    m = machine_info()
    assert {"cpuidle_governor": m.cpuidle_governor, "guest_halt_poll_ns": m.guest_halt_poll_ns} == idle_policy()


def test_the_report_names_the_idle_policy():
    from fastshadow.bench.report import Machine, idle_label
    m = Machine(hostname="h", nproc=2, kernel="k", cpu_model="c", mem_total_bytes=1, python="3",
                qemu_storage_daemon="q", fastshadow="f")
    assert idle_label(m) == ""
    m.cpuidle_governor = "haltpoll"
    m.guest_halt_poll_ns = 0
    assert idle_label(m) == ", idle: haltpoll, halts at once (guest_halt_poll_ns 0)"
    m.guest_halt_poll_ns = 200000
    assert idle_label(m) == ", idle: haltpoll, polls up to 200 us before halting"
    m.cpuidle_governor = "menu"                     # the parameter exists, but menu does not poll by it
    assert idle_label(m) == ", idle: menu"


def _sysfs(tmp_path, governor="haltpoll", poll="0"):
    """A fake haltpoll governor and parameter, and the lock, under tmp_path."""
    (tmp_path / "current_governor").write_text(f"{governor}\n")
    (tmp_path / "guest_halt_poll_ns").write_text(f"{poll}\n")
    return dict(path=tmp_path / "guest_halt_poll_ns", governor=tmp_path / "current_governor",
                lock=tmp_path / "lock")


def test_guest_halt_poll_sets_the_value_for_the_block_and_puts_the_old_one_back(tmp_path):
    from fastshadow.bench.runner import guest_halt_poll
    fs = _sysfs(tmp_path)
    poll = fs["path"]
    with guest_halt_poll(200000, **fs) as old:
        assert poll.read_text() == "200000\n" and old == "0"
    assert poll.read_text() == "0\n"
    with pytest.raises(KeyboardInterrupt):          # Ctrl-C / SIGTERM / SIGHUP during the bench
        with guest_halt_poll(5, **fs):
            raise KeyboardInterrupt
    assert poll.read_text() == "0\n"
    with guest_halt_poll(None, **fs) as old:        # not asked: not touched
        assert poll.read_text() == "0\n" and old is None


def test_guest_halt_poll_leaves_a_value_someone_else_set_meanwhile(tmp_path, capsys):
    from fastshadow.bench.runner import guest_halt_poll
    fs = _sysfs(tmp_path)
    with guest_halt_poll(200000, **fs):
        fs["path"].write_text("7\n")
    assert fs["path"].read_text() == "7\n"
    assert "is 7, set by someone else during the bench: left as it is, not put back to 0" in capsys.readouterr().err


def test_a_second_bench_cannot_set_the_value_while_one_holds_it(tmp_path):
    from fastshadow.bench.runner import IdlePolicyError, guest_halt_poll
    fs = _sysfs(tmp_path)
    with guest_halt_poll(200000, **fs):
        with pytest.raises(IdlePolicyError, match=r"another bench has set the value and not yet put it back"):
            with guest_halt_poll(100000, **fs):
                pass
        assert fs["path"].read_text() == "200000\n"
    assert fs["path"].read_text() == "0\n"
    with guest_halt_poll(100000, **fs):             # released: the next bench may
        pass


def test_guest_halt_poll_says_why_it_cannot_set_the_value(tmp_path):
    from fastshadow.bench.runner import IdlePolicyError, guest_halt_poll
    fs = _sysfs(tmp_path, governor="menu")
    with pytest.raises(IdlePolicyError, match=r"governor here is menu, not haltpoll, so the value would change nothing"):
        with guest_halt_poll(5, **fs):
            pass
    fs = _sysfs(tmp_path)
    fs["path"].unlink()
    fs["path"].mkdir()                              # exists but cannot be read or written as a file
    with pytest.raises(IdlePolicyError, match=r"--guest-halt-poll-ns 5: cannot set .*haltpoll cpuidle driver"):
        with guest_halt_poll(5, **fs):
            pass


@pytest.mark.parametrize("bad", ["-3", "4294967296", "1e5", " 5"])
def test_the_bench_refuses_a_halt_poll_it_cannot_set(bad):
    out = subprocess.run([sys.executable, "-m", "fastshadow.bench.cli", "--guest-halt-poll-ns", bad],
                         capture_output=True, text=True)
    assert out.returncode == 2 and f"--guest-halt-poll-ns: {bad!r}: want a whole number of ns, 0 to 1000000000 (1 s)" in out.stderr


def test_pin_own_gives_each_process_its_own_cpus(monkeypatch):
    from fastshadow.bench import runner
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    p = runner.placement("own")
    assert (p.loadgen, p.backend, p.proxy) == ({0}, {1}, {2, 3})
    p = runner.placement("split-free-proxy")        # the others as they were
    assert (p.loadgen, p.backend, p.proxy) == ({0}, {1, 2, 3}, {0, 1, 2, 3})
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(ValueError, match=r"--pin own needs 3 CPUs .* may use 2"):
        runner.placement("own")


def test_the_bench_refuses_pin_own_on_two_cpus_before_it_runs():
    out = subprocess.run(["taskset", "-c", "0,1", sys.executable, "-m", "fastshadow.bench.cli", "--pin", "own",
                          "--out", "/nonexistent/never-created"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--pin own needs 3 CPUs" in out.stderr, out.stderr


@pytest.mark.skipif(not os.access("/sys/module/haltpoll/parameters/guest_halt_poll_ns", os.W_OK),
                    reason="needs root in a KVM guest with the haltpoll cpuidle driver")
@pytest.mark.parametrize("how", [["--modes", "direct", "--workload", "randread:4k:1"],
                                 ["--scale", "--scale-devices", "1", "--scale-queues", "1", "--scale-bounce", "2M"]],
                         ids=["bench", "scale"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_stopped_bench_puts_the_idle_policy_back(tmp_path, how, sig):
    import signal
    from fastshadow.bench.runner import GUEST_HALT_POLL_NS
    before = GUEST_HALT_POLL_NS.read_text()
    want = "12345" if before.strip() != "12345" else "23456"
    p = subprocess.Popen([sys.executable, "-m", "fastshadow.bench.cli", *how, "--guest-halt-poll-ns", want,
                          "--duration", "30", "--no-memcpy", "--no-plots", "--out", str(tmp_path / "out")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:                       # the value is set once this line is out
            if "guest_halt_poll_ns" in line:
                break
        assert GUEST_HALT_POLL_NS.read_text().strip() == want
        p.send_signal(getattr(signal, sig))
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        after = GUEST_HALT_POLL_NS.read_text()
        if after != before:                         # the machine is shared: never leave it changed
            GUEST_HALT_POLL_NS.write_text(before)
    assert p.returncode == 130, err
    assert after == before
