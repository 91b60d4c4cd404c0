"""Start ``dpdk-testpmd`` as a vhost-user-net backend for tests.

::

    with Testpmd(tmp_path / "net.sock") as pmd:
        ...  # QEMU: -netdev vhost-user,chardev=... -device virtio-net-pci,netdev=...,vectors=0

testpmd runs without hugepages or PCI devices (``--no-huge --no-pci``), with
one vhost port (``net_vhost0``, server mode: it listens on the socket) and a
forwarding mode: ``icmpecho`` answers ARP requests and ICMP echo requests,
so a guest can check a whole round trip through the NIC's data path.
It needs two lcores: ``--lcores`` names the CPUs (the forwarding lcore
busy-polls its CPU).
"""

from __future__ import annotations

import os
import shutil
from typing import Iterable

from .daemon import BackendDaemon

__all__ = ["Testpmd", "TestpmdError"]


class TestpmdError(RuntimeError):
    pass


class Testpmd(BackendDaemon):
    __test__ = False  # not a pytest test class, whatever its name says

    name = "dpdk-testpmd"
    error = TestpmdError

    def __init__(self, socket_path: str | os.PathLike[str], *, forward_mode: str = "icmpecho",
                 lcores: str = "0,1", queues: int = 1, memory_mb: int = 512, extra_args: Iterable[str] = (),
                 log_path: str | os.PathLike[str] | None = None, start_timeout: float = 30.0) -> None:
        super().__init__(socket_path, log_path=log_path, start_timeout=start_timeout)
        self.forward_mode = forward_mode
        self.lcores = lcores
        self.queues = queues
        self.memory_mb = memory_mb
        self.extra_args = list(extra_args)
        # Own runtime directory: several instances (and test runs) side by side.
        self.file_prefix = f"fastshadow-{os.getpid()}-{id(self):x}"

    @property
    def command(self) -> list[str]:
        path = shutil.which("dpdk-testpmd")
        if path is None:
            raise TestpmdError("dpdk-testpmd not found: apt-get install dpdk-dev")
        return [path, "-l", self.lcores, "--no-huge", "--no-pci", "-m", str(self.memory_mb),
                "--file-prefix", self.file_prefix,
                "--vdev", f"net_vhost0,iface={self.socket_path},queues={self.queues}",
                "--", f"--forward-mode={self.forward_mode}",
                "--total-num-mbufs", "16384",  # the default pool needs ~1 GiB without hugepages
                # Non-interactive: print statistics every hour instead of reading stdin.
                "--stats-period", "3600", *self.extra_args]

    def kill(self) -> None:
        super().kill()
        # A killed testpmd leaves its runtime directory (sockets, config) behind.
        shutil.rmtree(f"/var/run/dpdk/{self.file_prefix}", ignore_errors=True)
