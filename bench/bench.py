#!/usr/bin/python3
"""Understudy benchmark suite (run it through bench/run, which installs the tools and builds).

Every figure is measured back to back with its reference on the same kind of sparse raw image,
in the same work directory (same file system), with the same client (fio's nbd engine or
nbdcopy), interleaved run by run so that the noise of a shared machine hits both sides alike.
The table reports medians and ratios against the targets of BENCH.md.

No process outlives the suite: every child gets PR_SET_PDEATHSIG (SIGKILL) through setpriv,
is stopped in a finally/atexit handler, and the work directory is removed at the end.
"""

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

ARGS = None
WORK = None
PROCS = []  # live children: (Popen, name, graceful seconds)
NETS = []  # live network namespaces (Link), removed by cleanup()
DETAILS = []  # free-form lines printed after the table


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def detail(msg):
    DETAILS.append(msg)
    log(msg)


# ---------------------------------------------------------------- processes and cleanup

def wrap(cmd):
    # setpriv --pdeathsig: the child is killed if this script dies, even by SIGKILL.
    return ["setpriv", "--pdeathsig", "KILL", "--"] + [str(c) for c in cmd]


def spawn(cmd, name, stdout, stderr, grace=20):
    p = subprocess.Popen(wrap(cmd), stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
    PROCS.append((p, name, grace))
    return p


def stop(p):
    for i, (q, name, grace) in enumerate(PROCS):
        if q is p:
            del PROCS[i]
            break
    else:
        grace = 10
    if p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def cleanup():
    while PROCS:
        stop(PROCS[-1][0])
    while NETS:  # after the processes: nothing runs in a namespace any more
        NETS[-1].close()
    if WORK and os.path.isdir(WORK) and not ARGS.keep:
        shutil.rmtree(WORK, ignore_errors=True)


def on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def run(cmd, timeout=600, check=True):
    r = subprocess.run(wrap(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return r


def wait_socket(path, proc, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before serving")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not open {path} within {timeout} s")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def cpu_s(pid):
    """User + system CPU seconds of a process (setpriv execs, so a Popen pid is the server)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- images

_POOL = None


def pool():
    global _POOL
    if _POOL is None:
        _POOL = os.urandom(64 * MiB)
    return _POOL


def sparse_image(path, size):
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def data_image(path, size, data_fraction_half=True, chunk=4 * MiB):
    """A sparse image holding incompressible data in every other 4 MiB chunk (half data), or
    in every chunk when data_fraction_half is False."""
    sparse_image(path, size)
    p = pool()
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(size // chunk):
            if data_fraction_half and i % 2 == 1:
                continue
            off = (i * chunk) % len(p)
            os.pwrite(fd, p[off:off + chunk], i * chunk)
    finally:
        os.close(fd)
    return path


# ---------------------------------------------------------------- reference servers

_SERIAL = [0]


class RefServer:
    """nbdkit file or qemu-nbd serving one raw file on a Unix socket."""

    def __init__(self, kind, image, tag):
        self.kind = kind
        _SERIAL[0] += 1
        tag = f"{tag}-{_SERIAL[0]}"
        self.sock = os.path.join(WORK, f"{kind}-{tag}.sock")
        errlog = open(os.path.join(WORK, f"{kind}-{tag}.log"), "ab")
        if kind == "nbdkit":
            cmd = ["nbdkit", "-f", "-U", self.sock, "file", image]
        elif kind == "qemu-nbd":
            cmd = ["qemu-nbd", "-t", "-f", "raw", "-k", self.sock, image]
        else:
            raise ValueError(kind)
        self.proc = spawn(cmd, kind, subprocess.DEVNULL, errlog, grace=10)
        errlog.close()
        wait_socket(self.sock, self.proc, kind)
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def close(self):
        stop(self.proc)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


# ---------------------------------------------------------------- a shaped link

class Link:
    """A network namespace joined to this one by a veth pair: 10.213.0.1/24 on this side,
    10.213.0.2/24 inside. Servers run inside (`inside(cmd)`) listening on the inner address;
    clients here reach them only through the pair, which `shape` limits with tbf on both ends
    (each end shapes what it sends). The namespace is named after bench/run's BENCH_NETNS
    (bench/run's exit trap deletes it even if this script is killed with SIGKILL), else after
    this process; the veth ends are that name + "a" / "b" (at most 15 characters, IFNAMSIZ)."""

    OUTER_IP, INNER_IP = "10.213.0.1", "10.213.0.2"

    def __init__(self):
        self.ns = os.environ.get("BENCH_NETNS") or f"usbench{os.getpid()}"
        self.outer, self.inner = self.ns + "a", self.ns + "b"
        self.inner_ip = self.INNER_IP
        self.shaped = None
        self._remove()  # a leftover of an earlier run killed with this name
        NETS.append(self)
        run(["ip", "netns", "add", self.ns])
        run(["ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner, "netns", self.ns])
        run(["ip", "addr", "add", f"{self.OUTER_IP}/24", "dev", self.outer])
        run(["ip", "link", "set", self.outer, "up"])
        run(["ip", "-n", self.ns, "addr", "add", f"{self.INNER_IP}/24", "dev", self.inner])
        run(["ip", "-n", self.ns, "link", "set", self.inner, "up"])
        run(["ip", "-n", self.ns, "link", "set", "lo", "up"])

    def inside(self, cmd):
        # `ip netns exec` execs the command, so the Popen pid (after setpriv) is the server's.
        return ["ip", "netns", "exec", self.ns, *cmd]

    def shape(self, rate="100mbit"):
        """tbf on both veth ends (burst 32 kbit, queue bounded to 50 ms of latency)."""
        tbf = ["root", "tbf", "rate", rate, "burst", "32kbit", "latency", "50ms"]
        run(["tc", "qdisc", "replace", "dev", self.outer, *tbf])
        run(self.inside(["tc", "qdisc", "replace", "dev", self.inner, *tbf]))
        self.shaped = rate

    def qdiscs(self):
        a = run(["tc", "qdisc", "show", "dev", self.outer]).stdout.strip()
        b = run(self.inside(["tc", "qdisc", "show", "dev", self.inner])).stdout.strip()
        return f"{self.outer}: {a}; {self.inner}: {b}"

    def throughput(self, nbytes=20 * 1000 * 1000):
        """Seconds to push `nbytes` through a TCP connection from here to a receiver inside,
        until the receiver acknowledges the last byte: proof that the link is what it says."""
        port = free_port()
        script = (
            "import socket, sys\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)\n"
            "c, _ = s.accept(); n = 0\n"
            "while True:\n"
            "    b = c.recv(1 << 20)\n"
            "    if not b: break\n"
            "    n += len(b)\n"
            "c.sendall(str(n).encode()); c.close()\n")
        errlog = open(os.path.join(WORK, "link-check.log"), "ab")
        p = spawn(self.inside(["/usr/bin/python3", "-c", script, self.inner_ip, str(port)]), "link check",
                  subprocess.DEVNULL, errlog, grace=2)
        errlog.close()
        try:
            deadline = time.time() + 20
            while True:
                try:
                    c = socket.create_connection((self.inner_ip, port), timeout=30)
                    break
                except OSError:
                    if time.time() > deadline or p.poll() is not None:
                        raise RuntimeError("the link check receiver did not start")
                    time.sleep(0.05)
            buf = b"\0" * MiB
            t = time.monotonic()
            left = nbytes
            while left > 0:
                c.sendall(buf[:min(left, len(buf))])
                left -= min(left, len(buf))
            c.shutdown(socket.SHUT_WR)
            got = int(c.recv(64) or b"0")
            took = time.monotonic() - t
            c.close()
        finally:
            stop(p)
        if got != nbytes:
            raise RuntimeError(f"the link check receiver got {got} of {nbytes} bytes")
        return took

    def _remove(self):
        # Deleting the namespace also destroys the veth end inside it and so its peer; the
        # explicit `ip link del` covers a pair whose inner end never reached the namespace.
        subprocess.run(["ip", "link", "del", self.outer], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "del", self.ns], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self):
        if self in NETS:
            NETS.remove(self)
        self._remove()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


# ---------------------------------------------------------------- understudy daemons

class Host:
    """One daemon. With `net` (a Link) it runs inside the link's network namespace and listens
    on the far address, so the CLI (through the data directory's Unix socket) still reaches it
    from outside and a primary outside reaches it only through the shaped veth pair."""

    def __init__(self, root, name, net=None):
        self.name = name
        self.net = net
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.addr = f"{net.inner_ip if net else '127.0.0.1'}:{self.port}"
        self.start()

    def start(self):
        """Starts (or, after kill9, restarts) the daemon on the same data directory and port."""
        out_path = os.path.join(self.dir, "stdout")
        out = open(out_path, "wb")
        err = open(os.path.join(self.dir, "daemon.log"), "ab")
        cmd = [ARGS.bin, "serve", "--data-dir", self.dir, "--listen", self.addr, "--name", self.name]
        if self.net:
            cmd = self.net.inside(cmd)
        self.proc = spawn(cmd, f"understudy {self.name}", out, err, grace=30)
        out.close()
        err.close()
        deadline = time.time() + 60
        while True:
            with open(out_path) as f:
                if any(line.startswith("ready") for line in f):
                    break
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"daemon {self.name} did not start: {self.log_tail()}")
            time.sleep(0.02)

    def kill9(self):
        for i, (q, _name, _grace) in enumerate(PROCS):
            if q is self.proc:
                del PROCS[i]
                break
        self.proc.kill()
        self.proc.wait()

    def log_tail(self, n=15):
        try:
            with open(os.path.join(self.dir, "daemon.log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def cli(self, *args, timeout=900):
        r = subprocess.run(wrap([ARGS.bin, "--data-dir", self.dir, *args]), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"understudy {' '.join(args)} on {self.name} failed ({r.returncode}): "
                               f"{r.stderr.strip()}\n--- daemon log ---\n{self.log_tail()}")
        return r.stdout

    def json(self, *args):
        return json.loads(self.cli(*args, "--json"))

    def nbd_uri(self, vm, disk=0):
        return self.json("vm", "show", vm)["disks"][disk]["nbd_uri"]

    def close(self):
        stop(self.proc)


class Pair:
    """A primary and a replica daemon on loopback with mutual TLS trust."""

    def __init__(self, tag, net=None):
        self.root = os.path.join(WORK, f"pair-{tag}")
        self.a = Host(self.root, "primary")
        self.b = Host(self.root, "replica", net)
        for frm, to in ((self.a, self.b), (self.b, self.a)):
            pem = os.path.join(to.dir, f"{frm.name}.pem")
            with open(pem, "w") as f:
                f.write(frm.cli("identity"))
            to.cli("trust", "add", pem)
        self.b.cli("replica-server", "enable", "--storage", os.path.join(self.b.dir, "storage"))

    def replicating_vm(self, vm, size, freq):
        """A new VM with one sparse disk, replicating every `freq` s, initial replication done."""
        self.a.cli("vm", "create", vm, "--disk", size)
        self.a.cli("replication", "enable", vm, "--replica", self.b.addr, "--frequency", str(freq),
                   "--compression", ARGS.compression)
        self.a.cli("replication", "start", vm, "--wait")
        return self.a.nbd_uri(vm)

    def quiesce(self, vm):
        # Suspend waits for a cycle in flight, so nothing ships during the next measurement.
        self.a.cli("replication", "suspend", vm)

    def close(self):
        t = time.monotonic()
        self.a.close()
        self.b.close()
        if time.monotonic() - t > 1:
            log(f"  (stopping the pair took {time.monotonic() - t:.1f} s)")
        if not ARGS.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def size_arg(n):
    return f"{n // MiB}M"


# ---------------------------------------------------------------- clients

def fio(uri, rw, bs, qd, runtime, extra=()):
    out = os.path.join(WORK, "fio.json")
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", "--numjobs=1", "--time_based", f"--runtime={runtime}",
           "--output-format=json", f"--output={out}", *extra]
    run(cmd, timeout=runtime + 120)
    with open(out) as f:
        job = json.load(f)["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio error {job['error']} on {uri}")
    return job


def timed(fn):
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def settle():
    """Write back dirty pages of the previous step so they do not land in the next one."""
    t = time.monotonic()
    os.sync()
    time.sleep(0.2)
    if time.monotonic() - t > 1:
        log(f"  (sync took {time.monotonic() - t:.1f} s)")


# ---------------------------------------------------------------- results

ROWS = []


def row(tid, what, ours, ref, ratio, target, ok):
    ROWS.append({"id": tid, "what": what, "ours": ours, "ref": ref, "ratio": ratio, "target": target,
                 "pass": ok})
    log(f"{tid}: {what}: {ours} vs {ref} -> {ratio} ({'pass' if ok else 'FAIL' if ok is False else '-'})")


def fmt_ratio(x):
    return f"{x:.2f}×"


def med(xs):
    return statistics.median(xs)


def spread(xs, fmt):
    return "[" + ", ".join(fmt(x) for x in xs) + "]"


# ---------------------------------------------------------------- T1-T4: fio data path

def fio_compare(tid, label, rw, bs, qd, freq, metric, sides, prefill=False, extra=()):
    """Runs fio against each side, runs interleaved, and returns {side: [values]}."""
    size = ARGS.fio_size
    runtime = ARGS.runtime
    vals = {s: [] for s in sides}
    jobs = {s: [] for s in sides}
    cpu = {s: [] for s in sides}  # server CPU seconds per run (2 cores = 2 s per second)
    prev_cycles = {}
    with Pair(tid) as pair:
        base = None
        if prefill:
            # Reads need data: every side serves a copy of the same fully written image.
            base = data_image(os.path.join(WORK, f"{tid}-data.img"), size, data_fraction_half=False)
            pair.a.cli("vm", "import", "rd", "--image", base)
            pair.a.cli("replication", "enable", "rd", "--replica", pair.b.addr, "--frequency", str(freq))
            pair.a.cli("replication", "start", "rd", "--wait")
            read_uri = pair.a.nbd_uri("rd")
        for r in range(ARGS.runs):
            for side in sides:
                settle()
                if side == "understudy":
                    if prefill:
                        if r > 0:  # suspended by the quiesce of the previous run
                            pair.a.cli("replication", "resume", "rd")
                        uri, vm = read_uri, "rd"
                    else:
                        vm = f"{tid.lower()}-{r}"
                        t = time.monotonic()
                        uri = pair.replicating_vm(vm, size_arg(size), freq)
                        if time.monotonic() - t > 1:
                            log(f"  (creating {vm} and its initial replication took {time.monotonic() - t:.1f} s)")
                    c0 = (cpu_s(pair.a.proc.pid), cpu_s(pair.b.proc.pid))
                    job = fio(uri, rw, bs, qd, runtime, extra)
                    c1 = (cpu_s(pair.a.proc.pid), cpu_s(pair.b.proc.pid))
                    cpu[side].append(f"primary {c1[0] - c0[0]:.1f} s + replica {c1[1] - c0[1]:.1f} s")
                    m = pair.a.json("replication", "measure", vm)
                    # successful_cycles is cumulative and counts the initial replication too.
                    done_before = prev_cycles.get(vm, 1)
                    prev_cycles[vm] = m.get("successful_cycles", 1)
                    jobs[side].append({"cycles_completed_during_run": prev_cycles[vm] - done_before,
                                       "max_cut_pause_us": m.get("maximum_cut_pause_us"),
                                       "max_cycle_ms": m.get("maximum_latency_ms")})
                    t = time.monotonic()
                    pair.quiesce(vm)
                    if time.monotonic() - t > 1:
                        log(f"  (suspending {vm} took {time.monotonic() - t:.1f} s)")
                elif side == "tracked-only":
                    # Diagnostic: the same tracked export with replication not enabled, to
                    # separate the cost of the data path + tracker from the cost of shipping.
                    vm = f"{tid.lower()}-t{r}"
                    pair.a.cli("vm", "create", vm, "--disk", size_arg(size))
                    c0 = cpu_s(pair.a.proc.pid)
                    job = fio(pair.a.nbd_uri(vm), rw, bs, qd, runtime, extra)
                    cpu[side].append(f"primary {cpu_s(pair.a.proc.pid) - c0:.1f} s")
                else:
                    img = os.path.join(WORK, f"{tid}-{side}.img")
                    if prefill:
                        shutil.copyfile(base, img)
                    else:
                        sparse_image(img, size)
                    with RefServer(side, img, tid) as srv:
                        c0 = cpu_s(srv.proc.pid)
                        job = fio(srv.uri, rw, bs, qd, runtime, extra)
                        cpu[side].append(f"{cpu_s(srv.proc.pid) - c0:.1f} s")
                    os.unlink(img)
                v = metric(job)
                vals[side].append(v)
                cpu[side][-1] += f" (fio {job['usr_cpu'] + job['sys_cpu']:.0f} % of a core)"
                log(f"{tid} run {r + 1}/{ARGS.runs} {side}: {v:.1f}")
        for s in sides:
            if jobs[s]:
                detail(f"{tid} understudy replication during the runs: {jobs[s]}")
    for s in sides:
        if s == "tracked-only":
            ref = "nbdkit" if "nbdkit" in sides else sides[0]
            detail(f"{tid} diagnostic: tracked export NOT replicating: median {med(vals[s]):.0f}, "
                   f"{med(vals[s]) / med(vals[ref]):.2f}× {ref} (replicating: "
                   f"{med(vals['understudy']) / med(vals[ref]):.2f}×)")
        detail(f"{tid} {label} {s}: runs {spread(vals[s], lambda x: f'{x:.0f}')}, median {med(vals[s]):.0f}; "
               f"server CPU in {runtime} s runs: {'; '.join(cpu[s])}")
    return vals


def iops_w(job):
    return job["write"]["iops"]


def iops_r(job):
    return job["read"]["iops"]


def bw_w_mib(job):
    return job["write"]["bw_bytes"] / MiB


def p99_w_us(job):
    return job["write"]["clat_ns"]["percentile"]["99.000000"] / 1000


DIAG = []  # ["tracked-only"] unless --no-diagnostics or --quick


def t1():
    v = fio_compare("T1", "4k randwrite QD32 IOPS", "randwrite", "4k", 32, ARGS.freq, iops_w,
                    ["nbdkit", "qemu-nbd", "understudy"] + DIAG)
    us, kit, qn = med(v["understudy"]), med(v["nbdkit"]), med(v["qemu-nbd"])
    row("T1", "4 KiB randwrite QD32, replicating (vs nbdkit file)", f"{us:,.0f} IOPS", f"{kit:,.0f} IOPS",
        fmt_ratio(us / kit), "≥ 0.85×", us / kit >= 0.85)
    row("T1", "4 KiB randwrite QD32, replicating (vs qemu-nbd)", f"{us:,.0f} IOPS", f"{qn:,.0f} IOPS",
        fmt_ratio(us / qn), "≥ 2.5×", us / qn >= 2.5)


def t2():
    v = fio_compare("T2", "4k randread QD32 IOPS", "randread", "4k", 32, ARGS.freq, iops_r,
                    ["nbdkit", "understudy"], prefill=True)
    us, kit = med(v["understudy"]), med(v["nbdkit"])
    row("T2", "4 KiB randread QD32, replicating", f"{us:,.0f} IOPS", f"{kit:,.0f} IOPS", fmt_ratio(us / kit),
        "≥ 1.0×", us / kit >= 1.0)


def t3():
    v = fio_compare("T3", "1M seq write QD8 MiB/s", "write", "1m", 8, ARGS.freq, bw_w_mib,
                    ["nbdkit", "understudy"] + DIAG)
    us, kit = med(v["understudy"]), med(v["nbdkit"])
    row("T3", "1 MiB seq write QD8, replicating", f"{us:,.0f} MiB/s", f"{kit:,.0f} MiB/s", fmt_ratio(us / kit),
        "≥ 0.9×", us / kit >= 0.9)


def t4():
    v = fio_compare("T4", "4k randwrite QD1 p99 µs", "randwrite", "4k", 1, 2, p99_w_us,
                    ["nbdkit", "understudy"] + DIAG)
    us, kit = med(v["understudy"]), med(v["nbdkit"])
    row("T4", "4 KiB randwrite QD1 p99 latency, cuts every 2 s", f"{us:,.0f} µs", f"{kit:,.0f} µs",
        fmt_ratio(us / kit), "≤ 1.5×", us / kit <= 1.5)


# ---------------------------------------------------------------- T5/T6: import and initial replication

def t5_t6():
    size, src_name = ARGS.image_size, os.path.join(WORK, "source.img")
    src = data_image(src_name, size)  # half data, half holes
    data = size // 2
    imp = {"nbdkit": [], "understudy": []}
    rep = {"nbdkit --flush": [], "understudy initial replication": []}
    sent = []
    for r in range(ARGS.runs):
        # Reference: nbdcopy into nbdkit file (plain, then with --flush: durable like a commit).
        for flush in (False, True):
            settle()
            img = sparse_image(os.path.join(WORK, "t5-nbdkit.img"), size)
            with RefServer("nbdkit", img, "t5") as srv:
                cmd = ["nbdcopy", *(["--flush"] if flush else []), src, srv.uri]
                t = timed(lambda: run(cmd))
            os.unlink(img)
            (rep["nbdkit --flush"] if flush else imp["nbdkit"]).append(t)
            log(f"T5/T6 run {r + 1} nbdcopy{' --flush' if flush else ''} into nbdkit: {t:.2f} s")
        with Pair(f"t6-{r}") as pair:
            pair.a.cli("vm", "create", "imp", "--disk", size_arg(size))
            uri = pair.a.nbd_uri("imp")
            settle()
            t = timed(lambda: run(["nbdcopy", src, uri]))
            imp["understudy"].append(t)
            log(f"T5 run {r + 1} nbdcopy into understudy: {t:.2f} s")
            pair.a.cli("replication", "enable", "imp", "--replica", pair.b.addr, "--frequency", "300")
            settle()
            t = timed(lambda: pair.a.cli("replication", "start", "imp", "--wait"))
            rep["understudy initial replication"].append(t)
            m = pair.a.json("replication", "measure", "imp")
            sent.append(m.get("sent_bytes_total"))
            log(f"T6 run {r + 1} initial replication: {t:.2f} s, measure {m}")
    os.unlink(src)
    for k, xs in list(imp.items()) + list(rep.items()):
        detail(f"T5/T6 {'nbdcopy into ' if 'initial' not in k else ''}{k}: runs {spread(xs, lambda x: f'{x:.2f} s')}")
    detail(f"T6 bytes sent on the wire per initial replication: {sent} ({data // MiB} MiB of data)")
    us, kit = med(imp["understudy"]), med(imp["nbdkit"])
    what = f"nbdcopy import of a {size // GiB if size >= GiB else size // MiB}{'GiB' if size >= GiB else 'MiB'} image ({data // MiB} MiB data)"
    row("T5", what, f"{us:.2f} s", f"{kit:.2f} s", fmt_ratio(us / kit), "≤ 1.1×", us / kit <= 1.1)
    us, kit = med(rep["understudy initial replication"]), med(rep["nbdkit --flush"])
    row("T6", f"initial replication over loopback mutual TLS, same image (ref: nbdcopy --flush into nbdkit)",
        f"{us:.2f} s", f"{kit:.2f} s", fmt_ratio(us / kit), "≤ 1.5×", us / kit <= 1.5)


# ---------------------------------------------------------------- T9: reading a served point

def t9():
    """A point built from a base and 10 deltas, served by the replica (`points serve`), read
    whole with `nbdcopy URI null:`, against nbdkit file serving the same point flattened
    (`points export`). Both sides are read once first, so both read from the page cache: the
    figure is the cost of resolving a point through its layers, not of the device."""
    size = ARGS.image_size
    deltas = 10
    src = data_image(os.path.join(WORK, "t9-base.img"), size)  # the base: half data, half holes
    runs = max(5, ARGS.runs)  # each read takes about a second: a few more runs for the median
    ours, ref = [], []
    with Pair("t9") as pair:
        pair.a.cli("vm", "create", "layers", "--disk", size_arg(size))
        uri = pair.a.nbd_uri("layers")
        run(["nbdcopy", src, uri])
        os.unlink(src)
        pair.a.cli("replication", "enable", "layers", "--replica", pair.b.addr, "--frequency", "3600",
                   "--compression", ARGS.compression)
        pair.a.cli("replication", "start", "layers", "--wait")
        # Each delta: random writes of 4-64 KiB over the whole disk, 2 % of it.
        for i in range(deltas):
            out = os.path.join(WORK, "fio-t9.json")
            run(["fio", "--name=t9", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bsrange=4k-64k",
                 "--iodepth=8", f"--io_size={size // 50}", f"--randseed={i + 1}", "--refill_buffers",
                 "--output-format=json", f"--output={out}"])
            pair.a.cli("replication", "sync", "layers")
        points = pair.b.json("points", "list", "layers")
        served = pair.b.json("points", "serve", "layers", "--point", "latest")
        served_uri = served["disks"][0]["nbd_uri"]
        flat = os.path.join(WORK, "t9-flat.img")
        pair.b.cli("points", "export", "layers", "--point", str(served["point"]["id"]), "--to", flat)
        with RefServer("nbdkit", flat, "t9") as srv:
            for u in (served_uri, srv.uri):  # warm-up: both from the page cache
                run(["nbdcopy", u, "null:"])
            for r in range(runs):
                t_us = timed(lambda: run(["nbdcopy", served_uri, "null:"]))
                t_kit = timed(lambda: run(["nbdcopy", srv.uri, "null:"]))
                ours.append(t_us)
                ref.append(t_kit)
                log(f"T9 run {r + 1}: served point {t_us:.2f} s, nbdkit flattened {t_kit:.2f} s")
        os.unlink(flat)
    stored = sum(p["stored_bytes"] for p in points[1:])
    detail(f"T9 {len(points)} points ({deltas} deltas on the base, {stored / MiB:.0f} MiB stored in their journal files), "
           f"served point {spread(ours, lambda x: f'{x:.2f} s')}, nbdkit flattened {spread(ref, lambda x: f'{x:.2f} s')}")
    us, kit = med(ours), med(ref)
    gib = f"{size // GiB} GiB" if size >= GiB else f"{size // MiB} MiB"
    row("T9", f"nbdcopy to null: of a served {gib} point, base + {deltas} deltas (vs nbdkit file, flattened)",
        f"{us:.2f} s", f"{kit:.2f} s", fmt_ratio(us / kit), "≤ 1.3×", us / kit <= 1.3)


# ---------------------------------------------------------------- T10: lag under load

def t10():
    freq = 5
    duration = ARGS.lag_seconds
    with Pair("t10") as pair:
        uri = pair.replicating_vm("lag", "4096M", freq)
        out = os.path.join(WORK, "fio-lag.json")
        cmd = ["fio", "--name=lag", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=4",
               "--rate=50m", "--refill_buffers", "--time_based", f"--runtime={duration}",
               "--output-format=json", f"--output={out}"]
        errlog = open(os.path.join(WORK, "fio-lag.err"), "wb")
        p = spawn(cmd, "fio lag", subprocess.DEVNULL, errlog, grace=5)
        errlog.close()
        samples = []
        # Anonymous memory of each daemon under load (VmRSS would also count the page cache
        # the daemons map): a diagnostic for buffers held in flight, not a target.
        anon = {"primary": 0, "replica": 0}
        start = time.time()
        while p.poll() is None:
            for side, d in (("primary", pair.a), ("replica", pair.b)):
                anon[side] = max(anon[side], rss_kib(d.proc.pid, "RssAnon"))
            st = pair.a.json("replication", "status", "lag")
            now = time.time_ns()
            last = st.get("last_replication_unix_ns")
            if last:
                samples.append((now - last) / 1e9)
            time.sleep(0.5)
            if time.time() - start > duration + 60:
                raise RuntimeError("fio did not finish")
        stop(p)
        if p.returncode != 0:
            raise RuntimeError(f"fio lag load failed ({p.returncode})")
        with open(out) as f:
            job = json.load(f)["jobs"][0]
        m = pair.a.json("replication", "measure", "lag")
        pair.quiesce("lag")
    bw = job["write"]["bw_bytes"] / MiB
    worst = max(samples) if samples else float("inf")
    detail(f"T10 load {bw:.1f} MiB/s for {duration} s; {len(samples)} lag samples, max {worst:.2f} s, "
           f"median {med(samples):.2f} s; measure: cycles {m.get('successful_cycles')}, failed "
           f"{m.get('failed_cycles')}, avg delta {m.get('average_delta_bytes', 0) / MiB:.1f} MiB, "
           f"sent {m.get('sent_bytes_total', 0) / MiB:.0f} MiB, avg cycle {m.get('average_latency_ms')} ms, "
           f"max cycle {m.get('maximum_latency_ms')} ms, max cut pause {m.get('maximum_cut_pause_us')} µs; "
           f"peak anonymous memory: primary {anon['primary'] / 1024:.0f} MiB, replica {anon['replica'] / 1024:.0f} MiB")
    cycles = worst / freq
    row("T10", f"replication lag, {bw:.0f} MiB/s 4 KiB random writes, frequency {freq} s",
        f"max {cycles:.2f} cycles ({worst:.1f} s)", "—", "—", "≤ 2 cycles", cycles <= 2.0 and bw >= 45)


# ---------------------------------------------------------------- T11: memory

def t11():
    size = 4 * GiB
    img = sparse_image(os.path.join(WORK, "t11.img"), size)
    with RefServer("qemu-nbd", img, "t11") as q:
        run(["nbdinfo", q.uri])
        time.sleep(1)
        qrss = rss_kib(q.proc.pid)
    with RefServer("nbdkit", img, "t11") as k:
        run(["nbdinfo", k.uri])
        time.sleep(1)
        krss = rss_kib(k.proc.pid)
    os.unlink(img)
    with Pair("t11") as pair:
        pair.a.cli("vm", "create", "idle", "--disk", "4G")
        run(["nbdinfo", pair.a.nbd_uri("idle")])
        time.sleep(1)
        alone = rss_kib(pair.a.proc.pid)
        pair.a.cli("replication", "enable", "idle", "--replica", pair.b.addr, "--frequency", "5")
        pair.a.cli("replication", "start", "idle", "--wait")
        time.sleep(6)  # at least one idle cycle
        repl = rss_kib(pair.a.proc.pid)
        replica = rss_kib(pair.b.proc.pid)
    bitmap_allow = 32 * MiB * size / TiB / KiB  # KiB
    limit = 2 * qrss + bitmap_allow
    detail(f"T11 VmRSS: qemu-nbd {qrss} KiB, nbdkit {krss} KiB, understudy primary with the idle export "
           f"{alone} KiB, same replicating (idle cycles every 5 s) {repl} KiB, replica daemon {replica} KiB; "
           f"limit 2 × qemu-nbd + {bitmap_allow:.0f} KiB = {limit:.0f} KiB")
    row("T11", "daemon RSS, one idle 4 GiB export, replicating", f"{repl / 1024:.1f} MiB", f"{qrss / 1024:.1f} MiB",
        fmt_ratio(repl / qrss), "≤ 2× (+32 MiB/TiB)", repl <= limit)


# ---------------------------------------------------------------- T12: failover

def t12():
    """Failover on the replica host (issue 10): the time from `failover start` to writable disks
    for a 64 GiB disk (it must not depend on the size: copy-on-write over the point), and the
    write IOPS of a guest on the failover disk against the same fio run on the primary's export
    (both 4 KiB random writes, QD 8)."""
    size = 64 * GiB
    runtime = ARGS.runtime
    with Pair("t12") as pair:
        pair.a.cli("vm", "create", "big", "--disk", size_arg(size))
        uri = pair.a.nbd_uri("big")
        run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--rw=write", "--bs=1m",
             "--io_size=256m", "--refill_buffers", "--output-format=json",
             f"--output={os.path.join(WORK, 'fio-t12-fill.json')}"])
        pair.a.cli("replication", "enable", "big", "--replica", pair.b.addr, "--frequency", "3600",
                   "--compression", ARGS.compression)
        pair.a.cli("replication", "start", "big", "--wait")
        starts = []
        for _ in range(max(3, ARGS.runs)):
            t = timed(lambda: pair.b.json("failover", "start", "big", "--test"))
            starts.append(t)
            pair.b.cli("failover", "stop", "big", "--test")
        info = pair.b.json("failover", "start", "big", "--test")
        fo_uri = info["disks"][0]["nbd_uri"]
        extra = ("--size=1g", "--randrepeat=0")
        ours, ref = [], []
        for _ in range(ARGS.runs):
            ref.append(iops_w(fio(uri, "randwrite", "4k", 8, runtime, extra)))
            settle()
            ours.append(iops_w(fio(fo_uri, "randwrite", "4k", 8, runtime, extra)))
            settle()
        pair.b.cli("failover", "stop", "big", "--test")
    t = med(starts)
    detail(f"T12 failover start of a 64 GiB disk: {spread(starts, lambda x: f'{x:.2f} s')}; "
           f"4 KiB random write IOPS on the failover disk {spread(ours, lambda x: f'{x:.0f}')}, "
           f"on the primary's export {spread(ref, lambda x: f'{x:.0f}')}")
    row("T12a", "failover start to writable disks, 64 GiB disk (CLI round trip included)",
        f"{t:.2f} s", "—", "—", "< 2 s", t < 2.0)
    us, them = med(ours), med(ref)
    row("T12b", "4 KiB random write IOPS on a failover disk (vs the primary's export)",
        f"{us:.0f}", f"{them:.0f}", fmt_ratio(us / them), "≥ 0.8×", us / them >= 0.8)


# ---------------------------------------------------------------- T7/T8: resynchronization

class RsyncDaemon:
    """An rsync daemon on loopback serving one writable module (the reference of T7/T8)."""

    def __init__(self, path, net=None):
        """With `net` (a Link) the daemon runs inside its namespace on the inner address."""
        self.port = free_port()
        self.host = net.inner_ip if net else "127.0.0.1"
        conf = os.path.join(WORK, "rsyncd.conf")
        with open(conf, "w") as f:
            f.write(f"pid file = {WORK}/rsyncd.pid\nuse chroot = no\nuid = 0\ngid = 0\n"
                    f"[m]\npath = {path}\nread only = no\n")
        errlog = open(os.path.join(WORK, "rsyncd.log"), "ab")
        cmd = ["rsync", "--daemon", "--no-detach", "--address", self.host, "--port", str(self.port),
               "--config", conf]
        self.proc = spawn(net.inside(cmd) if net else cmd, "rsync daemon", subprocess.DEVNULL, errlog, grace=5)
        errlog.close()
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the rsync daemon did not start")
                time.sleep(0.05)

    def sync(self, src, name):
        """rsync --inplace --no-whole-file of `src` onto the module's `name`: (seconds,
        literal data bytes, bytes sent)."""
        cold()
        t = time.monotonic()
        # --ignore-times: compare the data even when size and time match (else rsync skips).
        out = run(["rsync", "--inplace", "--no-whole-file", "--ignore-times", "--stats", src,
                   f"rsync://{self.host}:{self.port}/m/{name}"]).stdout
        took = time.monotonic() - t
        def stat(label):
            for line in out.splitlines():
                if line.startswith(label):
                    return int(line.split(":")[1].split()[0].replace(",", ""))
            raise RuntimeError(f"rsync printed no {label!r}: {out}")
        return took, stat("Literal data"), stat("Total bytes sent")

    def close(self):
        stop(self.proc)


def cold():
    """Empties the page cache (root only), so that every side of a comparison reads its disks
    as a resync on a real host does: the replica's images are written with O_DIRECT and never
    in the cache, while a file just copied for the reference would be."""
    run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def resync_time(pair, vm):
    """Starts a resynchronization of `vm` and waits until its point committed: (seconds,
    measure before, measure after)."""
    before = pair.a.json("replication", "measure", vm)
    seq = pair.a.json("replication", "status", vm)["last_seq"]
    cold()
    t = time.monotonic()
    pair.a.cli("replication", "resume", vm, "--resynchronize")
    while True:
        st = pair.a.json("replication", "status", vm)
        if st["state"] == "Replicating" and st["last_seq"] > seq:
            break
        if time.monotonic() - t > 900:
            raise RuntimeError(f"the resync of {vm} did not finish: {st}")
        time.sleep(0.05)
    took = time.monotonic() - t
    return took, before, pair.a.json("replication", "measure", vm)


def scatter_writes(uri, image, size, fraction, seed):
    """Writes `fraction` of the 4 KiB blocks of a disk, scattered, with random data: through
    NBD (`uri`, tracked by the daemon) and into `image` (rsync's source), the same bytes."""
    script = (
        "import nbd, os, random, sys\n"
        "uri, image, size, fraction, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])\n"
        "rng = random.Random(seed)\n"
        "blocks = rng.sample(range(size // 4096), int(size // 4096 * fraction))\n"
        "h = nbd.NBD(); h.connect_uri(uri)\n"
        "fd = os.open(image, os.O_WRONLY)\n"
        "for b in blocks:\n"
        "    data = rng.randbytes(4096)\n"
        "    h.pwrite(data, b * 4096); os.pwrite(fd, data, b * 4096)\n"
        "h.flush(); h.shutdown(); os.fsync(fd); os.close(fd)\n"
        "print(len(blocks))\n")
    return int(run(["/usr/bin/python3", "-c", script, uri, image, str(size), str(fraction), str(seed)]).stdout)


def t7_t8():
    """Resynchronization (issue 11): T7, two identical images, and T8, 1 % scattered 4 KiB
    changes, each against `b3sum` of both images and `rsync --inplace --no-whole-file` through
    an rsync daemon on loopback, measured back to back (page cache warm for all)."""
    size = 512 * MiB if ARGS.quick else 2 * GiB
    src = data_image(os.path.join(WORK, "t7-src.img"), size, data_fraction_half=False)
    dst_dir = os.path.join(WORK, "t7-rsync")
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, "copy.img")
    run(["cp", "--sparse=always", src, dst])
    what = f"{size // GiB} GiB" if size >= GiB else f"{size // MiB} MiB"
    rs = RsyncDaemon(dst_dir)
    try:
        with Pair("t7") as pair:
            pair.a.cli("vm", "import", "rs", "--image", src)
            pair.a.cli("replication", "enable", "rs", "--replica", pair.b.addr, "--frequency", "3600",
                       "--compression", ARGS.compression)
            pair.a.cli("replication", "start", "rs", "--wait")
            uri = pair.a.nbd_uri("rs")
            # T7: identical.
            ours_t7, m0, m1 = resync_time(pair, "rs")
            wire_t7 = (m1["sent_bytes_total"] - m0["sent_bytes_total"]
                       + m1["resync_hash_bytes_total"] - m0["resync_hash_bytes_total"])
            caches = "cold page cache" if cold() else "warm page cache (not root)"
            t = time.monotonic()
            run(["b3sum", src, dst])
            b3 = time.monotonic() - t
            rsync_t7, lit_t7, _ = rs.sync(src, "copy.img")
            # T8: 1 % of the blocks changed, the same bytes on our primary and rsync's source.
            n = scatter_writes(uri, src, size, 0.01, 8)
            ours_t8, m0, m1 = resync_time(pair, "rs")
            payload = m1["sent_bytes_total"] - m0["sent_bytes_total"]
            hashes_t8 = m1["resync_hash_bytes_total"] - m0["resync_hash_bytes_total"]
            rsync_t8, lit_t8, rsync_sent_t8 = rs.sync(src, "copy.img")
    finally:
        rs.close()
        for f in (src, dst):
            if os.path.exists(f):
                os.unlink(f)
    detail(f"T7/T8 each side measured with a {caches}")
    detail(f"T7 resync of two identical {what} images: {ours_t7:.2f} s, {wire_t7} bytes on the wire "
           f"(delta + hash JSON); b3sum of both {b3:.2f} s; rsync {rsync_t7:.2f} s ({lit_t7} literal bytes)")
    detail(f"T8 resync after {n} scattered 4 KiB writes (1 %): {ours_t8:.2f} s, payload {payload} bytes "
           f"(+ {hashes_t8} bytes of hashes); rsync {rsync_t8:.2f} s, {lit_t8} literal bytes, {rsync_sent_t8} sent")
    ok_b3 = ours_t7 <= 1.5 * b3
    ok_rs = ours_t7 <= 0.5 * rsync_t7
    ok_wire = wire_t7 <= 0.0001 * size
    row("T7", f"resync of two identical {what} images (vs b3sum of both)", f"{ours_t7:.2f} s", f"{b3:.2f} s",
        fmt_ratio(ours_t7 / b3), "≤ 1.5× b3sum", ok_b3)
    row("T7r", "same, vs rsync --inplace --no-whole-file (daemon, loopback)", f"{ours_t7:.2f} s",
        f"{rsync_t7:.2f} s", fmt_ratio(ours_t7 / rsync_t7), "≤ 0.5× rsync", ok_rs)
    row("T7w", "same, bytes on the wire (share of the disk)", f"{wire_t7} B", f"{size} B",
        f"{100 * wire_t7 / size:.4f} %", "≤ 0.01 %", ok_wire)
    row("T8", "resync with 1 % scattered 4 KiB changes (vs rsync)", f"{ours_t8:.2f} s", f"{rsync_t8:.2f} s",
        fmt_ratio(ours_t8 / rsync_t8), "≤ 0.5× rsync", ours_t8 <= 0.5 * rsync_t8)
    row("T8p", "same, payload (vs rsync's literal data)", f"{payload} B", f"{lit_t8} B",
        fmt_ratio(payload / max(lit_t8, 1)), "≤ 0.25× rsync literal", payload <= 0.25 * lit_t8)


def events_log(host):
    """The host's events (`<data-dir>/events.log`, JSON lines)."""
    out = []
    with open(os.path.join(host.dir, "events.log"), errors="replace") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def last_event(host, eid, vm=None):
    """The message of the host's newest event `eid` (of `vm` if given), or None."""
    found = [e for e in events_log(host) if e.get("id") == eid and (vm is None or e.get("vm") == vm)]
    return found[-1].get("message") if found else None


def t8n():
    """T8 over a link limited to 100 Mbit/s (issue 11's target "T12"): the replica daemon and
    the rsync daemon run in a network namespace behind a veth pair shaped by tbf on both ends;
    the primary and the rsync client reach them from outside. The initial replication runs
    before the link is shaped (it is not what is measured); then 1 % scattered 4 KiB changes,
    our resync against `rsync --inplace --no-whole-file --ignore-times` over the same link."""
    size = 512 * MiB if ARGS.quick else 2 * GiB
    what = f"{size // GiB} GiB" if size >= GiB else f"{size // MiB} MiB"
    src = data_image(os.path.join(WORK, "t8n-src.img"), size, data_fraction_half=False)
    dst_dir = os.path.join(WORK, "t8n-rsync")
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, "copy.img")
    run(["cp", "--sparse=always", src, dst])
    try:
        with Link() as net:
            rs = RsyncDaemon(dst_dir, net)
            try:
                with Pair("t8n", net) as pair:
                    pair.a.cli("vm", "import", "rs", "--image", src)
                    pair.a.cli("replication", "enable", "rs", "--replica", pair.b.addr, "--frequency", "3600",
                               "--compression", ARGS.compression)
                    pair.a.cli("replication", "start", "rs", "--wait")
                    uri = pair.a.nbd_uri("rs")
                    raw = net.throughput()
                    net.shape("100mbit")
                    shaped = net.throughput()
                    qdiscs = net.qdiscs()
                    n = scatter_writes(uri, src, size, 0.01, 12)
                    ours, m0, m1 = resync_time(pair, "rs")
                    payload = m1["sent_bytes_total"] - m0["sent_bytes_total"]
                    hashes = m1["resync_hash_bytes_total"] - m0["resync_hash_bytes_total"]
                    caches = "cold page cache" if cold() else "warm page cache (not root)"
                    compared = last_event(pair.a, 2017)  # the compare's own time, without the shipping
                    ref, lit, sent = rs.sync(src, "copy.img")
            finally:
                rs.close()
    finally:
        for f in (src, dst):
            if os.path.exists(f):
                os.unlink(f)
    mb = 20 * 1000 * 1000
    detail(f"T8n link check (20 MB through one TCP connection into the namespace): unshaped {raw:.2f} s "
           f"({8 * mb / raw / 1e6:.0f} Mbit/s), shaped {shaped:.2f} s ({8 * mb / shaped / 1e6:.1f} Mbit/s); {qdiscs}")
    detail(f"T8n resync of {what} after {n} scattered 4 KiB writes (1 %) over 100 Mbit/s, {caches}: "
           f"{ours:.2f} s, payload {payload} bytes (+ {hashes} bytes of hashes); rsync {ref:.2f} s, "
           f"{lit} literal bytes, {sent} sent; event 2017: {compared}")
    # A link that carried clearly more than 100 Mbit/s makes the row meaningless: FAIL it.
    limited = 8 * mb / shaped / 1e6 <= 110
    row("T8n", f"T8 over a 100 Mbit/s link (tbf, veth, netns): resync of {what}, 1 % changed (vs rsync)",
        f"{ours:.2f} s", f"{ref:.2f} s", fmt_ratio(ours / ref), "≤ 0.5× rsync",
        ours <= 0.5 * ref if limited else False)
    if not limited:
        detail(f"T8n FAIL: the shaped link carried {8 * mb / shaped / 1e6:.0f} Mbit/s, not ≤ 100: not the workload")


# ---------------------------------------------------------------- T13c: resync after a primary crash

def proc_io(pid):
    """/proc/PID/io as a dict (rchar, read_bytes, ...)."""
    out = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k.strip()] = int(v)
    return out


def t13c():
    """After a primary crash under write load only the activity log's hot extents are read
    (issue 11's target "T13"): a VM full of data, replicated; fio 4 KiB random writes on one
    region (1/8 of the disk, the guest's working set) through the primary's export; kill -9 of
    the primary daemon during the load; restart; `replication sync` until the point commits.
    Bytes read by each daemon from the restart until that commit (`read_bytes` of
    /proc/PID/io, with the page cache emptied before the restart) against the extents the
    restarted primary names in event 1002 (activity log). `read_bytes` counts what the block
    layer read for the process (read-ahead included, page-cache hits not), which is what a
    crash recovery costs the disks; `rchar` is printed too but counts every read(2) whether
    it hit the cache or not, including sockets and pipes, and misses reads done by mmap."""
    size = 512 * MiB if ARGS.quick else 2 * GiB
    what = f"{size // GiB} GiB" if size >= GiB else f"{size // MiB} MiB"
    region, region_off = size // 8, size // 4
    load_s = 3 if ARGS.quick else 5
    src = data_image(os.path.join(WORK, "t13c.img"), size, data_fraction_half=False)
    with Pair("t13c") as pair:
        pair.a.cli("vm", "import", "hot", "--image", src)
        os.unlink(src)
        pair.a.cli("replication", "enable", "hot", "--replica", pair.b.addr, "--frequency", "3600",
                   "--compression", ARGS.compression)
        pair.a.cli("replication", "start", "hot", "--wait")
        # One cut with nothing written: the extents of the import and the initial replication
        # leave the activity log (they leave lazily, at a cut), as on a host replicating for a while.
        pair.a.cli("replication", "sync", "hot")
        uri = pair.a.nbd_uri("hot")
        out = os.path.join(WORK, "fio-t13c.json")
        errlog = open(os.path.join(WORK, "fio-t13c.err"), "wb")
        load = spawn(["fio", "--name=t13c", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
                      "--iodepth=8", f"--offset={region_off}", f"--size={region}", "--refill_buffers",
                      "--time_based", f"--runtime={load_s + 60}", "--output-format=json", f"--output={out}"],
                     "fio t13c", subprocess.DEVNULL, errlog, grace=5)
        errlog.close()
        time.sleep(load_s)
        if load.poll() is not None:
            raise RuntimeError(f"fio stopped before the crash ({load.returncode}): "
                               f"{open(os.path.join(WORK, 'fio-t13c.err'), errors='replace').read()[-400:]}")
        last_seq = pair.a.json("replication", "status", "hot")["last_seq"]
        pair.a.kill9()
        try:
            load.wait(30)  # its connection broke: fio stops with an I/O error
        except subprocess.TimeoutExpired:
            pass
        stop(load)
        cold_ok = cold()
        # The daemon's executable back into the page cache: the pages exec maps would count in
        # the restarted daemon's read_bytes (some 15 MiB), and they are not the disk's data.
        with open(ARGS.bin, "rb") as f:
            while f.read(8 * MiB):
                pass
        b0 = proc_io(pair.b.proc.pid)
        t = time.monotonic()
        pair.a.start()
        st = pair.a.json("replication", "status", "hot")
        state_at_start = st["state"]
        if state_at_start == "ResynchronizationRequired":
            # Not the path under test (the activity log was not used); measured all the same.
            detail(f"T13c the restarted primary asks for a resynchronization: {st.get('resync_reason')}")
            pair.a.cli("replication", "resume", "hot", "--resynchronize")
        i = 0
        while True:
            st = pair.a.json("replication", "status", "hot")
            if st["state"] == "Replicating" and st["last_seq"] > last_seq:
                break
            if time.monotonic() - t > 300:
                raise RuntimeError(f"no point committed within 300 s of the restart: {st}")
            if state_at_start != "ResynchronizationRequired" and i % 20 == 0:
                # `replication sync` starts a cycle now; retried while the daemon is still settling.
                subprocess.run(wrap([ARGS.bin, "--data-dir", pair.a.dir, "replication", "sync", "hot"]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
            i += 1
            time.sleep(0.05)
        took = time.monotonic() - t
        a1, b1 = proc_io(pair.a.proc.pid), proc_io(pair.b.proc.pid)
        m = pair.a.json("replication", "measure", "hot")
        rec = last_event(pair.a, 1002, "hot")
    hot_n, hot_b = None, None
    mt = re.search(r"re-sending its (\d+) recently written extents \((\d+) bytes\)", rec or "")
    if mt:
        hot_n, hot_b = int(mt.group(1)), int(mt.group(2))
    a_read, a_rchar = a1["read_bytes"], a1["rchar"]
    b_read, b_rchar = b1["read_bytes"] - b0["read_bytes"], b1["rchar"] - b0["rchar"]
    detail(f"T13c {what} disk full of data, fio 4 KiB random writes QD 8 on {region // MiB} MiB at "
           f"{region_off // MiB} MiB for {load_s} s, kill -9 of the primary; state at restart {state_at_start}; "
           f"restart to committed point {took:.2f} s; page cache {'emptied' if cold_ok else 'NOT emptied (not root)'} "
           f"before the restart, then the daemon's executable read back into it")
    detail(f"T13c event 1002: {rec or 'none'}; "
           f"measure: sent_bytes_total {m.get('sent_bytes_total')}")
    detail(f"T13c bytes read from the restart to the commit: primary read_bytes {a_read} (rchar {a_rchar}), "
           f"replica read_bytes {b_read} (rchar {b_rchar})")
    mib = lambda x: f"{x / MiB:.1f} MiB"
    if hot_b is None:
        for side in ("primary", "replica"):
            row("T13c", f"crash recovery of a {what} disk under write load: bytes read by the {side}",
                mib(a_read if side == "primary" else b_read), "no event 1002", "—", "≤ 2× hot extents", False)
        return
    for side, got in (("primary", a_read), ("replica", b_read)):
        row("T13c", f"crash recovery of a {what} disk under write load: bytes read by the {side} "
            f"(vs the activity log's {hot_n} hot extents)", mib(got), mib(hot_b),
            fmt_ratio(got / max(hot_b, 1)), "≤ 2× hot extents", got <= 2 * hot_b)


# ---------------------------------------------------------------- main

TESTS = {"T1": t1, "T2": t2, "T3": t3, "T4": t4, "T5": t5_t6, "T6": t5_t6, "T7": t7_t8, "T8": t7_t8, "T8n": t8n,
         "T9": t9, "T10": t10, "T11": t11, "T12": t12, "T13c": t13c}
TARGETS_NOT_YET = []
ORDER = ["T1", "T2", "T3", "T4", "T5", "T6", "T7", "T7r", "T7w", "T8", "T8p", "T8n", "T9", "T10", "T11", "T12",
         "T12a", "T12b", "T13c"]


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", WORK], stdout=subprocess.PIPE, text=True).stdout.strip()
    dev = subprocess.run(["df", "--output=source", WORK], stdout=subprocess.PIPE, text=True).stdout.split()[-1]
    load = open("/proc/loadavg").read().split()[:3]
    return (f"{os.cpu_count()} CPUs ({cpu}), Linux {os.uname().release}, work dir {WORK} on {fs} ({dev}), "
            f"load average at start {' '.join(load)}")


def main():
    global ARGS, WORK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="the understudy binary")
    ap.add_argument("--quick", action="store_true", help="shorter runs and smaller images (< 3 min)")
    ap.add_argument("--runs", type=int, help="runs per side (median); default 3, quick 1")
    ap.add_argument("--runtime", type=int, help="seconds per fio run; default 15, quick 4")
    ap.add_argument("--only", help="comma-separated ids, e.g. T1,T4")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument("--workdir", help="parent directory of the work directory (default /var/tmp; "
                    "bench/run passes a temporary one under $BENCH_TMPDIR or /var/tmp)")
    ap.add_argument("--compression", default="zstd", choices=["zstd", "none"],
                    help="replication compression for T1-T4 and T10 (default zstd, the product default)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (debugging)")
    ap.add_argument("--diagnostics", action=argparse.BooleanOptionalAction, default=None,
                    help="also measure T1/T3/T4 on a tracked export that is not replicating (default: full mode)")
    ARGS = ap.parse_args()
    q = ARGS.quick
    ARGS.runs = ARGS.runs or (1 if q else 3)
    ARGS.runtime = ARGS.runtime or (5 if q else 15)
    # T1-T3 replicate every 5 s (2-3 cycles per 15 s run); quick runs are 5 s, so every 2 s.
    ARGS.freq = 2 if q else 5
    ARGS.fio_size = (512 * MiB) if q else (1 * GiB)
    ARGS.image_size = (1 if q else 4) * GiB
    ARGS.lag_seconds = 20 if q else 60
    ARGS.bin = os.path.abspath(ARGS.bin)
    if ARGS.diagnostics if ARGS.diagnostics is not None else not q:
        DIAG.append("tracked-only")

    parent = ARGS.workdir or "/var/tmp"
    WORK = tempfile.mkdtemp(prefix="understudy-bench.", dir=parent)
    atexit.register(cleanup)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    started = time.time()
    info = machine()
    log(info)
    # Ids are matched without regard to case (T8n, t8n and T8N are the same).
    only = set(x.strip().upper() for x in ARGS.only.split(",")) if ARGS.only else set(t.upper() for t in TESTS)
    unknown = only - set(t.upper() for t in TESTS)
    if unknown:
        ap.error(f"--only: unknown ids {', '.join(sorted(unknown))} (known: {', '.join(TESTS)})")
    done = set()
    for tid in ORDER:
        if tid.upper() not in only:
            continue
        fn = TESTS.get(tid)
        if fn is None:
            nid, what, target = next(t for t in TARGETS_NOT_YET if t[0] == tid)
            row(nid, what, "not yet measured", "—", "—", target, None)
            continue
        if fn in done:
            continue
        done.add(fn)
        log(f"== {tid}")
        try:
            fn()
        except Exception as e:  # one broken measurement must not hide the others
            log(f"{tid} ERROR: {e}")
            ids = {t5_t6: ["T5", "T6"], t7_t8: ["T7", "T8"]}.get(fn, [tid])
            for i in ids:
                row(i, "error", f"error: {str(e).splitlines()[0][:120]}", "—", "—", "", False)
    elapsed = time.time() - started

    ROWS.sort(key=lambda r: ORDER.index(r["id"]))
    mode = "quick" if q else "full"
    print(f"\n## Understudy bench ({mode}: {ARGS.runs} run(s) per side, median; fio {ARGS.runtime} s on "
          f"{ARGS.fio_size // MiB} MiB images, T1-T3 replicating every {ARGS.freq} s; {elapsed:.0f} s total)\n")
    print(f"Machine: {info}\n")
    print("| # | what | Understudy | reference | ratio | target | result |")
    print("|---|---|---|---|---|---|---|")
    for r in ROWS:
        res = "pass" if r["pass"] else ("FAIL" if r["pass"] is False else "not yet measured")
        print(f"| {r['id']} | {r['what']} | {r['ours']} | {r['ref']} | {r['ratio']} | {r['target']} | {res} |")
    print("\nDetails:\n")
    for d in DETAILS:
        print(f"- {d}")
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump({"mode": mode, "machine": info, "runs": ARGS.runs, "runtime": ARGS.runtime,
                       "elapsed_s": elapsed, "rows": ROWS, "details": DETAILS}, f, indent=2)
    measured = [r for r in ROWS if r["pass"] is not None]
    return 0 if measured and all(r["pass"] for r in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
