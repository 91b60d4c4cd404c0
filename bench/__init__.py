"""fastshadow's benchmark: a vhost-user load generator (virtio-blk driver emulation in C)
and the direct / proxy-direct / isolated comparison behind `fastshadow bench`. See bench/README.md."""

#: The modes compared, in table order.
MODES = ("direct", "proxy-direct", "isolated")
#: Modes run only when named (--modes): isolated with a vIOMMU played by the load generator
#: (ACCESS_PLATFORM, IOVA addresses, its memory mapped page by page in fastshadow's IOTLB).
OPTIONAL_MODES = ("isolated-iotlb",)
#: qemu-storage-daemon block drivers: null-co (pure overhead) and a file image.
BACKENDS = ("null", "file")
