"""A request fastshadow refuses reaches a real Linux guest as an I/O error, never as
a success over stale buffer contents (the robustness issue, DESIGN §3.7).

A QEMU TCG guest reads its vhost-user-blk disk through isolated fastshadow to
qemu-storage-daemon with a request cap (--max-request-bytes 64 KiB) below what
the guest sends: its 4 KiB O_DIRECT writes and reads work, and its 256 KiB
O_DIRECT read (one request of 256 KiB of data) must fail with EIO inside the
guest (the checker's --expect-eio mode), with one refusal line in fastshadow's
log. Before the fix the request completed with used.len 0 and the status byte
left at its previous value (0, OK), which Linux takes for a successful read.
"""

from __future__ import annotations

import pytest

from fastshadow.guest import GuestVM, run_check

pytestmark = pytest.mark.vm


def test_guest_gets_eio_for_a_refused_request(guest_image, workdir, start_qsd, start_proxy):
    start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img")
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "qsd.sock"),
                         "--mode", "isolated", "--max-request-bytes", "65536"], [str(workdir / "fs.sock")])
    with GuestVM(guest_image, blk_socket=str(workdir / "fs.sock"), cmdline={"fastshadow.check": "--expect-eio 256K"},
                 log_path=workdir / "console.log") as vm:
        result = run_check(vm, timeout=300)
    assert result.passed, result.summary() + "\n" + (workdir / "console.log").read_text()[-3000:]
    [line, *_] = proxy.wait_log(r"dataplane\.refused .*request needs")
    assert "over the limit of" in line
    log = proxy.log()
    assert "session.refused" not in log and "backend.lost" not in log, log[-3000:]
