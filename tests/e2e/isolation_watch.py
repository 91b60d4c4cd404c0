"""Isolation checked over a whole run, not in one snapshot (tests/README.md).

Two witnesses, both from outside fastshadow:

* the backend's `/proc` (fastshadow.isolation.check_isolation: what its process
  tree maps and holds), taken at named points of a run: each boot, after a
  backend reconnect, after a migration, for each backend and QEMU involved;
* every fd the backend was *sent*, recorded by an Interposer
  (tests/proxy/interposer.py) on the backend socket for the whole run, every
  connection: each fd's (st_dev, st_ino) is compared with QEMU's guest-RAM
  memfds (taken from QEMU's own /proc/PID/fd while it runs).

In isolated mode every snapshot must be isolated, no fd sent may be guest RAM,
and every memfd sent must be a fastshadow shadow region. In direct mode the same
witnesses must see guest RAM (else they prove nothing).
"""

from __future__ import annotations

import os

from fastshadow.isolation import SHADOW_PREFIX, IsolationReport, check_isolation, guest_ram_inodes, read_fds

from ..proxy.interposer import Interposer


def guest_ram_ids(qemu_pid: int) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of QEMU's guest-RAM memfds, from the fds QEMU holds."""
    inodes = guest_ram_inodes(qemu_pid)
    out = set()
    for fd, (target, ino) in read_fds(qemu_pid).items():
        if ino in inodes and target.startswith("/memfd:"):
            try:
                st = os.stat(f"/proc/{qemu_pid}/fd/{fd}")
            except OSError:
                continue
            out.add((st.st_dev, st.st_ino))
    return out


class IsolationWatch:
    def __init__(self, recorder: Interposer | None = None):
        self.recorder = recorder
        self.points: list[tuple[str, IsolationReport]] = []
        self.guest_ids: set[tuple[int, int]] = set()

    def check(self, when: str, backend_pid: int, qemu_pid: int) -> IsolationReport:
        """One /proc snapshot of the backend against this QEMU's guest RAM (QEMU must run)."""
        report = check_isolation(backend_pid, qemu_pid)
        self.points.append((when, report))
        self.note_guest(qemu_pid)
        return report

    def note_guest(self, qemu_pid: int) -> None:
        """Remember this QEMU's guest-RAM memfds, to compare the fds sent with at the end."""
        self.guest_ids |= guest_ram_ids(qemu_pid)

    def sent(self):
        return self.recorder.received_fds() if self.recorder is not None else []

    def guest_ram_sent(self):
        return [(n, req.name, fd.target) for n, req, fd in self.sent() if (fd.dev, fd.ino) in self.guest_ids]

    def lines(self) -> list[str]:
        out = []
        for when, rep in self.points:
            out.append(f"[{when}]")
            out += rep.lines()
        if self.recorder is not None:
            sent = self.sent()
            out.append(f"fds sent to the backend ({len(self.recorder.seen)} connections, {len(sent)} fds):")
            out += [f"  conn {n} {req.name}: {fd.target} dev={fd.dev} ino={fd.ino}"
                    for n, req, fd in sent if fd.target != "anon_inode:[eventfd]"]
            out.append(f"  and {sum(fd.target == 'anon_inode:[eventfd]' for _, _, fd in sent)} eventfds")
            out.append(f"QEMU guest-RAM memfds (dev, ino): {sorted(self.guest_ids)}")
        return out

    def assert_isolated(self, *, points: int) -> None:
        text = "\n".join(self.lines())
        assert len(self.points) == points, text
        for when, rep in self.points:
            assert rep.guest_inodes, f"[{when}] could not find QEMU's guest RAM memfd\n{text}"
            assert not rep.guest_maps and not rep.guest_fds, f"[{when}] the backend reaches guest RAM\n{text}"
            assert rep.isolated, f"[{when}] not isolated\n{text}"
        if self.recorder is not None:
            assert self.guest_ids, "could not find QEMU's guest-RAM memfds\n" + text
            assert self.recorder.seen, "the recorder saw no backend connection\n" + text
            assert not self.guest_ram_sent(), f"guest RAM fds were sent to the backend: {self.guest_ram_sent()}\n{text}"
            memfds = [fd for _, _, fd in self.sent() if fd.is_memfd]
            assert memfds, "no shadow region was sent to the backend\n" + text
            assert all(fd.target.startswith("/" + SHADOW_PREFIX) for fd in memfds), text

    def assert_guest_ram_reached(self) -> None:
        """Direct mode: the same witnesses see guest RAM (so they can fail)."""
        text = "\n".join(self.lines())
        assert self.points and all(rep.guest_maps and not rep.isolated for _, rep in self.points), text
        if self.recorder is not None:
            assert self.guest_ram_sent(), "direct mode must send guest RAM fds to the backend\n" + text
