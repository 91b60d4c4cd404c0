#!/bin/bash
# usage: ctxt.sh LABEL "PROXY ARGS" [pin]
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../../../../.."
mkdir -p /tmp/prof/$1-wd
label=$1; args=$2; pin=${3:-split-free-proxy}
.venv/bin/fastshadow bench --modes isolated --proxy-args "$args" --workload randread:4k:32 --pin $pin --reps 1 --duration 8 --workdir /tmp/prof/$label-wd --out /tmp/prof/$label > /tmp/prof/$label.log 2>&1 &
b=$!
for i in $(seq 60); do p=$(pgrep -f "fastshadow.cli proxy --listen /tmp/prof/$label-wd/" | head -1); [ -n "$p" ] && break; sleep 0.5; done
sleep 3
snap() { for t in /proc/$p/task/*; do n=$(cat $t/comm); case $n in fsdp-loop*) grep ctxt $t/status | awk -v n=$n '{printf "%s %s %s\n", n, $1, $2}';; esac; done; }
snap > /tmp/prof/$label.c1; sleep 2; snap > /tmp/prof/$label.c2
wait $b
paste /tmp/prof/$label.c1 /tmp/prof/$label.c2 | awk '{printf "%s %s %d/s\n", $1, $2, ($6-$3)/2}'
grep "qd32:" /tmp/prof/$label.log
