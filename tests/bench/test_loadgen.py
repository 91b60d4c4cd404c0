"""bench/'s load generator against a real qemu-storage-daemon, and `fastshadow bench --quick`
end to end with a tiny duration. No timing assertions: these check counts, data and files."""

from __future__ import annotations

import argparse
import threading

import msgspec
import numpy as np
import pytest

from fastshadow.bench.loadgen import Session, memcpy_bandwidth

QEMU_ORDER = ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "SET_OWNER",
              "GET_CONFIG", "SET_FEATURES"]


def splitmix64(x: np.ndarray) -> np.ndarray:
    """bench/loadgen.c's pattern_word, vectorised (uint64 arithmetic wraps as in C)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def pattern(disk_off: int, nbytes: int, seed: int) -> bytes:
    offs = np.arange(disk_off, disk_off + nbytes, 8, dtype=np.uint64)
    with np.errstate(over="ignore"):
        key = np.uint64(seed) * np.uint64(0x2545F4914F6CDD1D)
    return splitmix64(offs ^ key).astype("<u8").tobytes()


@pytest.mark.parametrize("queues", [1, 2])
def test_exact_request_count_against_null(workdir, start_qsd, queues):
    sock = str(workdir / "qsd.sock")
    start_qsd(sock, driver="null", size="256M", num_queues=2)
    with Session(sock, num_queues=queues, max_qd=8, max_block_size=64 << 10, timeout=10) as s:
        assert s.sent[:len(QEMU_ORDER)] == QEMU_ORDER
        assert s.sent.count("SET_MEM_TABLE") == 1 and s.sent.count("SET_VRING_ENABLE") == queues
        assert s.capacity_bytes == 256 << 20 and s.backend_queues == 2
        assert s.event_idx
        submitted = [0] * queues
        for rw, bs, qd, n in (("read", 4096, 8, 1001), ("write", 64 << 10, 3, 257), ("read", 512, 1, 50)):
            r = s.run(rw, bs, qd, requests=n)
            assert (r.requests, r.errors, r.len_mismatch) == (n, 0, 0)
            assert r.bytes == n * bs
            assert len(r.latencies_ns) == n and (r.latencies_ns > 0).all()
            assert sum(q.completed for q in r.per_queue) == n
            assert all(q.submitted == q.completed for q in r.per_queue)
            submitted = [a + q.submitted for a, q in zip(submitted, r.per_queue)]
    # Teardown (GET_VRING_BASE) stopped every ring: the back-end consumed exactly what was made available.
    assert s.last_avail == [n % 65536 for n in submitted]


def test_no_event_idx_and_thread_per_queue(workdir, start_qsd):
    sock = str(workdir / "qsd.sock")
    start_qsd(sock, driver="null", num_queues=2)
    with Session(sock, num_queues=2, max_qd=4, max_block_size=4096, event_idx=False) as s:
        assert not s.event_idx
        r = s.run("read", 4096, 4, requests=400, threads="per-queue")
        assert (r.requests, r.errors) == (400, 0)
        assert [q.completed for q in r.per_queue] == [200, 200]
    assert s.last_avail == [200, 200]


def test_duration_run_stops_and_drains(workdir, start_qsd):
    sock = str(workdir / "qsd.sock")
    start_qsd(sock, driver="null")
    with Session(sock, max_qd=16, max_block_size=4096) as s:
        r = s.run("read", 4096, 16, duration=0.2)
        assert r.requests > 0 and r.errors == 0
        assert r.per_queue[0].submitted == r.requests  # nothing left in flight
        # lg_stop from another thread ends a long run early, drained. The run is given 60 s;
        # it must end when stopped: the stop came first, and the run's own account of itself
        # says it ended before its duration (a property of the run, not a measured speed).
        stopped = threading.Event()

        def stop():
            stopped.set()
            s.stop()
        t = threading.Timer(0.3, stop)
        t.start()
        r2 = s.run("read", 4096, 16, duration=60)
        assert stopped.is_set(), "the 60 s run returned before it was stopped"
        assert r2.elapsed_ns < 60e9, "the run went to its end: the stop did not stop it"
        assert r2.requests > 0 and r2.per_queue[0].submitted == r2.requests
        total = r.requests + r2.requests
    assert s.last_avail == [total % 65536]


def test_file_backend_write_then_read_verifies_data(workdir, start_qsd):
    sock = str(workdir / "qsd.sock")
    disk = workdir / "disk.img"
    start_qsd(sock, driver="file", disk=disk, size="8M", num_queues=2)
    bs, n, seed = 64 << 10, 96, 1234          # 6 MiB, sequential over two queues
    with Session(sock, num_queues=2, max_qd=4, max_block_size=bs) as s:
        w = s.run("write", bs, 4, random=False, requests=n, pattern=True, seed=seed)
        assert (w.requests, w.errors) == (n, 0)
        r = s.run("read", bs, 4, random=False, requests=n, pattern=True, seed=seed)
        assert (r.requests, r.errors, r.verify_errors) == (n, 0, 0)
        # The check does check: the same data read against another seed's pattern fails every request.
        bad = s.run("read", bs, 4, random=False, requests=n, pattern=True, seed=seed + 1)
        assert bad.verify_errors == n
    # And the bytes are on the disk image, where the pattern says.
    data = disk.read_bytes()
    for off in (0, bs, 37 * bs, (n - 1) * bs):
        assert data[off:off + bs] == pattern(off, bs, seed), f"block at {off}"
    assert data[n * bs:n * bs + 4096] == bytes(4096)  # beyond the written range: untouched


def test_refused_session_is_a_setup_error(workdir, start_qsd):
    from fastshadow.bench.loadgen import SetupError
    sock = str(workdir / "qsd.sock")
    start_qsd(sock, driver="null", num_queues=1)
    with pytest.raises(SetupError, match="2 queues wanted"):
        Session(sock, num_queues=2).open()


def test_memcpy_bandwidth_measures():
    ns = memcpy_bandwidth(1 << 20, 5)
    assert len(ns) == 5 and all(x > 0 for x in ns)


def run_bench_cli(*argv: str) -> int:
    """`fastshadow bench ARGV...` through the real argument parser, in this process."""
    from fastshadow.bench import cli
    from tests.conftest import need_binary
    need_binary("qemu-storage-daemon")
    parser = argparse.ArgumentParser()
    cli.configure(parser.add_subparsers().add_parser("bench"))
    args = parser.parse_args(["bench", *argv])
    args.command_line = "test"
    return args.func(args)


def test_bench_quick_writes_valid_json_and_plots(workdir, tmp_path, capsys):
    from fastshadow.bench.report import Results, read_json
    out = tmp_path / "out"
    assert run_bench_cli("--quick", "--duration", "0.15", "--out", str(out),
                         "--workdir", str(workdir / "b"), "--timeout", "5") == 0
    printed = capsys.readouterr().out
    assert "[1/12]" in printed and "[12/12]" in printed
    res = msgspec.json.decode((out / "results.json").read_bytes(), type=Results)
    assert res == read_json(out / "results.json")
    assert res.settings.preset == "quick" and res.memcpy.cold_gb_per_s > 0
    # Every mode ran every workload: a mode that could not start (isolated included) fails here.
    assert res.skipped == []
    assert res.settings.modes == ["direct", "proxy-direct", "isolated"]
    assert len(res.settings.workloads) == 4
    ran = sorted((r.mode, r.workload.rw, r.workload.bs, r.workload.qd, r.workload.queues) for r in res.runs)
    assert ran == sorted((m, w.rw, w.bs, w.qd, w.queues) for m in res.settings.modes for w in res.settings.workloads)
    done = {r.mode for r in res.runs}
    for r in res.runs:
        assert r.requests > 0 and r.cpu_s.loadgen >= 0 and (r.cpu_s.proxy is None) == (r.mode == "direct")
        assert r.cpu_s.other is not None and r.cpu_s.steal is not None
    assert {s.mode for s in res.summary} == done
    assert {(r.mode, r.baseline) for r in res.ratios} >= {("proxy-direct", "direct"), ("isolated", "direct")}
    assert sorted(res.plots) == ["latency-cdf-null.png", "throughput-null.png"]
    for name in res.plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_skips_a_mode_that_cannot_start(workdir, tmp_path, capsys):
    from fastshadow.bench.report import read_json
    out = tmp_path / "out"
    # A proxy option that does not exist: `fastshadow proxy` exits at once, so proxy-direct is skipped.
    assert run_bench_cli("--modes", "direct,proxy-direct", "--workload", "randread:4k:1",
                         "--requests", "200", "--out", str(out), "--workdir", str(workdir / "b"),
                         "--proxy-args", "--no-such-option 1", "--no-memcpy", "--no-plots") == 0
    printed = capsys.readouterr().out
    assert "skip proxy-direct on null: the fastshadow proxy for proxy-direct exited with 2" in printed
    assert "[2/2] proxy-direct null 4k randread qd1: skipped" in printed
    res = read_json(out / "results.json")
    assert [(r.mode, r.requests) for r in res.runs] == [("direct", 200)]
    [skip] = res.skipped
    assert skip.mode == "proxy-direct" and skip.workload is None and "no-such-option" in skip.reason
    assert res.plots == []


def test_bench_variant_is_an_isolated_proxy_with_its_own_options(workdir, tmp_path, capsys):
    from fastshadow.bench.report import read_json
    out = tmp_path / "out"
    # Several workloads: reads and writes, small and large, QD1 and deeper, one and two queues.
    workloads = ["read:256k:4", "randwrite:4k:8", "randread:512:1", "write:64k:2:2"]
    assert run_bench_cli("--modes", "isolated", "--variant", "memcpy=--stream-copy-min 0",
                         *(a for w in workloads for a in ("--workload", w)),
                         "--requests", "300", "--reps", "2", "--out", str(out),
                         "--workdir", str(workdir / "b"), "--keep", "--no-memcpy", "--no-plots") == 0
    printed = capsys.readouterr().out
    assert "variant memcpy: isolated --stream-copy-min 0" in printed
    res = read_json(out / "results.json")
    assert res.settings.modes == ["isolated", "memcpy"]
    assert res.settings.variants == {"memcpy": ["--stream-copy-min", "0"]}
    assert res.skipped == []
    ran = sorted((r.mode, r.rep, f"{r.workload.rw}:{r.workload.bs}:{r.workload.qd}:{r.workload.queues}")
                 for r in res.runs)
    wanted = ["read:262144:4:1", "randwrite:4096:8:1", "randread:512:1:1", "write:65536:2:2"]
    assert ran == sorted((m, rep, w) for m in ("isolated", "memcpy") for rep in (0, 1) for w in wanted)
    assert all(r.requests == 300 and r.cpu_s.proxy is not None for r in res.runs)
    # The variant's proxy really ran isolated, with its option.
    log = (workdir / "b" / "proxy-null-memcpy.log").read_text()
    assert "session.start dev=bench-memcpy mode=isolated" in log


@pytest.mark.parametrize("bad", ["direct=--x", "Big=--x", "noequals", "a=--x,a=--y"])
def test_bench_bad_variants_are_refused(bad):
    from fastshadow.bench import cli
    with pytest.raises(ValueError, match="variant"):
        cli.parse_variants(bad.split(","))
