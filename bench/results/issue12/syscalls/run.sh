#!/bin/bash
# usage: sysc2.sh OUT PIN: isolated (this tree) vs base, interleaved, 3 reps; perf stat on each proxy for the whole run
out=$1; pin=$2
cd /work/wt-perf
.venv/bin/python -m fastshadow.bench.cli --modes isolated,base --variant base="@/work/wt-perf-base/.venv/bin/python" --workload randread:4k:32 --pin $pin --reps 3 --duration 2 --out $out > $out.log 2>&1 &
for i in $(seq 120); do sleep 0.25; l=$(grep -o "isolated proxy [0-9]*\|base proxy [0-9]*" $out.log 2>/dev/null | awk '{print $3}' | tr '\n' ' '); set -- $l; [ $# -ge 2 ] && break; done
grep "pids" $out.log
EV=raw_syscalls:sys_enter,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_write,syscalls:sys_enter_sched_yield,sched:sched_switch,task-clock
perf stat -e $EV -p $1 -o $out.isolated.perfstat &
p1=$!
perf stat -e $EV -p $2 -o $out.base.perfstat &
p2=$!
wait %1
kill -INT $p1 $p2; sleep 1
python3 - $out <<'PY'
import json,sys,re
out=sys.argv[1]
d=json.load(open(out+'/results.json'))
for m in ('isolated','base'):
    runs=[r for r in d['runs'] if r['mode']==m]
    n=sum(r['requests'] for r in runs)
    txt=open(f'{out}.{m}.perfstat').read()
    row={'iops_med':sorted(r['iops'] for r in runs)[len(runs)//2]}
    for ln in txt.splitlines():
        mm=re.match(r'\s*([\d,.]+)\s+(?:msec\s+)?(\S+)',ln)
        if mm and ':' in mm.group(2) or (mm and mm.group(2)=='task-clock'):
            v=float(mm.group(1).replace(',',''))
            row[mm.group(2).split(':')[-1]]=round(v/n*(1000 if mm.group(2)=='task-clock' else 1),4)
    print(m,'requests',n,row)
PY
