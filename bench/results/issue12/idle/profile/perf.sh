#!/bin/bash
# usage: perf.sh LABEL "PROXY ARGS"
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../../../../.."
mkdir -p /tmp/prof/$1-wd
label=$1; args=$2
.venv/bin/fastshadow bench --modes isolated --proxy-args "$args" --workload randread:4k:32 --pin split-free-proxy --reps 1 --duration 12 --workdir /tmp/prof/$label-wd --out /tmp/prof/$label > /tmp/prof/$label.log 2>&1 &
b=$!
for i in $(seq 60); do p=$(pgrep -f "fastshadow.cli proxy --listen /tmp/prof/$label-wd/" | head -1); [ -n "$p" ] && break; sleep 0.5; done
sleep 4
perf record -q -g -p $p -o /tmp/prof/$label.data -- sleep 3 >/dev/null 2>&1
perf stat -e context-switches,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_sched_yield,task-clock -p $p -- sleep 3 2> /tmp/prof/$label.stat
wait $b
perf report -i /tmp/prof/$label.data --no-children --sort sym --stdio -g none 2>/dev/null | grep -v "^#" | grep -v "^$" | head -40 > /tmp/prof/$label.txt
grep "kIOPS\|qd32" /tmp/prof/$label.log | tail -3
