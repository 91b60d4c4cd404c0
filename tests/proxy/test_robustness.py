"""Isolated mode never strands, stalls or misleads the guest (the robustness issue).

fastshadow's own front-end (tests/proxy/blkfront.py) plays QEMU and a virtio-blk
driver in front of fastshadow and a real qemu-storage-daemon (file export). Each
case is a fault that direct mode (or the backend alone) rides out; isolated mode
must end every request exactly once with a status the driver understands, and
keep serving.
"""

from __future__ import annotations

import json
import os
import re
import select
import struct
import time

import pytest

from fastshadow.protocol.features import VirtioFeature as VF

from .blkfront import T_IN, T_OUT, BlkFront
from ..dataplane.harness import Buf

S_OK, S_IOERR = 0, 1          # VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR (VIRTIO 1.2 §5.2.6)
STALE = 0x55                  # a status byte the device must overwrite


def start(workdir, start_qsd, start_proxy, *extra, size=8 << 20, **qsd):
    qsd_proc = start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", size=size, **qsd)
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "qsd.sock"),
                         "--mode", "isolated", *extra], [str(workdir / "fs.sock")])
    return proxy, str(workdir / "fs.sock"), qsd_proc


def post(blk: BlkFront, bufs: list[Buf]) -> int:
    head = blk.q.add(bufs)
    os.eventfd_write(blk.kick, 1)
    return head


def blk_chain(blk: BlkFront, kind: int, sector: int, data_len: int, status: int = STALE):
    """(bufs, data gpa, status gpa) of a virtio-blk request, its status byte preset to `status`."""
    mem = blk.mem
    hdr = mem.alloc(16)
    mem.write(hdr, struct.pack("<IIQ", kind, 0, sector))
    buf = mem.alloc(max(data_len, 1), align=512)
    st = mem.alloc(1)
    mem.write(st, bytes([status]))
    return [Buf(hdr, 16), Buf(buf, data_len, writable=kind == T_IN), Buf(st, 1, writable=True)], buf, st


def assert_still_serves(blk: BlkFront, sector: int = 64) -> None:
    data = os.urandom(4096)
    blk.write(sector, data)
    assert blk.read(sector, 4096) == data


def test_refused_request_completes_with_the_blk_error_status(workdir, start_qsd, start_proxy):
    # Case 1's kind: any refusal (here a cap below the request) writes VIRTIO_BLK_S_IOERR into
    # the status byte, which held a stale value: the driver can never take it for a success.
    proxy, sock, _ = start(workdir, start_qsd, start_proxy, "--max-request-bytes", "65536")
    with BlkFront(sock) as blk:
        blk.bring_up()
        bufs, _, st = blk_chain(blk, T_IN, 0, 128 << 10)
        head = post(blk, bufs)
        assert blk.wait_used(1) == [(head, 1)]
        assert blk.mem.read(st, 1) == bytes([S_IOERR])
        assert_still_serves(blk)
    [line] = proxy.wait_log(r"dataplane\.refused .*request needs")
    assert f"refused request head {head}" in line
    # Structured like every other event: the device and queue as keys (a log consumer
    # selecting dev=dev0 lines, or --log-format json's fields, used to miss these).
    assert re.search(r"dataplane\.refused dev=dev0 queue=0 code=REQUEST_TOO_LARGE ", line), line


def test_request_of_exactly_the_device_limit_is_served(workdir, start_qsd, start_proxy):
    # Case 1: 4 MiB of data in one descriptor (plus header and status) is what the cap allows:
    # the cap counts data, not the 16-byte header.
    proxy, sock, _ = start(workdir, start_qsd, start_proxy, size=16 << 20)
    data = os.urandom(4 << 20)
    with BlkFront(sock) as blk:
        blk.mem.close()
        from ..dataplane.harness import GuestMem
        blk.mem = GuestMem(region_size=32 << 20)
        blk.bring_up()
        blk.write(0, data)
        assert blk.read(0, len(data)) == data
    assert "dataplane.refused" not in proxy.log()


