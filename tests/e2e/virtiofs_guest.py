"""The guest side of the virtio-fs tests (test_fs.py, test_libvirt.py): the kernel command
that mounts the share and runs its run.sh, and run.sh itself, a two-step handshake with the
host around the test's own reads and writes."""

# In the guest's kernel command line (fastshadow.cmd=...): mount the share, run a copy of its
# run.sh (a copy, so that /mnt can be unmounted at the end).
GUEST_CMD = "mount -t virtiofs myfs /mnt && cp /mnt/run.sh /run.sh && sh /run.sh"

_WAIT = """\
i=0
while [ ! -e /mnt/{flag} ]; do
    i=$((i + 1))
    [ $i -lt 600 ] || {{ echo "host never said {flag}"; exit 3; }}
    usleep 100000
done
"""


def guest_script(work: str) -> str:
    """run.sh: print FS-MOUNTED, wait for the host's /mnt/go, run `work` (shell lines that read
    and write the share), print FS-WRITTEN, wait for /mnt/go2, unmount, print FS-UNMOUNTED."""
    return ("set -e\necho FS-MOUNTED\n" + _WAIT.format(flag="go") + work.rstrip("\n") + "\n"
            + "echo FS-WRITTEN\n" + _WAIT.format(flag="go2") + "cd /\numount /mnt\necho FS-UNMOUNTED\n")
