#!/usr/bin/python3
"""Cut checker: are these disk images a valid crash-consistent cut of the workload?

    checker.py --log FILE [--cut-ns T] --image DISK0 [--image DISK1 ...] [--blocks B]
    checker.py --log FILE --point T0:DISK0,DISK1 [--point T1:DISK0,DISK1 ...]

Images are given in disk-index order (the order of workload.py's --uri) and
are raw files or NBD URIs (nbd://..., nbd+unix://..., read with libnbd). In
--point, T may be empty (--point :IMG0,IMG1) or "-" (--point=-:IMG0,IMG1) for
"cut time unknown" (order check only).

Checks (RELIABILITY.md, "The oracle: a cut checker"):
  torn_or_foreign    every block is all zeros (initial content) or exactly a
                     write recorded in the log for that (disk, block)
  lost_write         (with a cut time T) every write acknowledged before T
                     (ack_ns < T) is present or superseded by a later write
                     to the same block that is present
  write_from_future  (with T) no present write was issued after T (issue_ns > T)
  order_violation    (always, independent of T) for every present write B,
                     every write A acknowledged before B was issued
                     (ack_A < issue_B) is present or superseded

FAILED writes in the log have an unknown outcome: they may be present (and
then count as present writes for every check) but are never required.

Output: one JSON line. Exit 0 valid, 1 violation(s), 2 bad input (unreadable
or mismatched image, incomplete log without --allow-incomplete-log, ...).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cutformat as cf  # noqa: E402

BS = cf.BLOCK_SIZE
NBD_SCHEMES = ("nbd:", "nbds:", "nbd+unix:", "nbds+unix:", "nbd+vsock:", "nbds+vsock:")


class InputError(Exception):
    pass


def read_image(src, blocks):
    """The first `blocks` blocks of a raw file or an NBD export, as bytes."""
    need = blocks * BS
    if src.startswith(NBD_SCHEMES):
        import nbd  # only needed for this case; python3-libnbd
        h = nbd.NBD()
        try:
            h.connect_uri(src)
            if h.get_size() < need:
                raise InputError(f"{src}: export has {h.get_size()} bytes, need {need}")
            out = bytearray()
            chunk = 4 << 20
            for off in range(0, need, chunk):
                out += h.pread(min(chunk, need - off), off)
            return bytes(out)
        except nbd.Error as e:
            raise InputError(f"{src}: {e}")
        finally:
            try:
                h.shutdown()
            except Exception:
                pass
    try:
        with open(src, "rb") as f:
            data = f.read(need)
    except OSError as e:
        raise InputError(f"{src}: {e}")
    if len(data) < need:
        raise InputError(f"{src}: image has {len(data)} bytes, need {need}")
    return data


class Violations:
    """Per-class counters with the first few examples."""

    def __init__(self, max_examples):
        self.max = max_examples
        self.classes = {}

    def add(self, cls, example):
        v = self.classes.setdefault(cls, {"count": 0, "examples": []})
        v["count"] += 1
        if len(v["examples"]) < self.max:
            v["examples"].append(example)

    def __bool__(self):
        return bool(self.classes)


def check_point(log, images, cut_ns=None, blocks=None, max_examples=5):
    """Check one recovery point. `images` are the bytes of each disk, in order.

    Returns a dict (the JSON result). Linear in (#writes in log + #blocks):
    one pass over the image blocks, one pass over the write ids, one more
    pass over the blocks. Nothing is sorted.
    """
    B = blocks if blocks is not None else log.blocks
    D = len(images)
    nblk = D * B
    T = cut_ns
    viol = Violations(max_examples)

    # ---- Pass 1, check 1: what does each block hold? ---------------------
    # present[k] (k = disk*B + block): write id held, 0 for all zeros, -1 if
    # the content is torn or foreign (such blocks are skipped by checks 2-4:
    # they already fail, and guessing what they "hold" would only add noise).
    present = [0] * nblk
    for d, data in enumerate(images):
        for b in range(B):
            raw = data[b * BS:(b + 1) * BS]
            wid, sdisk, sblock, err = cf.parse_block(raw)
            if err is None and wid == 0:
                continue
            if err is None:
                if sdisk != d or sblock != b:
                    err = f"stamp is for disk {sdisk} block {sblock}"
                elif wid > log.max_id or not log.known[wid]:
                    err = "write id not in log"
                elif log.disk[wid] != d or log.block[wid] != b:
                    err = (f"log has write {wid} at disk {log.disk[wid]} "
                           f"block {log.block[wid]}")
            if err is not None:
                present[d * B + b] = -1
                viol.add("torn_or_foreign", {"disk": d, "block": b, "found_id": wid,
                                             "reason": err})
            else:
                present[d * B + b] = wid

    # ---- Pass 2 over all logged writes (ids ascending) ----------------------
    # Invariant from the workload: never two writes in flight on one block,
    # ids assigned at issue. Hence per block: id order == issue order == ack
    # order, and write w is "present or superseded" exactly when
    # present[block(w)] >= w. A write w with present[block(w)] < w is
    # MISSING.
    #
    # Check 2 (lost):   need[k]  = newest non-failed write on k acked < T;
    #                   lost iff need[k] > present[k].
    # Check 3 (future): allow[k] = newest write on k issued <= T, only used to
    #                   name the "expected" id in examples.
    # Check 4 (order):  there is a violation iff some missing, non-failed A
    #                   and some present B have ack_A < issue_B, i.e. iff
    #                       min{ack_A : A missing}  <  max{issue_B : B present}.
    #                   So it suffices to track the earliest-acked missing
    #                   write (M_id, M) here and the latest issue among
    #                   present writes in pass 3. Every present B with
    #                   issue_B > M is a violation, witnessed by M_id (which
    #                   is neither present nor superseded: present[k] < M_id
    #                   on its block). If no present B has issue_B > M, then
    #                   for every missing A and present B, ack_A >= M >=
    #                   issue_B, so nothing acked before any present write is
    #                   missing. Linear time, no sort, independent of T.
    need = [0] * nblk
    allow = [0] * nblk
    acked_before_cut = 0
    miss_ack = None
    miss_id = 0
    known, failed = log.known, log.failed
    ldisk, lblock, issue, ack = log.disk, log.block, log.issue, log.ack
    for w in range(1, log.max_id + 1):
        if not known[w]:
            continue
        d, b = ldisk[w], lblock[w]
        if d >= D or b >= B:
            continue  # outside the checked range (e.g. smaller --blocks)
        k = d * B + b
        p = present[k]
        if p < 0:
            continue
        f = failed[w]
        if T is not None:
            if issue[w] <= T:
                allow[k] = w  # ids ascend: ends as the newest
            if not f and ack[w] < T:
                need[k] = w
                acked_before_cut += 1
        if w > p and not f and (miss_ack is None or ack[w] < miss_ack):
            miss_ack, miss_id = ack[w], w

    # ---- Pass 3 over blocks: checks 2, 3, 4 ------------------------------
    present_writes = 0
    in_flight_at_cut = 0  # present writes issued <= T but acked >= T
    order_bad = []
    for k in range(nblk):
        p = present[k]
        if p < 0:
            continue
        d, b = divmod(k, B)
        if T is not None and need[k] > p:
            viol.add("lost_write", {"disk": d, "block": b, "expected_id": need[k],
                                    "found_id": p, "expected_ack_ns": ack[need[k]]})
        if p == 0:
            continue
        present_writes += 1
        if T is not None:
            if issue[p] > T:
                viol.add("write_from_future", {
                    "disk": d, "block": b, "expected_id": allow[k], "found_id": p,
                    "found_issue_ns": issue[p]})
            elif failed[p] or ack[p] >= T:
                in_flight_at_cut += 1
        if miss_ack is not None and issue[p] > miss_ack:
            order_bad.append((issue[p], d, b, p))
    if order_bad:
        md, mb = ldisk[miss_id], lblock[miss_id]
        holds = present[md * B + mb]
        # Examples: the earliest-issued offenders first (deterministic output).
        order_bad.sort()
        for iss, d, b, p in order_bad:
            viol.add("order_violation", {
                "disk": d, "block": b, "found_id": p, "found_issue_ns": iss,
                "missing_id": miss_id, "missing_disk": md, "missing_block": mb,
                "missing_ack_ns": miss_ack, "missing_block_holds": holds})

    res = {"ok": not viol, "cut_ns": T, "blocks_checked": nblk,
           "writes_in_log": log.writes, "failed_writes_in_log": sum(log.failed),
           "present_writes": present_writes}
    if T is not None:
        res["writes_acked_before_cut"] = acked_before_cut
        res["in_flight_at_cut"] = in_flight_at_cut
    if viol:
        res["violations"] = viol.classes
    return res


def parse_cut(s):
    s = s.strip()
    if s in ("", "-"):
        return None
    return int(s)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--log", required=True)
    p.add_argument("--cut-ns", help="cut time, ns since the epoch (CLOCK_REALTIME)")
    p.add_argument("--image", action="append", default=[],
                   help="image of one disk (repeat, in disk-index order)")
    p.add_argument("--point", action="append", default=[],
                   help="T:IMG0,IMG1,... one recovery point (T empty or - = unknown)")
    p.add_argument("--blocks", type=int, help="blocks per disk (default: from the log)")
    p.add_argument("--max-examples", type=int, default=5)
    p.add_argument("--allow-incomplete-log", action="store_true",
                   help="accept a log without END trailer (workload died): writes "
                        "that were in flight then are unlogged and look foreign")
    a = p.parse_args()

    def fail_input(msg):
        print(json.dumps({"ok": False, "error": msg}), flush=True)
        sys.exit(2)

    if bool(a.image) == bool(a.point):
        fail_input("give either --image (with optional --cut-ns) or --point, not both")
    if a.point and a.cut_ns is not None:
        fail_input("--cut-ns goes with --image; put the time in each --point")
    try:
        log = cf.Log(a.log)
    except (OSError, ValueError) as e:
        fail_input(str(e))
    if log.duplicates:
        fail_input(f"log has {log.duplicates} duplicate write ids")
    if not log.complete and not a.allow_incomplete_log:
        fail_input("log has no END trailer (workload did not stop cleanly); "
                   "use --allow-incomplete-log to check anyway")
    blocks = a.blocks if a.blocks is not None else log.blocks
    if blocks < 1 or blocks > log.blocks:
        fail_input(f"--blocks must be 1..{log.blocks} (the workload's --blocks)")

    points = []
    try:
        if a.image:
            points.append((parse_cut(a.cut_ns) if a.cut_ns is not None else None, a.image))
        for spec in a.point:
            t, sep, imgs = spec.partition(":")
            if not sep or not imgs:
                fail_input(f"--point {spec!r}: expected T:IMG0,IMG1,...")
            points.append((parse_cut(t), imgs.split(",")))
    except ValueError as e:
        fail_input(f"bad cut time: {e}")

    results = []
    for cut, imgs in points:
        if len(imgs) != log.disks:
            fail_input(f"{len(imgs)} image(s) given, the log has {log.disks} disk(s)")
        try:
            data = [read_image(i, blocks) for i in imgs]
        except InputError as e:
            fail_input(str(e))
        r = check_point(log, data, cut, blocks, a.max_examples)
        r["images"] = imgs
        results.append(r)

    if a.image:
        out = results[0]
    else:
        bad = [r for r in results if not r["ok"]]
        out = {"ok": not bad, "points_checked": len(results), "points_failed": len(bad),
               "blocks_checked": sum(r["blocks_checked"] for r in results),
               "writes_acked_before_cuts": sum(r.get("writes_acked_before_cut", 0)
                                               for r in results),
               "failures": bad}
    print(json.dumps(out), flush=True)
    sys.exit(0 if out["ok"] else 1)


if __name__ == "__main__":
    main()