def test_zero_length_descriptor_is_refused_before_the_backend(workdir, start_qsd, start_proxy):
    # Case 2: qemu-storage-daemon panics on a 0-byte buffer; fastshadow refuses it at the
    # boundary with the device error, the backend never sees it: no crash, no replay storm.
    proxy, sock, qsd = start(workdir, start_qsd, start_proxy)
    with BlkFront(sock) as blk:
        blk.bring_up()
        bufs, _, st = blk_chain(blk, T_IN, 0, 0)
        head = post(blk, bufs)
        assert blk.wait_used(1) == [(head, 1)]
        assert blk.mem.read(st, 1) == bytes([S_IOERR])
        assert_still_serves(blk)
    proxy.wait_log(r"dataplane\.refused .*length 0")
    log = proxy.log()
    assert "backend.lost" not in log and qsd.returncode is None, log[-2000:]


def test_header_only_request_is_refused_and_the_ring_restarts(workdir, start_qsd, start_proxy):
    # Case 4: a header-only request (no status byte) is one qemu-storage-daemon drops without
    # completing. It never reaches it; the ring stop answers without waiting for it (with a
    # 600 s --stop-timeout a stop that waited would hang the test; nothing may be held either);
    # the restart works.
    proxy, sock, _ = start(workdir, start_qsd, start_proxy, "--stop-timeout", "600")
    with BlkFront(sock) as blk:
        blk.bring_up()
        hdr = blk.mem.alloc(16)
        blk.mem.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
        head = post(blk, [Buf(hdr, 16)])
        assert blk.wait_used(1) == [(head, 0)]          # no status byte to write: len 0
        idx = blk.stop()
        assert idx == 1
        assert "vring.held" not in proxy.log() and "vring.untaken" not in proxy.log()
        blk.restart(idx)
        assert_still_serves(blk)
    proxy.wait_log(r"dataplane\.refused .*readable and 0 device-writable")
    assert "vring.held" not in proxy.log()   # nothing was left at the backend to wait for


