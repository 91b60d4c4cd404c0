#!/bin/sh
# fastshadow test guest /init (busybox ash, PID 1 of the initramfs).
#
# Kernel command line parameters (all optional):
#   fastshadow.device=/dev/vda   block device under test
#   fastshadow.check="ARGS"      run /checker with ARGS on the device
#   fastshadow.queues=N          N checker instances in parallel, instance i
#                                pinned to CPU i % ncpus, on its own disjoint
#                                slice of the device (tag q<i>)
#   fastshadow.boots=N           keep a boot counter in the last 4 KiB of the
#                                device; reboot until N boots have passed
#   fastshadow.cmd="SHELL CMD"   run this instead of the checker
#   fastshadow.modules="a b"     load only these modules (default: all shipped)
#   fastshadow.wait=SECONDS      how long to wait for the device (default 20)
#
# Console markers (parsed by fastshadow.guest.qemu):
#   FASTSHADOW-GUEST READY                      modules loaded
#   FASTSHADOW-VIRTIO virtioN device=ID features=0101... iommu=TYPE   one per probed device
#   FASTSHADOW-CHECK PASS|FAIL tag=... ...      one per checker instance
#   FASTSHADOW-GUEST DONE boot=<n> result=PASS|FAIL
# then `reboot -f` (more boots wanted) or `poweroff -f`.

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
umask 022
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The initramfs ships /dev/console, but re-open it on devtmpfs to be safe.
exec </dev/console >/dev/console 2>&1

log() { echo "fastshadow-init: $*"; }

boot=1
result=PASS
reason=

finish() {
    echo "FASTSHADOW-GUEST DONE boot=$boot result=$result${reason:+ reason=$reason}"
    sync
    if [ -n "$boots" ] && [ "$result" = PASS ] && [ "$boot" -lt "$boots" ]; then
        log "boot $boot of $boots done, rebooting"
        reboot -f
    else
        poweroff -f
    fi
    # reboot/poweroff -f do not return; never let PID 1 exit (that panics).
    while :; do sleep 3600; done
}

fail_now() {
    result=FAIL
    reason=$(echo "$*" | tr ' ' '_')
    log "FAIL: $*"
    finish
}

# --- kernel command line --------------------------------------------------
# /proc/cmdline keeps the kernel's double quotes, so let the shell split it the
# same way the kernel did.  Globbing is off: arguments are taken literally.
set -f
device=/dev/vda
check=
queues=1
boots=
cmd=
modules=
wait_s=20
cmdline=$(cat /proc/cmdline)
if ! eval "set -- $cmdline"; then
    echo "FASTSHADOW-GUEST READY"
    fail_now "cannot parse kernel command line"
fi
for arg in "$@"; do
    case "$arg" in
    fastshadow.device=*) device=${arg#*=} ;;
    fastshadow.check=*) check=${arg#*=} ;;
    fastshadow.queues=*) queues=${arg#*=} ;;
    fastshadow.boots=*) boots=${arg#*=} ;;
    fastshadow.cmd=*) cmd=${arg#*=} ;;
    fastshadow.modules=*) modules=${arg#*=} ;;
    fastshadow.wait=*) wait_s=${arg#*=} ;;
    esac
done

# --- modules --------------------------------------------------------------
# /lib/modules/order lists the shipped modules in dependency order (computed
# from modules.dep at image build time).  With fastshadow.modules only the
# named ones are loaded, still in that order; their dependencies must be named
# too.
while read -r mod; do
    if [ -n "$modules" ]; then
        case " $modules " in *" $mod "*) ;; *) continue ;; esac
    fi
    if ! insmod "/lib/modules/$mod.ko"; then
        echo "FASTSHADOW-GUEST READY"
        fail_now "insmod $mod failed"
    fi
done </lib/modules/order
# Keep kernel chatter (at info level) from splitting our marker lines.
echo 4 >/proc/sys/kernel/printk
echo "FASTSHADOW-GUEST READY"

# --- device ---------------------------------------------------------------
wait_dev() {
    # Bounded: virtio probing is asynchronous, a missing device must not hang.
    i=0
    while [ ! -b "$device" ]; do
        i=$((i + 1))
        [ "$i" -gt $((wait_s * 10)) ] && return 1
        usleep 100000
    done
    return 0
}

if [ -n "$check" ] || [ -n "$boots" ]; then
    wait_dev || fail_now "device $device did not appear within ${wait_s}s"
fi

if [ -n "$boots" ]; then
    line=$(/checker --bootcount "$device")
    echo "$line"
    case "$line" in
    "FASTSHADOW-BOOT count="*) boot=${line#FASTSHADOW-BOOT count=} ;;
    *) fail_now "boot counter failed" ;;
    esac
    gen=$boot
else
    # No boot counter: a random generation still tells this run's data apart
    # from whatever an earlier run left on the disk.
    gen=$((0x$(cut -c1-7 /proc/sys/kernel/random/uuid) + 1))
fi

# Negotiated virtio features of every device probed so far, one line each (sysfs: one
# character per bit, bit 0 first), so that a test can see what the guest accepted; and how
# the guest's DMA to it is translated: the IOMMU domain type of its PCI function's group
# (DMA: strict, DMA-FQ: lazy invalidation, identity: none), or none without an IOMMU.
set +f
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d/features" ] || continue
    iommu=$(cat "$d/../iommu_group/type" 2>/dev/null) || iommu=none
    echo "FASTSHADOW-VIRTIO ${d##*/} device=$(cat "$d/device") features=$(cat "$d/features") iommu=${iommu:-none}"
done
set -f

# --- workload -------------------------------------------------------------
if [ -n "$cmd" ]; then
    log "running: $cmd"
    sh -c "$cmd"
    rc=$?
    [ "$rc" -eq 0 ] || { result=FAIL; reason="cmd_exit_$rc"; }
elif [ -n "$check" ]; then
    name=${device##*/}
    sectors=$(cat "/sys/class/block/$name/size" 2>/dev/null)
    [ -n "$sectors" ] || fail_now "cannot read size of $device"
    # Everything below the last 4 KiB (the boot counter), in 4 KiB-aligned slices.
    usable=$((sectors * 512 - 4096))
    slice=$((usable / queues / 4096 * 4096))
    [ "$slice" -gt 0 ] || fail_now "device $device too small for $queues slices"
    ncpus=$(nproc)
    log "device=$device bytes=$((sectors * 512)) queues=$queues slice=$slice cpus=$ncpus gen=$gen"
    pids=
    i=0
    while [ "$i" -lt "$queues" ]; do
        # $check is split into words on purpose; options given there come
        # last and therefore override these defaults.
        /checker --offset $((i * slice)) --length "$slice" --cpu $((i % ncpus)) \
            --tag "q$i" --gen "$gen" --seed $((i + 1)) --drop-caches $check "$device" &
        pids="$pids $!"
        i=$((i + 1))
    done
    for pid in $pids; do
        wait "$pid" || { result=FAIL; reason=checker_failed; }
    done
fi

finish
