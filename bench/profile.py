#!/usr/bin/python3
"""Profiles one bench scenario with `perf record -e cpu-clock` (a software event, so it works in
VMs without hardware counters) on both Understudy daemons, and prints where their CPU goes.

  /usr/bin/python3 bench/profile.py --bin target/release/understudy t6|t1|t2|t3|t4|t10 [--seconds N] [--out DIR]

t6:  initial replication of a 1 GiB image holding 512 MiB of incompressible data;
t1:  fio 4 KiB randwrite QD32 into a replicating export (frequency 5 s);
t2:  fio 4 KiB randread QD32 from a replicating export of a 1 GiB image full of data;
t3:  fio 1 MiB sequential write QD8 into a replicating export (frequency 5 s);
t4:  fio 4 KiB randwrite QD1 into a replicating export (frequency 2 s);
t10: fio 4 KiB randwrite at 50 MiB/s into a replicating 4 GiB export (frequency 5 s).

The release profile carries debuginfo, so symbols resolve; frame pointers are off, so the
report is flat (self time per symbol), grouped by daemon and thread name.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

MiB, GiB = bench.MiB, bench.GiB
TRACE = False


def perf_start(pids, out):
    if TRACE:
        # Syscall summary per thread: count and total time, so waits (fsync, futex, ...) show.
        cmd = ["perf", "trace", "-s", "-o", out + ".trace", "-p", ",".join(map(str, pids))]
    else:
        cmd = ["perf", "record", "-e", "cpu-clock", "-F", "1999"] + (["--call-graph", os.environ["PERF_CALLGRAPH"]] if os.environ.get("PERF_CALLGRAPH") else []) + ["-o", out, "-p", ",".join(map(str, pids))]
    err = open(out + ".log", "wb")
    p = bench.spawn(cmd, "perf", subprocess.DEVNULL, err, grace=30)
    err.close()
    time.sleep(1.0)
    return p


def perf_stop(p):
    p.send_signal(2)  # SIGINT: perf writes its file and exits
    p.wait(60)
    bench.stop(p)


def report(data, title, top):
    if TRACE:
        print(f"\n### {title}: syscalls (perf trace -s)\n```")
        with open(data + ".trace") as f:
            print(f.read().strip())
        print("```")
        return
    print(f"\n### {title}\n")
    for sort in ("comm", "comm,dso,sym"):
        r = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", sort,
                            "--percent-limit", "0.7"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
        print(f"perf report --sort {sort} (top {top}):\n```")
        print("\n".join(lines[:top]))
        print("```")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("scenario", choices=["t6", "t1", "t2", "t3", "t4", "t10"])
    ap.add_argument("--seconds", type=int, default=12)
    ap.add_argument("--out", help="keep perf.data files in this directory")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--trace", action="store_true", help="perf trace -s (syscall times) instead of perf record")
    a = ap.parse_args()
    global TRACE
    TRACE = a.trace
    bench.ARGS = argparse.Namespace(bin=os.path.abspath(a.bin), keep=False, compression="zstd")
    bench.WORK = tempfile.mkdtemp(prefix="understudy-profile.", dir="/var/tmp")
    import atexit
    atexit.register(bench.cleanup)
    out_dir = a.out or bench.WORK
    os.makedirs(out_dir, exist_ok=True)
    data = os.path.join(out_dir, f"perf-{a.scenario}.data")
    with bench.Pair("prof") as pair:
        pids = [pair.a.proc.pid, pair.b.proc.pid]
        if a.scenario == "t6":
            src = bench.data_image(os.path.join(bench.WORK, "src.img"), 1 * GiB)
            pair.a.cli("vm", "create", "imp", "--disk", "1024M")
            bench.run(["nbdcopy", src, pair.a.nbd_uri("imp")])
            pair.a.cli("replication", "enable", "imp", "--replica", pair.b.addr, "--frequency", "300")
            bench.settle()
            p = perf_start(pids, data)
            t = bench.timed(lambda: pair.a.cli("replication", "start", "imp", "--wait"))
            perf_stop(p)
            print(f"initial replication of 512 MiB data: {t:.2f} s; "
                  f"measure {pair.a.json('replication', 'measure', 'imp')}")
        else:
            size = "4096M" if a.scenario == "t10" else "1024M"
            if a.scenario == "t2":
                img = bench.data_image(os.path.join(bench.WORK, "rd.img"), 1 * GiB, data_fraction_half=False)
                pair.a.cli("vm", "import", "w", "--image", img)
                pair.a.cli("replication", "enable", "w", "--replica", pair.b.addr, "--frequency", "5")
                pair.a.cli("replication", "start", "w", "--wait")
                uri = pair.a.nbd_uri("w")
            else:
                uri = pair.replicating_vm("w", size, 2 if a.scenario == "t4" else 5)
            rw, bs, qd, extra = {
                "t1": ("randwrite", "4k", 32, []),
                "t2": ("randread", "4k", 32, []),
                "t4": ("randwrite", "4k", 1, []),
                "t3": ("write", "1m", 8, []),
                "t10": ("randwrite", "4k", 4, ["--rate=50m", "--refill_buffers"]),
            }[a.scenario]
            p = perf_start(pids, data)
            job = bench.fio(uri, rw, bs, qd, a.seconds, extra)
            perf_stop(p)
            m = pair.a.json("replication", "measure", "w")
            side = job["read"] if a.scenario == "t2" else job["write"]
            print(f"fio: {side['iops']:.0f} IOPS, {side['bw_bytes'] / MiB:.0f} MiB/s; measure {m}")
        report(data, f"scenario {a.scenario}: daemons' CPU (primary pid {pids[0]}, replica pid {pids[1]})", a.top)


if __name__ == "__main__":
    main()