def wait_published(stats_file, n: int, timeout: float = 30.0) -> None:
    """Until the proxy's --stats-file says queue 0 of dev0 published `n` requests to the backend."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            snap = json.loads(stats_file.read_text())
            [dev] = [d for d in snap["devices"] if d["name"] == "dev0"]
            if sum(q["stats"]["requests"] for q in dev["queues"] if q["index"] == 0) >= n:
                return
        except (OSError, ValueError):
            snap = None                 # not written yet
        if time.monotonic() > deadline:
            raise AssertionError(f"the proxy did not publish {n} requests within {timeout} s: {snap}")
        time.sleep(0.02)


def test_ring_stop_is_bounded_and_held_requests_complete_after_resume(workdir, start_qsd, start_proxy):
    # Case 4's kind: the backend holds requests past the stop deadline (a throttled
    # qemu-storage-daemon). GET_VRING_BASE answers within --stop-timeout; the requests stay
    # fastshadow's, are re-published on resume and all complete with the data verified.
    # 16 writes at 4 IOPS are 4 s of work for the backend (a throttle is a lower bound on
    # time); the stop's deadline is 0.5 s. The stop comes once the data plane has published
    # all 16 to the backend (its counters, read from --stats-file): the answer must then
    # come with requests still held.
    stats = workdir / "stats.json"
    proxy, sock, _ = start(workdir, start_qsd, start_proxy, "--stop-timeout", "0.5",
                           "--stats-interval", "0.05", "--stats-file", str(stats), throttle_iops=4)
    datas = [os.urandom(4096) for _ in range(16)]
    with BlkFront(sock) as blk:
        blk.bring_up()
        heads = {}
        for i, d in enumerate(datas):
            h, _, st = blk.request(T_OUT, 8 * i, d)
            heads[h] = st
        wait_published(stats, len(datas))
        idx = blk.stop()
        # Those the backend never took are given back (the answer rewinds over them), the
        # others are kept by fastshadow; either way all of them must complete after the restart.
        assert 0 <= idx <= len(datas)
        # The answer came without waiting for the backend: it says what it left behind.
        [line] = proxy.wait_log(r"vring\.(held|untaken) ")
        left = sum(int(n) for n in re.findall(r"\b(?:kept|returned_to_guest)=(\d+)", line))
        assert left >= 1, line
        blk.restart(idx)
        got: dict[int, int] = {}
        while len(got) < len(heads):
            got.update(blk.wait_used(1, timeout=30))
        assert set(got) == set(heads)
        assert all(blk.mem.read(st, 1) == bytes([S_OK]) for st in heads.values())
        for i, d in enumerate(datas):
            assert blk.read(8 * i, 4096) == d
    log = proxy.log()
    assert "session.refused" not in log and "session.failed" not in log, log[-3000:]


def test_enable_of_a_queue_the_device_lacks_is_refused(workdir, start_qsd, start_proxy):
    # Case 5a: never forwarded (qemu-storage-daemon would panic), never replayed.
    proxy, sock, qsd = start(workdir, start_qsd, start_proxy)
    with BlkFront(sock) as blk:
        blk.bring_up()
        try:
            blk.fe.set_vring_enable(200, True)
        except Exception:
            pass  # a failing REPLY_ACK is the expected answer when QEMU asked for one
        assert_still_serves(blk)
    [line] = proxy.wait_log(r"request\.refused dev=dev0 req=SET_VRING_ENABLE")
    assert "queue 200 does not exist" in line
    assert "backend.lost" not in proxy.log() and qsd.returncode is None


def rearm(blk: BlkFront, event_idx: bool) -> None:
    """A driver with EVENT_IDX asks for a call at the next completion (Linux's virtqueue_enable_cb)."""
    if event_idx:
        blk.q.set_used_event(blk.q.last_used)


def test_event_idx_switched_on_running_rings_loses_no_notification(workdir, start_qsd, start_proxy):
    # Case 5b: SET_FEATURES turns VIRTIO_RING_F_EVENT_IDX on, then off, while the ring runs;
    # every request of 8 completes and is signalled.
    proxy, sock, _ = start(workdir, start_qsd, start_proxy)
    with BlkFront(sock) as blk:
        features = blk.fe.get_features()
        blk.bring_up()
        for on in (True, False, True):
            # ACCESS_PLATFORM: QEMU keeps it from a vhost device without a vIOMMU.
            f = features & ~(VF.LOG_ALL | VF.RING_EVENT_IDX | VF.ACCESS_PLATFORM) | (VF.RING_EVENT_IDX if on else 0)
            blk.fe.set_features(f)
            for i in range(8):
                d = os.urandom(512)
                rearm(blk, on)
                blk.write(100 + i, d)
                rearm(blk, on)
                assert blk.read(100 + i, 512) == d
    proxy.wait_log(r"vring\.event_idx dev=dev0 on=True")


def test_backend_that_never_answers_a_ring_stop_is_replaced(workdir, start_qsd, start_proxy):
    # A backend that swallows GET_VRING_BASE (played by an interposer in front of
    # qemu-storage-daemon): QEMU gets the guest's index at --stop-timeout, the backend is
    # dropped, and the reconnected one serves the resumed ring.
    from fastshadow.protocol.messages import FrontendReq as R

    from .interposer import Answer, Interposer
    start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", size=8 << 20)
    swallowed = []

    def hook(msg):
        if msg.request == R.GET_VRING_BASE and not swallowed:
            swallowed.append(msg)
            return Answer(None)
        return msg
    mute = Interposer(str(workdir / "mute.sock"), str(workdir / "qsd.sock"), request_hook=hook)
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "mute.sock"),
                         "--mode", "isolated", "--stop-timeout", "0.5"], [str(workdir / "fs.sock")])
    try:
        with BlkFront(str(workdir / "fs.sock")) as blk:
            blk.bring_up()
            assert_still_serves(blk, 8)
            assert blk.stop() == 2
            proxy.wait_log(r"backend\.reconnected dev=dev0")
            blk.restart(2)
            assert_still_serves(blk, 16)
    finally:
        mute.close()
    [line] = proxy.wait_log(r"backend\.failed dev=dev0")
    assert "did not answer GET_VRING_BASE for queue 0 within 0.5 s" in line
    assert swallowed and "session.refused" not in proxy.log()


