"""Payload types of vhost-user messages, one class per wire structure.

Each type knows its exact size (or how to compute it), decodes from bytes,
encodes back to the same bytes and checks its own *form* (alignment, no
address overflow, counts in range). Whether a payload is allowed in the
current *state* of a session is the handler's business, not this module's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import InvalidPayload, PayloadSizeMismatch

U64_MAX = (1 << 64) - 1

#: Regions a SET_MEM_TABLE may carry (VHOST_MEMORY_BASELINE_NREGIONS in QEMU).
MAX_MEM_TABLE_REGIONS = 8
#: Largest device config space a GET/SET_CONFIG may carry (VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256
#: Largest virtqueue size in a split ring.
MAX_QUEUE_SIZE = 32768
#: SET_VRING_KICK/CALL/ERR payload: bits 0-7 index, bit 8 "no fd, poll".
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8


class Payload:
    """Base of all payload types."""

    #: Exact size in bytes, or None when the size depends on the content.
    SIZE: ClassVar[int | None] = None

    @classmethod
    def decode(cls, data: bytes) -> "Payload":
        raise NotImplementedError

    def encode(self) -> bytes:
        raise NotImplementedError

    def check(self) -> None:
        """Raise InvalidPayload if the content breaks a rule of this type."""

    @classmethod
    def _expect_size(cls, data: bytes) -> None:
        if cls.SIZE is not None and len(data) != cls.SIZE:
            raise PayloadSizeMismatch(
                f"{cls.__name__} payload is {cls.SIZE} bytes, got {len(data)}")


@dataclass
class Empty(Payload):
    """No payload at all (size 0)."""

    SIZE: ClassVar[int] = 0

    @classmethod
    def decode(cls, data: bytes) -> "Empty":
        cls._expect_size(data)
        return cls()

    def encode(self) -> bytes:
        return b""


@dataclass
class U64(Payload):
    """A single 64-bit unsigned integer (features, acks, status, ...)."""

    value: int = 0
    SIZE: ClassVar[int] = 8
    _S: ClassVar[struct.Struct] = struct.Struct("=Q")

    @classmethod
    def decode(cls, data: bytes) -> "U64":
        cls._expect_size(data)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.value)


@dataclass
class VringFd(U64):
    """SET_VRING_KICK/CALL/ERR: the vring index in bits 0-7 and the no-fd flag in bit 8."""

    @property
    def index(self) -> int:
        return self.value & VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        return bool(self.value & VRING_NOFD_MASK)

    @classmethod
    def make(cls, index: int, nofd: bool = False) -> "VringFd":
        return cls(index | (VRING_NOFD_MASK if nofd else 0))

    def check(self) -> None:
        if self.value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise InvalidPayload(f"vring fd payload {self.value:#x} sets bits other than index (0-7) and no-fd (8)")


@dataclass
class VringState(Payload):
    """A vring state description: index and num (size, base, enable, endian)."""

    index: int = 0
    num: int = 0
    SIZE: ClassVar[int] = 8
    _S: ClassVar[struct.Struct] = struct.Struct("=II")

    @classmethod
    def decode(cls, data: bytes) -> "VringState":
        cls._expect_size(data)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.index, self.num)


#: VHOST_VRING_F_LOG: log writes to the used ring.
VRING_F_LOG = 1 << 0


@dataclass
class VringAddr(Payload):
    """A vring address description (SET_VRING_ADDR)."""

    index: int = 0
    flags: int = 0
    desc: int = 0
    used: int = 0
    avail: int = 0
    log: int = 0
    SIZE: ClassVar[int] = 40
    _S: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")

    @classmethod
    def decode(cls, data: bytes) -> "VringAddr":
        cls._expect_size(data)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    def check(self) -> None:
        # Split-ring alignment (VIRTIO 1.2 §2.7): desc 16, avail 2, used 4.
        if self.desc % 16:
            raise InvalidPayload(f"vring {self.index}: descriptor table address {self.desc:#x} is not 16-byte aligned")
        if self.avail % 2:
            raise InvalidPayload(f"vring {self.index}: avail ring address {self.avail:#x} is not 2-byte aligned")
        if self.used % 4:
            raise InvalidPayload(f"vring {self.index}: used ring address {self.used:#x} is not 4-byte aligned")
        if self.flags & ~VRING_F_LOG:
            raise InvalidPayload(f"vring {self.index}: unknown vring address flags {self.flags:#x}")


@dataclass
class MemoryRegion:
    """One guest memory region: guest physical address, size, QEMU's user address, mmap offset."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    _S: ClassVar[struct.Struct] = struct.Struct("=QQQQ")
    SIZE: ClassVar[int] = 32

    @classmethod
    def unpack_from(cls, data: bytes, offset: int) -> "MemoryRegion":
        return cls(*cls._S.unpack_from(data, offset))

    def pack(self) -> bytes:
        return self._S.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset)

    def check(self) -> None:
        if self.memory_size == 0:
            raise InvalidPayload(f"memory region at guest address {self.guest_phys_addr:#x} has size 0")
        for name, base in (("guest", self.guest_phys_addr), ("user", self.userspace_addr),
                           ("mmap offset", self.mmap_offset)):
            if base + self.memory_size - 1 > U64_MAX:
                raise InvalidPayload(
                    f"memory region {name} range {base:#x}+{self.memory_size:#x} wraps past 2^64")

    def overlaps(self, other: "MemoryRegion") -> str | None:
        """Which address space the two regions share bytes of: "guest" (guest-physical) or
        "user" (the front-end's user addresses, which ring addresses are given in: a ring
        address in both would have two meanings), else None."""
        for name, a, b in (("guest", self.guest_phys_addr, other.guest_phys_addr),
                           ("user", self.userspace_addr, other.userspace_addr)):
            if a < b + other.memory_size and b < a + self.memory_size:
                return name
        return None


