#!/usr/bin/python3
"""Cut-checker workload: stamped 4 KiB writes over NBD, every write logged.

    /usr/bin/python3 workload.py --uri NBD_URI [--uri NBD_URI ...]
        --connections N --duration SECS --log FILE
        [--seed S] [--blocks B] [--qd Q] [--stop-file PATH]

Each --uri is one disk of the VM (disk index = position on the command line).
Each disk is opened with N libnbd handles (multi-conn) and every handle keeps
up to Q writes in flight, all driven by one single-threaded epoll loop over
libnbd's async API (aio_pwrite + aio_notify_read/write + completion callbacks).

Invariants the checker relies on (see cutformat.py for the byte formats):
  * write ids are assigned at submission and strictly increase globally;
  * never two writes in flight on the same (disk, block) -- so, per block,
    id order == issue order == ack order, and "superseded" means "a larger id
    on the same block";
  * issue_ns is taken immediately before aio_pwrite, ack_ns as the first thing
    in the completion callback, both with time.time_ns() (CLOCK_REALTIME),
    so [issue_ns, ack_ns] contains the server's real execution of the write;
  * every submitted write gets exactly one log record, failed ones flagged
    FAILED (outcome unknown). The END trailer is written only after all
    writes have completed or been recorded as failed.

Stops cleanly (drains in-flight writes, flushes each disk, writes the log
trailer) at --duration, on SIGTERM/SIGINT, or when --stop-file appears.
Prints one JSON line; exits 1 if any write failed (for Understudy a guest
write must never fail), 2 on usage/connection errors.
"""

import argparse
import errno as errno_mod
import json
import os
import random
import select
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cutformat as cf  # noqa: E402

try:
    import nbd
except ImportError:
    sys.exit("workload.py: cannot import nbd; run it with Debian's /usr/bin/python3 "
             "(package python3-libnbd)")


class SetupError(Exception):
    pass


class Conn:
    __slots__ = ("h", "disk", "fd", "inflight", "dead", "events")

    def __init__(self, h, disk):
        self.h = h
        self.disk = disk
        self.fd = h.aio_get_fd()
        self.inflight = 0
        self.dead = False
        self.events = 0