def test_request_that_keeps_killing_the_backend_is_poisoned(workdir, start_qsd, start_proxy):
    # No replay storm: requests in flight when the backend dies are re-published to the next
    # one (--max-replays 1); held again when that one dies too, they are failed toward the
    # guest with VIRTIO_BLK_S_IOERR and one request.poisoned line each, and the third
    # backend serves the rest. Every request ends exactly once, OK or IOERR.
    qsd_sock, disk = str(workdir / "qsd.sock"), workdir / "disk.img"
    qsd = start_qsd(qsd_sock, disk=disk, size=8 << 20, throttle_iops=1)
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", qsd_sock, "--mode", "isolated",
                         "--backend-timeout", "30"], [str(workdir / "fs.sock")])
    with BlkFront(str(workdir / "fs.sock")) as blk:
        blk.bring_up()
        status = {}
        for i in range(8):
            head, _, st = blk.request(T_OUT, 8 * i, os.urandom(4096))
            status[head] = st
        got = {}
        for n in (1, 2):                  # two backends die with requests in flight
            # The throttled backend serves one at once: then the others are surely its.
            got.update(blk.wait_used(1, timeout=30))
            qsd.kill()
            proxy.wait_log(r"backend\.lost dev=dev0 .*parked=[1-9]", count=n, timeout=20)
            qsd = start_qsd(qsd_sock, disk=disk, size=8 << 20, throttle_iops=1 if n == 1 else None)
            proxy.wait_log(r"backend\.reconnected dev=dev0 requeued=[1-9]", count=n, timeout=30)
        while len(got) < len(status):
            got.update(blk.wait_used(1, timeout=30))
        assert set(got) == set(status)
        results = {h: blk.mem.read(st, 1)[0] for h, st in status.items()}
        assert set(results.values()) <= {S_OK, S_IOERR}
        poisoned = [h for h, r in results.items() if r == S_IOERR]
        assert poisoned, results
        assert_still_serves(blk)
    lines = proxy.wait_log(r"request\.poisoned dev=|request\.poisoned detail=", count=len(poisoned))
    assert len(lines) == len(poisoned), lines


def test_reset_gives_the_backend_its_shadow_table_again(workdir, start_qsd, start_proxy):
    # After RESET_OWNER (QEMU's reset without F_RESET_DEVICE, which qemu-storage-daemon does not
    # offer) the backend is told again what it must know: the shadow memory
    # table comes again at once (the backend may have dropped it), the rings are set up
    # anew by QEMU, I/O works, and nothing of the old rings is replayed.
    from fastshadow.protocol.messages import FrontendReq as R

    from .interposer import Interposer
    start_qsd(str(workdir / "qsd.sock"), disk=workdir / "disk.img", size=8 << 20)
    rec = Interposer(str(workdir / "rec.sock"), str(workdir / "qsd.sock"))
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", str(workdir / "rec.sock"),
                         "--mode", "isolated"], [str(workdir / "fs.sock")])
    try:
        with BlkFront(str(workdir / "fs.sock")) as blk:
            blk.bring_up()
            assert_still_serves(blk, 8)
            idx = blk.stop()
            before = len(rec.seen[0])
            blk.fe.call(R.RESET_OWNER)
            blk.q.__init__(blk.mem, blk.num)          # the driver sets its ring up anew
            blk.restart(0)                           # QEMU's next request: fastshadow sent the table before
            after_reset = [s.request for s in rec.seen[0][before:]]
            assert after_reset[:2] == [R.RESET_OWNER, R.SET_MEM_TABLE], after_reset
            assert_still_serves(blk, 16)
            assert idx == 2
    finally:
        rec.close()
    assert "session.refused" not in proxy.log()


def test_feature_gated_request_without_its_feature_is_refused(workdir, start_qsd, start_proxy):
    # RESET_DEVICE without VHOST_USER_PROTOCOL_F_RESET_DEVICE (qemu-storage-daemon does not
    # offer it and panics on the request): refused at the boundary, the backend never sees it.
    from fastshadow.protocol.errors import VhostUserError
    from fastshadow.protocol.messages import FrontendReq as R
    proxy, sock, qsd = start(workdir, start_qsd, start_proxy)
    with BlkFront(sock) as blk:
        blk.bring_up()
        try:
            blk.fe.call(R.RESET_DEVICE)
        except VhostUserError:
            pass  # the failing REPLY_ACK
        assert_still_serves(blk)
    [line] = proxy.wait_log(r"request\.refused dev=dev0 req=RESET_DEVICE")
    assert "RESET_DEVICE, which was not negotiated" in line
    assert "backend.lost" not in proxy.log() and qsd.returncode is None