@dataclass
class MemTable(Payload):
    """Memory regions description (SET_MEM_TABLE): a count, padding and up to 8 regions."""

    regions: list[MemoryRegion] = field(default_factory=list)
    padding: int = 0
    _H: ClassVar[struct.Struct] = struct.Struct("=II")

    @classmethod
    def decode(cls, data: bytes) -> "MemTable":
        if len(data) < cls._H.size:
            raise PayloadSizeMismatch(f"memory table payload needs at least 8 bytes, got {len(data)}")
        nregions, padding = cls._H.unpack_from(data)
        if nregions > MAX_MEM_TABLE_REGIONS:
            raise InvalidPayload(f"memory table has {nregions} regions, at most {MAX_MEM_TABLE_REGIONS} allowed")
        want = cls._H.size + nregions * MemoryRegion.SIZE
        if len(data) != want:
            raise PayloadSizeMismatch(
                f"memory table with {nregions} regions is {want} bytes, got {len(data)}")
        regions = [MemoryRegion.unpack_from(data, cls._H.size + i * MemoryRegion.SIZE) for i in range(nregions)]
        return cls(regions, padding)

    def encode(self) -> bytes:
        return self._H.pack(len(self.regions), self.padding) + b"".join(r.pack() for r in self.regions)

    def check(self) -> None:
        for i, r in enumerate(self.regions):
            r.check()
            for other in self.regions[:i]:
                if (space := r.overlaps(other)) is not None:
                    raise InvalidPayload(
                        f"memory regions at guest addresses {other.guest_phys_addr:#x} and "
                        f"{r.guest_phys_addr:#x} overlap in {space} addresses")


@dataclass
class MemRegionMsg(Payload):
    """Single memory region description (ADD_MEM_REG / REM_MEM_REG): 8 bytes padding + region."""

    region: MemoryRegion = field(default_factory=lambda: MemoryRegion(0, 0, 0, 0))
    padding: int = 0
    SIZE: ClassVar[int] = 40

    @classmethod
    def decode(cls, data: bytes) -> "MemRegionMsg":
        cls._expect_size(data)
        (padding,) = struct.unpack_from("=Q", data)
        return cls(MemoryRegion.unpack_from(data, 8), padding)

    def encode(self) -> bytes:
        return struct.pack("=Q", self.padding) + self.region.pack()

    def check(self) -> None:
        self.region.check()


