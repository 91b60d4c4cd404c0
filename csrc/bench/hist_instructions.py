"""What the always-on latency histograms (csrc/hist.c) cost, in instructions per request.

Wall-clock comparisons on this shared 2-CPU host move by ±20-40 % from run to
run (bench/RESULTS.md, "Tracing overhead"), far more than the histograms can
cost.  Instruction counts do not: this drives the synchronous engine
(fsdp_dev_poll, the same intake/harvest/publish code the loop thread runs)
through the test harness with 4 KiB blk reads, 32 per batch, once with the
histograms on and once off, each under callgrind, and prints the instructions
fsdp_dev_poll executed per request (inclusive, so chain walks, copies, the
histograms' stamps and folds are all in it).  Not counted: the loop thread's
one stamp per drain of kick/call completions (csrc/loop.c), absent in the
synchronous engine: one clock read per wake-up, shared by every request of it.

    python csrc/bench/hist_instructions.py [requests] [--json FILE]   # from the repository root; needs valgrind

What the USDT probes cost while no tracer is attached (each is a nop), the same
way, with one build that has them and one that has not (the histograms on in both):

    python csrc/bench/hist_instructions.py --single instructions_probes 2048 --json FILE
    touch csrc/probes.h && FASTSHADOW_NO_PROBES=1 bash scripts/setup   # (setup rebuilds on csrc/ changes)
    python csrc/bench/hist_instructions.py --single instructions_no_probes 2048 --json FILE
    touch csrc/probes.h && bash scripts/setup              # the normal build again

--json writes {"requests", "instructions_on", "instructions_off"} (totals of
fsdp_dev_poll) for bench/RESULTS.md to quote (tests/bench/test_doc_figures.py).

Not part of the extension or the wheel (csrc/bench/).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BATCH = 32


#: Requests per rig: the harness's test RAM (two 1 MiB regions) holds this many 4 KiB reads.
PER_RIG = 4 * BATCH


def drive(latency_histograms: bool, requests: int) -> None:
    sys.path.insert(0, ROOT)
    from tests.dataplane.harness import Rig
    done = 0
    while done < requests:
        rig = Rig(num=128, bounce=8 << 20, latency_histograms=latency_histograms)
        for _ in range(PER_RIG // BATCH):
            for _ in range(BATCH):
                rig.blk_read(0, 4096)
            rig.poll()                              # intake: 32 requests shadowed
            rig.serve(0, rig.be[0].pending())
            rig.poll()                              # harvest: 32 completed toward the guest
            done += len(rig.gq[0].take_used())
        assert rig.dev.stats(0).completed == PER_RIG
        assert sum(h.total for h in rig.dev.latency(0)) == (4 * PER_RIG if latency_histograms else 0)
        rig.close()


def poll_instructions(latency_histograms: bool, requests: int) -> int:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "cg.out")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                        os.path.abspath(__file__), "--drive", "on" if latency_histograms else "off", str(requests)],
                       check=True, capture_output=True)
        ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", out], check=True, capture_output=True,
                             text=True).stdout
    for line in ann.splitlines():
        m = re.match(r"\s*([\d,]+)\s.*\bfsdp_dev_poll\b", line)
        if m and "_cffi" not in line:
            return int(m.group(1).replace(",", ""))
    raise RuntimeError("fsdp_dev_poll not in the callgrind profile")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--drive"]:
        drive(argv[1] == "on", int(argv[2]))
        return 0
    json_path = None
    if "--json" in argv:
        i = argv.index("--json")
        json_path = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    single = None
    if "--single" in argv:
        i = argv.index("--single")
        single = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    n = int(argv[0]) if argv else 2048
    n -= n % PER_RIG
    if single is not None:
        total = poll_instructions(True, n)
        print(f"{single}: {total / n:.1f} instructions per request ({n} requests, histograms on)")
        if json_path:
            import json
            data = json.load(open(json_path)) if os.path.exists(json_path) else {}
            if data.get("requests", n) != n:
                raise SystemExit(f"{json_path} holds counts of {data['requests']} requests, not {n}")
            data.update({"requests": n, single: total})
            with open(json_path, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
        return 0
    on, off = poll_instructions(True, n), poll_instructions(False, n)
    print(f"{n} requests of 4 KiB, {BATCH} per batch, synchronous engine (fsdp_dev_poll, inclusive):")
    print(f"  histograms on : {on / n:8.1f} instructions per request")
    print(f"  histograms off: {off / n:8.1f} instructions per request")
    print(f"  cost          : {(on - off) / n:8.1f} instructions per request = {100 * (on - off) / off:.2f} %")
    if json_path:
        import json
        with open(json_path, "w") as f:
            json.dump({"requests": n, "instructions_on": on, "instructions_off": off,
                       "what": "fsdp_dev_poll inclusive, callgrind, 4 KiB blk reads, 32 per batch"}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