class Workload:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.blocks = args.blocks
        self.qd = args.qd
        self.next_id = 1
        # wid -> [wid, disk, block, issue_ns, nbd.Buffer, Conn]. The Buffer is
        # kept referenced here until completion, as libnbd requires.
        self.inflight = {}
        self.busy = [bytearray(args.blocks) for _ in args.uri]
        self.writes = 0
        self.failed = 0
        self.stop = False
        self.conns = []
        self.multi_conn = True
        self.header_written = False
        self.log = open(args.log, "wb", buffering=1 << 20)

    # --- setup -----------------------------------------------------------
    def connect(self):
        need = self.blocks * cf.BLOCK_SIZE
        for disk, uri in enumerate(self.args.uri):
            for _ in range(self.args.connections):
                h = nbd.NBD()
                h.connect_uri(uri)
                size = h.get_size()
                if size < need:
                    raise SetupError(f"{uri} has {size} bytes, --blocks {self.blocks} "
                                     f"needs {need}")
                if h.is_read_only():
                    raise SetupError(f"{uri} is read-only")
                self.multi_conn = self.multi_conn and bool(h.can_multi_conn())
                self.conns.append(Conn(h, disk))

    # --- one write -------------------------------------------------------
    def pick_block(self, disk):
        busy = self.busy[disk]
        for _ in range(8):
            b = self.rng.randrange(self.blocks)
            if not busy[b]:
                return b
        start = self.rng.randrange(self.blocks)  # nearly full: scan
        for i in range(self.blocks):
            b = (start + i) % self.blocks
            if not busy[b]:
                return b
        return None

    def submit(self, c):
        blk = self.pick_block(c.disk)
        if blk is None:
            return False
        wid = self.next_id
        self.next_id += 1
        buf = nbd.Buffer.from_buffer(cf.make_block(wid, c.disk, blk))
        entry = [wid, c.disk, blk, 0, buf, c]
        self.busy[c.disk][blk] = 1
        self.inflight[wid] = entry
        c.inflight += 1

        def done(err, entry=entry):
            self.complete(entry, err.value)
            return 1  # auto-retire the command

        entry[3] = time.time_ns()
        try:
            c.h.aio_pwrite(buf, blk * cf.BLOCK_SIZE, done)
        except nbd.Error as e:
            # Not submitted: libnbd will not call `done`. Still recorded as
            # FAILED (a write the "guest" issued that did not succeed).
            self.complete(entry, e.errno or errno_mod.EIO)
            self.kill(c, e)
            return False
        return True

    def complete(self, entry, err):
        ack = time.time_ns()  # first thing: the completion was just observed
        if self.inflight.pop(entry[0], None) is None:
            return  # already recorded (connection failure path)
        wid, disk, blk, issue, _, c = entry
        flags = 0
        if err:
            flags = cf.FLAG_FAILED
            self.failed += 1
            if self.failed <= 5:
                print(f"workload.py: write {wid} disk {disk} block {blk} failed: "
                      f"{os.strerror(err)}", file=sys.stderr)
        self.writes += 1
        self.log.write(cf.pack_record(wid, disk, blk, issue, ack, flags))
        self.busy[disk][blk] = 0
        c.inflight -= 1

    def kill(self, c, exc):
        """The connection is unusable: its in-flight writes have unknown outcome."""
        if c.dead:
            return
        c.dead = True
        print(f"workload.py: connection to disk {c.disk} failed: {exc}", file=sys.stderr)
        try:
            self.ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        for entry in [e for e in self.inflight.values() if e[5] is c]:
            self.complete(entry, errno_mod.ENOTCONN)

    # --- the loop --------------------------------------------------------
    def run(self):
        a = self.args
        self.ep = select.epoll()
        for c in self.conns:
            self.ep.register(c.fd, 0)
        self.start_ns = time.time_ns()
        self.header_written = True
        self.log.write(cf.pack_header(self.blocks, len(a.uri), a.connections,
                                      self.qd, a.seed, self.start_ns))
        deadline = time.monotonic() + a.duration
        next_stop_check = 0.0
        by_fd = {c.fd: c for c in self.conns}
        while True:
            now = time.monotonic()
            if now >= deadline:
                self.stop = True
            if a.stop_file and now >= next_stop_check:
                next_stop_check = now + 0.05
                if os.path.exists(a.stop_file):
                    self.stop = True
            if not self.stop:
                for c in self.conns:
                    while not c.dead and c.inflight < self.qd and self.submit(c):
                        pass
            if not self.inflight and (self.stop or all(c.dead for c in self.conns)):
                break
            # Tell epoll what each live handle waits for (libnbd's direction).
            for c in self.conns:
                if c.dead:
                    continue
                d = c.h.aio_get_direction()
                ev = (select.EPOLLIN if d & nbd.AIO_DIRECTION_READ else 0) | \
                     (select.EPOLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0)
                if c.inflight == 0 and not (d & nbd.AIO_DIRECTION_WRITE):
                    ev = 0  # idle: nothing to read (a hangup shows on next submit)
                if ev != c.events:
                    self.ep.modify(c.fd, ev)
                    c.events = ev
            for fd, mask in self.ep.poll(0.05):
                c = by_fd[fd]
                if c.dead:
                    continue
                try:
                    # Prefer read when both: a reply may change what to write.
                    if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        c.h.aio_notify_read()
                    elif mask & select.EPOLLOUT:
                        c.h.aio_notify_write()
                except nbd.Error as e:
                    self.kill(c, e)
                if not c.dead and (c.h.aio_is_dead() or c.h.aio_is_closed()):
                    self.kill(c, "connection closed")
        self.end_ns = time.time_ns()

    def finish(self):
        """Record anything unfinished as FAILED, flush disks, close the log."""
        for entry in list(self.inflight.values()):
            self.complete(entry, errno_mod.EINTR)
        for c in self.conns:
            if c.dead:
                continue
            try:
                if c.h.can_flush():
                    c.h.flush()
                c.h.shutdown()
            except nbd.Error as e:
                print(f"workload.py: flush/shutdown of disk {c.disk}: {e}", file=sys.stderr)
        if self.header_written:  # else the log stays empty: nothing was written
            end = getattr(self, "end_ns", time.time_ns())
            self.log.write(cf.pack_record(0, 0, 0, self.start_ns, end, cf.FLAG_END))
        self.log.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--uri", action="append", required=True,
                   help="NBD URI of one disk (repeat, in disk-index order)")
    p.add_argument("--connections", type=int, default=1, help="handles per disk")
    p.add_argument("--duration", type=float, required=True, help="seconds")
    p.add_argument("--log", required=True, help="write log (binary, see cutformat.py)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--blocks", type=int, default=2048, help="blocks used per disk")
    p.add_argument("--qd", type=int, default=8, help="writes in flight per handle")
    p.add_argument("--stop-file", help="stop when this file appears")
    a = p.parse_args()
    if a.connections < 1 or a.qd < 1 or a.blocks < 1 or a.duration < 0:
        p.error("--connections, --qd, --blocks must be >= 1, --duration >= 0")
    if len(a.uri) > 0xFFFF or a.blocks > 0xFFFFFFFF:
        p.error("too many disks or blocks for the log format")
    if a.seed is None:
        a.seed = int.from_bytes(os.urandom(8), "little") >> 1
    print(f"workload.py: seed {a.seed}", file=sys.stderr)

    w = Workload(a)

    def on_signal(signum, _frame):
        w.stop = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        w.connect()
        w.run()
    except (nbd.Error, SetupError) as e:
        print(f"workload.py: {e}", file=sys.stderr)
        w.finish()
        sys.exit(2)
    finally:
        if not w.log.closed:
            w.finish()
    dur = (w.end_ns - w.start_ns) / 1e9
    print(json.dumps({
        "writes": w.writes, "failed": w.failed, "duration": round(dur, 3),
        "writes_per_s": round(w.writes / dur, 1) if dur > 0 else 0.0,
        "disks": len(a.uri), "connections": a.connections, "qd": a.qd,
        "blocks": a.blocks, "multi_conn": w.multi_conn, "seed": a.seed,
        "start_ns": w.start_ns, "end_ns": w.end_ns, "log": a.log,
    }), flush=True)
    sys.exit(1 if w.failed else 0)


if __name__ == "__main__":
    main()