@dataclass
class Log(Payload):
    """Log description (SET_LOG_BASE with LOG_SHMFD): size and offset of the dirty log."""

    mmap_size: int = 0
    mmap_offset: int = 0
    SIZE: ClassVar[int] = 16
    _S: ClassVar[struct.Struct] = struct.Struct("=QQ")

    @classmethod
    def decode(cls, data: bytes) -> "Log":
        cls._expect_size(data)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.mmap_size, self.mmap_offset)


IOTLB_MISS, IOTLB_UPDATE, IOTLB_INVALIDATE, IOTLB_ACCESS_FAIL = 1, 2, 3, 4


@dataclass
class IotlbMsg(Payload):
    """struct vhost_iotlb_msg: iova, size, uaddr, perm, type (32 bytes with C padding)."""

    iova: int = 0
    size: int = 0
    uaddr: int = 0
    perm: int = 0
    type: int = 0
    SIZE: ClassVar[int] = 32
    _S: ClassVar[struct.Struct] = struct.Struct("=QQQBB6x")

    @classmethod
    def decode(cls, data: bytes) -> "IotlbMsg":
        cls._expect_size(data)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.iova, self.size, self.uaddr, self.perm, self.type)

    def check(self) -> None:
        if self.type not in (IOTLB_MISS, IOTLB_UPDATE, IOTLB_INVALIDATE, IOTLB_ACCESS_FAIL):
            raise InvalidPayload(f"IOTLB message type {self.type} is not 1-4")
        # perm is the access a translation grants (update) or an access needs (miss, access
        # failure). An invalidation removes every access to [iova, iova + size) and carries
        # none: the kernel's vhost reads only its iova and size, and QEMU 7.2 leaves its perm
        # and uaddr uninitialized (hw/virtio/vhost-backend.c vhost_backend_invalidate_device_iotlb
        # sets iova, size and type), e.g. perm 67 with a virtio-iommu guest. Judging it would end
        # QEMU's session over stack garbage.
        if self.type != IOTLB_INVALIDATE and self.perm > 3:
            raise InvalidPayload(f"IOTLB permission {self.perm} is not 0-3")


@dataclass
class Config(Payload):
    """Virtio device config space access: offset, size, flags, then size bytes."""

    offset: int = 0
    flags: int = 0
    data: bytes = b""
    _H: ClassVar[struct.Struct] = struct.Struct("=III")

    @classmethod
    def decode(cls, data: bytes) -> "Config":
        if len(data) < cls._H.size:
            raise PayloadSizeMismatch(f"config payload needs at least 12 bytes, got {len(data)}")
        offset, size, flags = cls._H.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise InvalidPayload(f"config access of {size} bytes exceeds the {MAX_CONFIG_SIZE}-byte limit")
        if len(data) != cls._H.size + size:
            raise PayloadSizeMismatch(
                f"config payload announces {size} data bytes but carries {len(data) - cls._H.size}")
        return cls(offset, flags, bytes(data[cls._H.size:]))

    def encode(self) -> bytes:
        return self._H.pack(self.offset, len(self.data), self.flags) + self.data

    def check(self) -> None:
        if self.offset + len(self.data) > MAX_CONFIG_SIZE:
            raise InvalidPayload(
                f"config access {self.offset}+{len(self.data)} runs past the {MAX_CONFIG_SIZE}-byte config space")
        if self.flags > 1:
            raise InvalidPayload(f"config flags {self.flags:#x} are not 0 (writable) or 1 (migration)")


@dataclass
class VringArea(Payload):
    """Vring area description (back-end VRING_HOST_NOTIFIER_MSG): u64 index|flags, size, offset."""

    u64: int = 0
    size: int = 0
    offset: int = 0
    SIZE: ClassVar[int] = 24
    _S: ClassVar[struct.Struct] = struct.Struct("=QQQ")

    @classmethod
    def decode(cls, data: bytes) -> "VringArea":
        cls._expect_size(data)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.u64, self.size, self.offset)

    @property
    def index(self) -> int:
        return self.u64 & VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        return bool(self.u64 & VRING_NOFD_MASK)


