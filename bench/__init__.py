"""fastshadow's benchmark: a vhost-user load generator (virtio-blk driver emulation in C)
and the direct / proxy-direct / isolated comparison behind `fastshadow bench`. See bench/README.md."""

#: The modes compared, in table order.
MODES = ("direct", "proxy-direct", "isolated")
#: qemu-storage-daemon block drivers: null-co (pure overhead) and a file image.
BACKENDS = ("null", "file")