def test_guest_memory_truncated_under_the_proxy_does_not_kill_it(workdir, start_qsd, start_proxy):
    # A front-end (QEMU compromised, or a memory-backend-file someone truncates) shrinks the
    # guest RAM file after SET_MEM_TABLE, then posts a read whose data buffer lies in the cut
    # part. Found by hand: the proxy died of SIGBUS (exit -7) with no log line, taking every
    # device of the process with it. It must survive, end that session with one line, and
    # serve the next front-end.
    proxy, sock, _ = start(workdir, start_qsd, start_proxy)
    with BlkFront(sock, timeout=10) as blk:
        blk.bring_up()
        mem = blk.mem
        hdr = mem.alloc(16)
        mem.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
        mem.alloc(0x80000)                              # the ring stays low in region 0 ...
        buf = mem.alloc(4096, align=4096)               # ... the data buffer far above it
        st = mem.alloc(1)
        # GuestMem: region 0 (gpa 0) is the file's second half; cut the file at buf's page.
        os.ftruncate(mem.fd, mem.region_size + buf)
        post(blk, [Buf(hdr, 16), Buf(buf, 4096, writable=True), Buf(st, 1, writable=True)])
        select.select([blk.call], [], [], 2)       # the data plane copies back (or dies) here
        assert proxy.alive(), f"the proxy died ({proxy.proc.returncode}):\n{proxy.log()[-2000:]}"
        [line] = proxy.wait_log(r"dataplane\.refused dev=dev0 .*code=GUEST_MEMORY_LOST")
        assert "gpa 0x0 " in line, line          # region 0 (gpa 0) holds the cut buffer
        proxy.wait_log(r"session\.end dev=dev0 reason=.*front-end broke its guest memory")
    assert proxy.alive()
    with BlkFront(sock) as blk:
        blk.bring_up()
        assert_still_serves(blk)


def test_requests_parked_for_a_backend_that_never_returns_end_with_the_device_error(
        workdir, start_qsd, start_proxy):
    # Found by hand with a QEMU guest: qemu-storage-daemon killed mid-I/O and not restarted.
    # The session parked the requests in flight, waited --backend-timeout, ended, and they
    # were never completed: the guest's I/O hung forever, and no line said requests were lost.
    # Each must end exactly once with VIRTIO_BLK_S_IOERR (what the README promises of every
    # request), with one line naming how many, before the session ends.
    qsd_sock = str(workdir / "qsd.sock")
    qsd = start_qsd(qsd_sock, disk=workdir / "disk.img", size=8 << 20, throttle_iops=1)
    proxy = start_proxy(["--listen", str(workdir / "fs.sock"), "--backend", qsd_sock, "--mode", "isolated",
                         "--backend-timeout", "1"], [str(workdir / "fs.sock")])
    with BlkFront(str(workdir / "fs.sock")) as blk:
        blk.bring_up()
        status = {}
        for i in range(6):
            head, _, st = blk.request(T_OUT, 8 * i, os.urandom(4096))
            status[head] = st
        got = blk.wait_used(1, timeout=30)      # throttled to one at once: the rest are in flight
        qsd.kill()
        [lost] = proxy.wait_log(r"backend\.lost dev=dev0 .*parked=[1-9]")
        parked = int(re.search(r"parked=(\d+)", lost).group(1))
        proxy.wait_log(r"session\.end dev=dev0 .*no backend came back")
        while len(dict(got)) < len(status):
            got += blk.wait_used(1, timeout=10)
        done = dict(got)
        assert len(got) == len(done) == len(status), got          # each exactly once
        results = {h: blk.mem.read(st, 1)[0] for h, st in status.items()}
        assert sorted(results.values()).count(S_IOERR) >= parked, results
        assert set(results.values()) <= {S_OK, S_IOERR}, results
    [line] = proxy.wait_log(r"dataplane\.refused dev=dev0 queue=0 code=INFLIGHT_ABORTED ")
    assert f"{parked} requests in flight failed toward the guest" in line, line
