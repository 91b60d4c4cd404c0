"""Every bad command-line value or config file is one line on stderr and exit status 2, never a
traceback; every size option takes 16M, 16MiB or bytes through one parser (fastshadow/sizes.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastshadow.cli import OneLineParser, _add_proxy_parser, build_proxy_config
from fastshadow.proxy.config import ConfigError, load_toml
from fastshadow.sizes import SizeError, format_size, parse_size


def run_cli(*argv, pre: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    """`fastshadow ARGV` in a fresh Python; `pre` runs first (e.g. hiding matplotlib)."""
    code = f"import sys\n{pre}\nfrom fastshadow.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout)


def assert_one_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def parse(*argv):
    parser = OneLineParser(prog="fastshadow")
    _add_proxy_parser(parser.add_subparsers(dest="command"))
    return build_proxy_config(parser.parse_args(["proxy", *argv]))


@pytest.mark.parametrize("text,n", [("16M", 16 << 20), ("16MiB", 16 << 20), ("16mb", 16 << 20), ("16 M", 16 << 20),
                                    ("16777216", 16 << 20), ("4k", 4096), ("4KiB", 4096), ("1G", 1 << 30),
                                    ("2T", 2 << 40), ("0", 0), ("512B", 512), (65536, 65536)])
def test_sizes(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["16x", "", "M", "-1", "1.5M", "16MiBs", "0x10", -1, True, None])
def test_not_sizes(text):
    with pytest.raises(SizeError):
        parse_size(text)


def test_format_size():
    assert [format_size(n) for n in (16 << 20, 4096, 1000, 0)] == ["16 MiB", "4 KiB", "1000 B", "0 B"]


def test_every_proxy_size_option_takes_units():
    base = ["--listen", "/tmp/a.sock", "--backend", "/tmp/b.sock"]
    for spelling in ("16M", "16MiB", str(16 << 20)):
        cfg = parse(*base, "--bounce-per-queue", spelling, "--max-request-bytes", "1M", "--stream-copy-min", "64k")
        d = cfg.device[0]
        assert (d.bounce_per_queue, d.max_request_bytes, cfg.stream_copy_min) == (16 << 20, 1 << 20, 65536)


def test_config_file_sizes_take_units(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('stream_copy_min = "64k"\n[[device]]\nname = "d0"\nlisten = "/tmp/a.sock"\n'
                 'backend = "/tmp/b.sock"\nbounce_per_queue = "32MiB"\nmax_request_bytes = 1048576\n')
    cfg = load_toml(f)
    assert (cfg.stream_copy_min, cfg.device[0].bounce_per_queue, cfg.device[0].max_request_bytes) == \
        (65536, 32 << 20, 1 << 20)
    assert cfg.device[0].mode.value == "isolated"  # the default
    f.write_text('[[device]]\nname = "d0"\nlisten = "/tmp/a.sock"\nbackend = "/tmp/b.sock"\n'
                 'bounce_per_queue = "lots"\n')
    with pytest.raises(ConfigError, match="device 'd0': bounce_per_queue: 'lots' is not a size"):
        load_toml(f)


@pytest.mark.parametrize("args,needles", [
    (["--bounce-per-queue", "16x"], ["--bounce-per-queue", "'16x' is not a size"]),
    (["--max-request-bytes", "lots"], ["--max-request-bytes", "'lots' is not a size"]),
    (["--stream-copy-min", "-5"], ["--stream-copy-min"]),
    (["--socket-mode", "999"], ["socket_mode '999'", "octal"]),
    (["--socket-mode", "0o7777"], ["socket_mode"]),
    (["--socket-group", "no-such-group-here"], ["socket_group 'no-such-group-here': no such group"]),
    (["--metrics-listen", "localhost"], ["metrics_listen 'localhost'"]),
    (["--metrics-listen", "127.0.0.1:99999"], ["metrics_listen"]),
    (["--device", "floppy"], ["--device", "floppy"]),
    (["--fd", "x"], ["--fd", "'x' is not a file descriptor"]),
])
def test_bad_proxy_values_are_one_line(args, needles):
    argv = ["proxy", "--listen", "/tmp/fs-ops-never.sock", "--backend", "/tmp/b.sock"] if args[0] != "--fd" \
        else ["proxy", "--backend", "/tmp/b.sock"]
    assert_one_line(run_cli(*argv, *args), *needles)


def test_bad_config_files_are_one_line(tmp_path):
    missing = tmp_path / "none.toml"
    assert_one_line(run_cli("proxy", "--config", str(missing)), "cannot read config file", str(missing))
    bad = tmp_path / "bad.toml"
    bad.write_text("[[device]\nname=")
    assert_one_line(run_cli("proxy", "--config", str(bad)), "cannot read config file")
    bad.write_text('[[device]]\nname = "d"\nlisten = "/tmp/x.sock"\nbackend = "/tmp/y.sock"\ncolour = "red"\n')
    assert_one_line(run_cli("proxy", "--config", str(bad)), "colour")
    bad.write_text('[[device]]\nname = "d"\nlisten = "/tmp/x.sock"\nbackend = "/tmp/y.sock"\nsocket_mode = "rw"\n')
    assert_one_line(run_cli("proxy", "--config", str(bad)), "socket_mode 'rw'")


def test_fd_that_is_no_socket_is_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with open(f) as fh:
        fd = fh.fileno()
        r = subprocess.run([sys.executable, "-m", "fastshadow.cli", "proxy", "--fd", str(fd),
                            "--backend", "/tmp/b.sock"], capture_output=True, text=True, timeout=60, pass_fds=[fd])
    assert_one_line(r, f"--fd {fd} is not a socket")
    r = run_cli("proxy", "--fd", "57", "--backend", "/tmp/b.sock")
    assert_one_line(r, "--fd 57: Bad file descriptor")


def test_bench_out_existing_file_is_one_line(tmp_path):
    f = tmp_path / "results"
    f.write_text("not a directory")
    assert_one_line(run_cli("bench", "--out", str(f), "--quick"), f"--out {f}: exists and is not a directory")
    assert f.read_text() == "not a directory"


@pytest.mark.parametrize("workload,needle", [("randread:4x:32", "block size '4x' is not a size"),
                                             ("randread:4k:many", "queue depth"),
                                             ("scan:4k:1", "want RW:BS:QD")])
def test_bench_bad_workload_is_one_line(tmp_path, workload, needle):
    assert_one_line(run_cli("bench", "--out", str(tmp_path / "o"), "--workload", workload),
                    f"bad workload {workload!r}", needle)


def test_bench_bad_sizes_and_counts_are_one_line(tmp_path):
    assert_one_line(run_cli("bench", "--out", str(tmp_path / "o"), "--file-size", "big"), "--file-size", "'big'")
    assert_one_line(run_cli("bench", "--out", str(tmp_path / "o"), "--reps", "0"), "--reps 0")
    assert_one_line(run_cli("bench", "--out", str(tmp_path / "o"), "--retry-noisy", "-1"), "--retry-noisy -1")
    assert_one_line(run_cli("bench", "--out", str(tmp_path / "o"), "--duration", "x"), "--duration")


def test_trace_plot_without_matplotlib_fails_before_tracing(tmp_path):
    r = run_cli("trace", "--pid", "1", "--duration", "30", "--plot", str(tmp_path / "t.png"),
                pre="sys.modules['matplotlib'] = None  # as if the [plot] extra were not installed")
    assert_one_line(r, "--plot needs matplotlib", "fastshadow[plot]")
    r = run_cli("trace", "--pid", "1", "--json", str(tmp_path / "no" / "t.json"))
    assert_one_line(r, "--json", "does not exist")


@pytest.mark.parametrize("args,needles", [
    # Values the data plane cannot take (csrc/device.c: at most 64 GiB of bounce space per
    # queue, a request's length fits used.len's 32 bits, a device name of at most 63 bytes):
    # accepted at start they failed every session later (a traceback, or "Invalid argument").
    (["--bounce-per-queue", "99999999T"], ["bounce_per_queue", "64 GiB"]),
    (["--bounce-per-queue", "1T"], ["bounce_per_queue", "64 GiB"]),
    (["--max-request-bytes", "4G", "--bounce-per-queue", "8G"], ["max_request_bytes", "4294967295"]),
    (["--name", "n" * 64], ["name", "63 bytes"]),
    # Timeouts that are not a number of seconds (NaN, infinite, beyond any clock): accepted
    # at start they crashed every session (ValueError / OverflowError tracebacks).
    (["--stop-timeout", "nan"], ["stop_timeout", "nan"]),
    (["--reply-timeout", "inf"], ["reply_timeout", "inf"]),
    (["--backend-timeout", "nan"], ["backend_timeout", "nan"]),
    (["--stop-timeout", "1e300"], ["stop_timeout"]),
    (["--stats-interval", "nan"], ["stats_interval", "nan"]),
    # Data plane fields of 32 and 64 bits (csrc/fsdp.h): an OverflowError traceback at the
    # first isolated session.
    (["--busy-poll-us", "99999999999999"], ["busy_poll_us", "4294967295"]),
    (["--stream-copy-min", "99999999T"], ["stream_copy_min"]),
])
def test_values_the_proxy_cannot_use_are_refused_at_start(args, needles):
    assert_one_line(run_cli("proxy", "--listen", "/tmp/fs-ops-never.sock", "--backend", "/tmp/b.sock", *args),
                    *needles)


@pytest.mark.parametrize("value", ["3", "true", '"disk0"', "{}"])
def test_config_device_that_is_not_a_list_of_tables_is_one_line(tmp_path, value):
    # `device = 3` raised TypeError out of load_toml: a traceback instead of one line.
    f = tmp_path / "p.toml"
    f.write_text(f"device = {value}\n")
    assert_one_line(run_cli("proxy", "--config", str(f)), "config file", "device")


@pytest.mark.parametrize("args,needles", [
    (["--duration", "nan"], ["--duration nan"]),        # was a ValueError traceback from the run planner
    # accepted, then every mode of the run failed (exit 1, a trial finding):
    (["--workload", "randread:4k:100000"], ["qd 1..4096"]),
    (["--queue-size", "3"], ["--queue-size 3", "power of 2"]),
    (["--file-size", "0"], ["--file-size 0", "at least 1M"]),
    (["--timeout", "inf"], ["--timeout inf"]),
])
def test_bench_seconds_that_are_not_numbers_are_one_line(tmp_path, args, needles):
    assert_one_line(run_cli("bench", "--out", str(tmp_path / "out"), *args), *needles)


@pytest.mark.parametrize("args,needles", [
    (["--interval", "0"], ["--interval 0"]),
    (["--interval", "nan"], ["--interval nan"]),
    (["--duration", "-1"], ["--duration -1"]),
    (["--queue", "-1"], ["--queue -1"]),
])
def test_trace_bad_values_are_one_line_before_attaching(args, needles):
    # They reached bcc first (a traceback when the attach failed), or a trace that never prints.
    import os
    assert_one_line(run_cli("trace", "--pid", str(os.getpid()), *args), *needles)


def test_trace_of_a_process_bcc_cannot_instrument_is_one_line():
    # bcc.USDT(pid=1) raises USDTException before any probe is enabled: it escaped as a traceback.
    r = run_cli("trace", "--pid", "1", "--duration", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("fastshadow trace: "), r.stderr


@pytest.mark.parametrize("option", ["--listen", "--backend", "--backend-listen"])
def test_socket_path_too_long_for_sockaddr_un_is_one_line(option):
    # A unix socket path holds at most 107 bytes. --listen said "cannot listen on PATH: None";
    # --backend was accepted and failed every session later.
    long = "/tmp/" + "x" * 120 + ".sock"
    argv = {"--listen": ["--listen", long, "--backend", "/tmp/b.sock"],
            "--backend": ["--listen", "/tmp/fs-ops-never.sock", "--backend", long],
            "--backend-listen": ["--listen", "/tmp/fs-ops-never.sock", "--backend-listen", long]}[option]
    assert_one_line(run_cli("proxy", *argv), long, "107 bytes")


def test_backend_that_is_our_own_listen_socket_is_one_line():
    # fastshadow connecting to itself: accepted, then every QEMU connection went round a loop
    # of qemu.refused / backend.lost lines until the backend timeout.
    assert_one_line(run_cli("proxy", "--listen", "/tmp/fs-ops-self.sock", "--backend", "/tmp/fs-ops-self.sock"),
                    "/tmp/fs-ops-self.sock", "it would connect to itself")


def test_stats_file_that_is_a_socket_path_or_a_directory_is_one_line(tmp_path):
    # --stats-file naming the --listen socket was accepted: the first snapshot was renamed over
    # the socket, and QEMU could no longer reach the proxy, without a word in the log.
    sock = str(tmp_path / "fs.sock")
    assert_one_line(run_cli("proxy", "--listen", sock, "--backend", "/tmp/b.sock", "--stats-file", sock),
                    "stats_file", sock)
    # A directory: accepted, then a stats.failed warning at every interval.
    assert_one_line(run_cli("proxy", "--listen", sock, "--backend", "/tmp/b.sock", "--stats-file", str(tmp_path)),
                    "stats_file", "directory")


def test_metrics_socket_that_is_a_device_socket_is_one_line(tmp_path):
    # It said "... is served by another fastshadow (pid N, ...)", N being this very process.
    sock = str(tmp_path / "fs.sock")
    assert_one_line(run_cli("proxy", "--listen", sock, "--backend", "/tmp/b.sock", "--metrics-listen", sock),
                    "metrics_listen", sock, "device socket")


def test_metrics_address_that_cannot_be_bound_is_one_line_and_no_backend_warning(tmp_path):
    # A trial finding: a 'backend.absent' warning came first, then the error: two lines.
    sock = str(tmp_path / "fs.sock")
    line = assert_one_line(run_cli("proxy", "--listen", sock, "--backend", str(tmp_path / "absent.sock"),
                                   "--metrics-listen", "192.0.2.1:9177"), "192.0.2.1")
    assert "backend.absent" not in line and not os.path.exists(sock)