@dataclass
class Inflight(Payload):
    """Inflight description: mmap size/offset, num queues, queue size (24 bytes with C padding)."""

    mmap_size: int = 0
    mmap_offset: int = 0
    num_queues: int = 0
    queue_size: int = 0
    SIZE: ClassVar[int] = 24
    _S: ClassVar[struct.Struct] = struct.Struct("=QQHH4x")

    @classmethod
    def decode(cls, data: bytes) -> "Inflight":
        cls._expect_size(data)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)


@dataclass
class Uuid(Payload):
    """A 16-byte UUID (shared objects)."""

    uuid: bytes = bytes(16)
    SIZE: ClassVar[int] = 16

    @classmethod
    def decode(cls, data: bytes) -> "Uuid":
        cls._expect_size(data)
        return cls(bytes(data))

    def encode(self) -> bytes:
        return self.uuid


@dataclass
class DeviceStateTransfer(Payload):
    """SET_DEVICE_STATE_FD: transfer direction (0 save, 1 load) and migration phase (0 stopped)."""

    direction: int = 0
    phase: int = 0
    SIZE: ClassVar[int] = 8
    _S: ClassVar[struct.Struct] = struct.Struct("=II")

    @classmethod
    def decode(cls, data: bytes) -> "DeviceStateTransfer":
        cls._expect_size(data)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.direction, self.phase)

    def check(self) -> None:
        if self.direction > 1:
            raise InvalidPayload(f"device state transfer direction {self.direction} is not 0 (save) or 1 (load)")


@dataclass
class ShmemConfig(Payload):
    """GET_SHMEM_CONFIG reply: region count, padding, 256 region sizes."""

    nregions: int = 0
    memory_sizes: tuple[int, ...] = (0,) * 256
    SIZE: ClassVar[int] = 8 + 8 * 256
    _S: ClassVar[struct.Struct] = struct.Struct("=I4x256Q")

    @classmethod
    def decode(cls, data: bytes) -> "ShmemConfig":
        cls._expect_size(data)
        values = cls._S.unpack(data)
        return cls(values[0], tuple(values[1:]))

    def encode(self) -> bytes:
        return self._S.pack(self.nregions, *self.memory_sizes)

    def check(self) -> None:
        if self.nregions > 256:
            raise InvalidPayload(f"shared memory config names {self.nregions} regions, at most 256")


@dataclass
class ShmemMap(Payload):
    """Back-end SHMEM_MAP / SHMEM_UNMAP: shmid, padding, fd offset, shm offset, length, flags."""

    shmid: int = 0
    fd_offset: int = 0
    shm_offset: int = 0
    length: int = 0
    flags: int = 0
    SIZE: ClassVar[int] = 40
    _S: ClassVar[struct.Struct] = struct.Struct("=B7xQQQQ")

    @classmethod
    def decode(cls, data: bytes) -> "ShmemMap":
        cls._expect_size(data)
        return cls(*cls._S.unpack(data))

    def encode(self) -> bytes:
        return self._S.pack(self.shmid, self.fd_offset, self.shm_offset, self.length, self.flags)


#: Upper bound of an opaque payload (crypto session descriptions).
MAX_OPAQUE_SIZE = 4096


@dataclass
class Opaque(Payload):
    """A payload fastshadow relays without interpreting (crypto sessions); only its size is bounded."""

    data: bytes = b""

    @classmethod
    def decode(cls, data: bytes) -> "Opaque":
        if len(data) > MAX_OPAQUE_SIZE:
            raise PayloadSizeMismatch(f"opaque payload of {len(data)} bytes exceeds {MAX_OPAQUE_SIZE}")
        return cls(bytes(data))

    def encode(self) -> bytes:
        return self.data
