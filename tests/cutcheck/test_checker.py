"""Tests of the cut checker: it accepts true cuts and can fail on each violation.

Run from the repository root with Debian's Python (python3-libnbd):

    /usr/bin/python3 -m unittest tests/cutcheck/test_checker.py

The end-to-end test needs nbdkit (or qemu-nbd) and nbdcopy; it fails, never
skips, when they are missing (CUTCHECK_SERVER=qemu-nbd forces qemu-nbd). Random parts print their seed and replay with
CUTCHECK_SEED=<seed>.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import cutformat as cf  # noqa: E402
import checker  # noqa: E402

PY = "/usr/bin/python3"  # Debian's Python: has the nbd module
WORKLOAD = os.path.join(HERE, "workload.py")
CHECKER = os.path.join(HERE, "checker.py")
BS = cf.BLOCK_SIZE


def seed_for(name):
    s = int(os.environ.get("CUTCHECK_SEED", random.randrange(1 << 32)))
    print(f"\n{name}: seed {s} (replay with CUTCHECK_SEED={s})", file=sys.stderr)
    return s


def write_log(path, writes, disks, blocks, complete=True):
    """writes: iterable of (id, disk, block, issue_ns, ack_ns, failed)."""
    with open(path, "wb") as f:
        f.write(cf.pack_header(blocks, disks, 1, 1, 0, 0))
        for wid, d, b, iss, ack, failed in writes:
            f.write(cf.pack_record(wid, d, b, iss, ack, cf.FLAG_FAILED if failed else 0))
        if complete:
            f.write(cf.pack_record(0, 0, 0, 0, 0, cf.FLAG_END))


def build_images(state, writes_by_id, disks, blocks):
    """state: {(disk, block): write id}; missing keys are zero blocks."""
    imgs = [bytearray(blocks * BS) for _ in range(disks)]
    for (d, b), wid in state.items():
        if wid:
            wd, wb = writes_by_id[wid][1], writes_by_id[wid][2]
            imgs[d][b * BS:(b + 1) * BS] = cf.make_block(wid, wd, wb)
    return imgs


def classes(res):
    return set(res.get("violations", {}))


class _Synthetic(unittest.TestCase):
    """A hand-written history on 2 disks x 8 blocks, cut at T = 190.

        id  disk block  issue  ack   note
        1   0    0      100    110
        2   1    0      120    130
        3   0    1      140    150
        4   0    0      160    170   supersedes 1
        5   1    1      180    200   in flight at the cut: optional
        6   1    2      195    210   issued after the cut: forbidden
        7   0    2      185    188   FAILED: outcome unknown, optional
    """
    D, B, T = 2, 8, 190
    WRITES = [(1, 0, 0, 100, 110, 0), (2, 1, 0, 120, 130, 0), (3, 0, 1, 140, 150, 0),
              (4, 0, 0, 160, 170, 0), (5, 1, 1, 180, 200, 0), (6, 1, 2, 195, 210, 0),
              (7, 0, 2, 185, 188, 1)]
    CUT = {(0, 0): 4, (0, 1): 3, (1, 0): 2}  # the minimal true cut at T

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="cutcheck-")
        self.logpath = os.path.join(self.tmp, "log.bin")
        write_log(self.logpath, self.WRITES, self.D, self.B)
        self.log = cf.Log(self.logpath)
        self.by_id = {w[0]: w for w in self.WRITES}

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def images(self, **changes):
        state = dict(self.CUT)
        for key, wid in changes.items():  # key "d0b1" -> (0, 1)
            d, b = key[1:].split("b")
            state[(int(d), int(b))] = wid
        return build_images(state, self.by_id, self.D, self.B)

    def check(self, imgs, cut="T"):
        return checker.check_point(self.log, [bytes(i) for i in imgs],
                                   self.T if cut == "T" else cut)


class SyntheticTest(_Synthetic):
    """Each violation class on the hand-written history, in process."""

    # --- accepted ----------------------------------------------------------
    def test_accepts_true_cut(self):
        r = self.check(self.images())
        self.assertTrue(r["ok"], r)
        self.assertEqual(r["blocks_checked"], 16)
        self.assertEqual(r["writes_acked_before_cut"], 4)  # 1, 2, 3, 4 (7 failed)

    def test_accepts_in_flight_and_failed_writes_either_way(self):
        for d1b1 in (0, 5):
            for d0b2 in (0, 7):
                r = self.check(self.images(d1b1=d1b1, d0b2=d0b2))
                self.assertTrue(r["ok"], (d1b1, d0b2, r))
        self.assertEqual(self.check(self.images(d1b1=5))["in_flight_at_cut"], 1)

    def test_order_only_accepts_earlier_prefix(self):
        # Only write 1 present: a valid (older) cut when T is unknown.
        imgs = build_images({(0, 0): 1}, self.by_id, self.D, self.B)
        self.assertTrue(self.check(imgs, cut=None)["ok"])
        self.assertTrue(self.check(self.images(), cut=None)["ok"])

    # --- rejected ----------------------------------------------------------
    def test_rejects_torn_block(self):
        for off in (3, 9, 17, 27, 35, 40, 2000, BS - 1):  # header, csum, fill
            imgs = self.images()
            imgs[0][1 * BS + off] ^= 0x01
            r = self.check(imgs)
            self.assertEqual(classes(r), {"torn_or_foreign"}, (off, r))
            ex = r["violations"]["torn_or_foreign"]["examples"][0]
            self.assertEqual((ex["disk"], ex["block"]), (0, 1))

    def test_rejects_torn_half_old_half_new(self):
        imgs = self.images()
        old = cf.make_block(1, 0, 0)
        imgs[0][BS // 2:BS] = old[BS // 2:]  # block 0 = first half of 4, rest of 1
        self.assertEqual(classes(self.check(imgs)), {"torn_or_foreign"})

    def test_rejects_foreign_blocks(self):
        cases = {
            "stamp for another block": cf.make_block(3, 0, 1),     # at d0 b2
            "stamp for another disk": cf.make_block(7, 1, 2),      # right block, disk 1
            "id not in the log": cf.make_block(99, 0, 2),
            "logged id at another place": cf.make_block(6, 0, 2),  # 6 is d1 b2
            "garbage": bytes([0xAB]) * BS,
        }
        for name, blk in cases.items():
            imgs = self.images()
            imgs[0][2 * BS:3 * BS] = blk
            r = self.check(imgs)
            self.assertEqual(classes(r), {"torn_or_foreign"}, (name, r))
            # also with no cut time: check 1 does not depend on T
            self.assertFalse(self.check(imgs, cut=None)["ok"], name)

    def test_rejects_lost_acknowledged_write(self):
        r = self.check(self.images(d0b0=1))  # 4 (acked 170 < 190) lost, 1 shows
        self.assertEqual(classes(r), {"lost_write"}, r)
        ex = r["violations"]["lost_write"]["examples"][0]
        self.assertEqual((ex["disk"], ex["block"], ex["expected_id"], ex["found_id"]),
                         (0, 0, 4, 1))
        r = self.check(self.images(d1b0=0))  # 2 lost, block still zero
        self.assertIn("lost_write", classes(r))

    def test_rejects_write_from_the_future(self):
        r = self.check(self.images(d1b2=6))
        self.assertEqual(classes(r), {"write_from_future"}, r)
        ex = r["violations"]["write_from_future"]["examples"][0]
        self.assertEqual((ex["disk"], ex["block"], ex["found_id"]), (1, 2, 6))
        # The same image is a fine cut a little later.
        self.assertTrue(self.check(self.images(d1b2=6, d1b1=5), cut=196)["ok"])

    def test_rejects_order_violation_across_disks_without_cut_time(self):
        # Write 5 (disk 1, issued 180) is present, write 3 (disk 0, acked 150)
        # is missing: never a state of any moment, whatever the cut time.
        imgs = self.images(d0b1=0, d1b1=5)
        r = self.check(imgs, cut=None)
        self.assertEqual(classes(r), {"order_violation"}, r)
        # Both 5 and 4 (disk 0, issued 160) were issued after 3 was acked.
        v = r["violations"]["order_violation"]
        self.assertEqual(v["count"], 2)
        self.assertEqual([(e["disk"], e["block"], e["found_id"]) for e in v["examples"]],
                         [(0, 0, 4), (1, 1, 5)])
        ex = v["examples"][1]
        self.assertEqual((ex["missing_disk"], ex["missing_block"], ex["missing_id"],
                          ex["missing_block_holds"]), (0, 1, 3, 0))
        # A superseded write is not missing: holding 4 instead of 1 is fine,
        # but an older write in place of a newer acked one is not.
        self.assertTrue(self.check(self.images(), cut=None)["ok"])
        r = self.check(self.images(d0b0=1, d1b1=5), cut=None)
        self.assertEqual(classes(r), {"order_violation"}, r)

    def test_failed_write_is_never_required(self):
        # 7 failed (acked 188 < T): its absence is neither lost nor out of order.
        r = self.check(self.images(d1b1=5, d0b2=0))
        self.assertTrue(r["ok"], r)
        r = self.check(self.images(d1b1=5, d0b2=0), cut=None)
        self.assertTrue(r["ok"], r)


class CliTest(_Synthetic):
    """The command line: exit codes, JSON lines, --point, input errors."""

    def save(self, imgs, tag):
        paths = []
        for d, img in enumerate(imgs):
            p = os.path.join(self.tmp, f"{tag}-d{d}.raw")
            with open(p, "wb") as f:
                f.write(img)
            paths.append(p)
        return paths

    def run_checker(self, *args):
        p = subprocess.run([PY, CHECKER, "--log", self.logpath, *args],
                           capture_output=True, text=True, timeout=30)
        lines = p.stdout.strip().splitlines()
        self.assertEqual(len(lines), 1, (p.stdout, p.stderr))
        return p.returncode, json.loads(lines[0])

    def test_cli(self):
        good = self.save(self.images(), "good")
        bad = self.save(self.images(d0b0=1), "bad")
        img_args = lambda ps: [a for p in ps for a in ("--image", p)]  # noqa: E731
        rc, out = self.run_checker("--cut-ns", "190", *img_args(good))
        self.assertEqual((rc, out["ok"], out["blocks_checked"],
                          out["writes_acked_before_cut"]), (0, True, 16, 4))
        rc, out = self.run_checker("--cut-ns", "190", *img_args(bad))
        self.assertEqual((rc, out["ok"]), (1, False))
        self.assertEqual(out["violations"]["lost_write"]["count"], 1)
        rc, out = self.run_checker(*img_args(good))  # no cut time: order only
        self.assertEqual((rc, out["ok"], out["cut_ns"]), (0, True, None))
        rc, out = self.run_checker("--point", "190:" + ",".join(good),
                                   "--point", ":" + ",".join(good),
                                   "--point=-:" + ",".join(bad),
                                   "--point", "190:" + ",".join(bad))
        self.assertEqual((rc, out["ok"], out["points_checked"], out["points_failed"]),
                         (1, False, 4, 1))
        self.assertEqual(out["failures"][0]["images"], bad)
        # input errors: exit 2
        rc, out = self.run_checker("--image", good[0])
        self.assertEqual((rc, out["ok"]), (2, False))
        write_log(self.logpath, self.WRITES, self.D, self.B, complete=False)
        rc, out = self.run_checker(*img_args(good))
        self.assertEqual(rc, 2, out)
        rc, out = self.run_checker("--allow-incomplete-log", *img_args(good))
        self.assertEqual(rc, 0, out)


def random_history(rng, disks, blocks, n, inflight):
    """A random history obeying the workload's rules (ids ascend at issue,
    never two writes in flight on one block), with overlapping writes."""
    writes = []
    busy_until = {}
    t = 1000
    pending = []  # acks of in-flight writes
    for wid in range(1, n + 1):
        t += rng.randrange(1, 20)
        pending = [a for a in pending if a > t]
        while len(pending) >= inflight:
            t = min(pending) + 1
            pending = [a for a in pending if a > t]
        while True:
            d, b = rng.randrange(disks), rng.randrange(blocks)
            if busy_until.get((d, b), 0) < t:
                break
        ack = t + rng.randrange(1, 200)
        busy_until[(d, b)] = ack
        pending.append(ack)
        writes.append((wid, d, b, t, ack, 1 if rng.random() < 0.02 else 0))
    return writes


def true_cut(writes, T, rng):
    """A valid cut at T: per block the newest write acked before T, or a
    write in flight at T (issued <= T <= ack), or a failed write issued <= T
    -- each optional one taken at random."""
    state = {}
    for wid, d, b, iss, ack, failed in writes:  # id order == per-block order
        if iss > T:
            continue
        if (ack < T and not failed) or rng.random() < 0.5:
            state[(d, b)] = wid
    return state


class RandomHistoryTest(unittest.TestCase):
    def test_random_cuts_accepted_and_mutations_rejected(self):
        rng = random.Random(seed_for("random histories"))
        D, B = 3, 16
        for _ in range(40):
            writes = random_history(rng, D, B, rng.randrange(50, 400), rng.randrange(1, 12))
            by_id = {w[0]: w for w in writes}
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "log")
                write_log(path, writes, D, B)
                log = cf.Log(path)
            T = rng.randrange(writes[0][3], writes[-1][4] + 10)
            state = true_cut(writes, T, rng)
            imgs = build_images(state, by_id, D, B)
            r = checker.check_point(log, imgs, T)
            self.assertTrue(r["ok"], (T, r))
            self.assertTrue(checker.check_point(log, imgs, None)["ok"])
            # Roll back one block that holds a write acked before T: lost.
            victims = [k for k, w in state.items()
                       if by_id[w][4] < T and not by_id[w][5]]
            if victims:
                k = rng.choice(victims)
                older = [w[0] for w in writes if (w[1], w[2]) == k and w[0] < state[k]
                         and not w[5]]
                bad = dict(state)
                bad[k] = older[-1] if older else 0
                r = checker.check_point(log, build_images(bad, by_id, D, B), T)
                self.assertIn("lost_write", classes(r), r)
            # Add a write issued after T: from the future.
            later = [w for w in writes if w[3] > T]
            if later:
                w = rng.choice(later)
                bad = dict(state)
                bad[(w[1], w[2])] = w[0]
                r = checker.check_point(log, build_images(bad, by_id, D, B), T)
                self.assertIn("write_from_future", classes(r), r)


def wait_for_socket(path, proc, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise AssertionError(f"NBD server exited early: {proc.args}")
        time.sleep(0.02)
    raise AssertionError(f"NBD server did not create {path}")


class EndToEndTest(unittest.TestCase):
    """workload.py against real NBD servers, then the checker on the images."""

    DISKS, BLOCKS = 2, 1024

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="cutcheck-e2e-")
        self.servers = []
        nbdkit, qemu_nbd = shutil.which("nbdkit"), shutil.which("qemu-nbd")
        if os.environ.get("CUTCHECK_SERVER") == "qemu-nbd":  # exercise the fallback
            nbdkit = None
        if not (nbdkit or qemu_nbd):
            self.fail("neither nbdkit nor qemu-nbd is installed: cannot test the workload")
        self.uris, self.raw = [], []
        for d in range(self.DISKS):
            sock = os.path.join(self.tmp, f"d{d}.sock")
            if nbdkit:
                cmd = [nbdkit, "-f", "--exit-with-parent", "-U", sock, "memory", "8M"]
            else:
                img = os.path.join(self.tmp, f"d{d}.img")
                with open(img, "wb") as f:
                    f.truncate(8 << 20)
                self.raw.append(img)
                cmd = [qemu_nbd, "-f", "raw", "-k", sock, "--persistent", "--shared=8", img]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
            self.servers.append(proc)
            wait_for_socket(sock, proc)
            self.uris.append(f"nbd+unix:///?socket={sock}")

    def tearDown(self):
        for p in self.servers:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def copy_images(self):
        """Images of the final state: nbdcopy from the servers (or, with
        qemu-nbd, the raw files after stopping it)."""
        if self.raw:
            self.tearDown_servers_only()
            return list(self.raw)
        out = []
        nbdcopy = shutil.which("nbdcopy")
        self.assertIsNotNone(nbdcopy, "nbdcopy is not installed")
        for d, uri in enumerate(self.uris):
            dst = os.path.join(self.tmp, f"final-d{d}.raw")
            subprocess.run([nbdcopy, uri, dst], check=True, timeout=30)
            out.append(dst)
        return out

    def tearDown_servers_only(self):
        for p in self.servers:
            p.terminate()
            p.wait(10)

    def run_checker(self, log, *args):
        p = subprocess.run([PY, CHECKER, "--log", log, *args],
                           capture_output=True, text=True, timeout=60)
        self.assertIn(p.returncode, (0, 1), p.stdout + p.stderr)
        return p.returncode, json.loads(p.stdout)

    def test_workload_then_checker(self):
        seed = seed_for("end-to-end workload")
        log = os.path.join(self.tmp, "writes.log")
        t_before = time.time_ns()
        cmd = [PY, WORKLOAD, "--connections", "2", "--qd", "8", "--duration", "60",
               "--blocks", str(self.BLOCKS), "--seed", str(seed), "--log", log]
        for u in self.uris:
            cmd += ["--uri", u]
        wl = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        time.sleep(2.0)
        wl.send_signal(signal.SIGTERM)  # clean stop: drain, flush, trailer
        out, _ = wl.communicate(timeout=20)
        t_after = time.time_ns()
        self.assertEqual(wl.returncode, 0, out)
        summary = json.loads(out.strip().splitlines()[-1])
        print(f"end-to-end workload: {summary['writes']} writes, "
              f"{summary['writes_per_s']} writes/s", file=sys.stderr)
        self.assertEqual(summary["failed"], 0)
        self.assertGreater(summary["writes"], 1000)
        self.assertLess(summary["duration"], 10)

        lg = cf.Log(log)
        self.assertTrue(lg.complete)
        self.assertEqual((lg.writes, lg.max_id, lg.duplicates), (summary["writes"],) * 2 + (0,))
        for w in range(1, lg.max_id + 1):  # what the checker relies on
            self.assertTrue(t_before <= lg.issue[w] <= lg.ack[w] <= t_after)

        imgs = self.copy_images()
        ia = [a for p in imgs for a in ("--image", p)]

        # 1. After the last ack, the final state is a cut holding everything.
        rc, r = self.run_checker(log, "--cut-ns", str(t_after), *ia)
        self.assertEqual(rc, 0, r)
        self.assertEqual(r["writes_acked_before_cut"], summary["writes"])
        self.assertEqual(r["in_flight_at_cut"], 0)
        self.assertEqual(r["blocks_checked"], self.DISKS * self.BLOCKS)
        # ...and the order check alone accepts it.
        rc, r = self.run_checker(log, *ia)
        self.assertEqual(rc, 0, r)

        # 2. Before the run, the cut is empty: every block written is from
        # the future, and nothing can be lost (nothing was acked yet) or torn.
        rc, r = self.run_checker(log, "--cut-ns", str(t_before), *ia)
        self.assertEqual(rc, 1)
        self.assertEqual(classes(r), {"write_from_future"}, r)
        self.assertEqual(r["violations"]["write_from_future"]["count"], r["present_writes"])
        self.assertEqual(r["writes_acked_before_cut"], 0)

        # 3. Mid-run, the final state holds writes issued after the cut (the
        # blocks were rewritten many times) but has lost nothing.
        acks = sorted(lg.ack[1:])
        t_mid = acks[len(acks) // 2]
        rc, r = self.run_checker(log, "--cut-ns", str(t_mid), *ia)
        self.assertEqual((rc, classes(r)), (1, {"write_from_future"}), r)

        # 4. A true mid-run cut, rebuilt from the log (block content depends
        # only on (id, disk, block)), passes; rolling back one block of it to
        # an older write is caught as lost and, without the cut time, as an
        # order violation.
        rng = random.Random(seed)
        writes = [(w, lg.disk[w], lg.block[w], lg.issue[w], lg.ack[w], lg.failed[w])
                  for w in range(1, lg.max_id + 1)]
        by_id = {w[0]: w for w in writes}
        state = true_cut(writes, t_mid, rng)
        mid = [bytes(i) for i in build_images(state, by_id, self.DISKS, self.BLOCKS)]
        self.assertTrue(checker.check_point(lg, mid, t_mid)["ok"])
        self.assertTrue(checker.check_point(lg, mid, None)["ok"])
        newest = max(state.values(), key=lambda w: by_id[w][3])  # latest issue
        # victim: a block whose write was acked (before T) before `newest` was
        # issued, so rolling it back makes it missing while `newest` shows.
        victim = next(k for k, w in state.items()
                      if by_id[w][4] < by_id[newest][3] and not by_id[w][5]
                      and k != by_id[newest][1:3])
        prev = max((x[0] for x in writes if (x[1], x[2]) == victim
                    and x[0] < state[victim]), default=0)
        bad = dict(state)
        bad[victim] = prev
        bad_imgs = [bytes(i) for i in build_images(bad, by_id, self.DISKS, self.BLOCKS)]
        self.assertIn("lost_write", classes(checker.check_point(lg, bad_imgs, t_mid)))
        self.assertEqual(classes(checker.check_point(lg, bad_imgs, None)),
                         {"order_violation"})

        # 5. Several points at once.
        rc, r = self.run_checker(log, "--point", f"{t_after}:" + ",".join(imgs),
                                 "--point", f"{t_before}:" + ",".join(imgs))
        self.assertEqual((rc, r["points_checked"], r["points_failed"]), (1, 2, 1))

        # 6. One flipped byte in a real image: torn.
        with open(imgs[1], "r+b") as f:
            f.seek(7 * BS + 100)
            c = f.read(1)
            f.seek(7 * BS + 100)
            f.write(bytes([c[0] ^ 0x40]))
        rc, r = self.run_checker(log, "--cut-ns", str(t_after), *ia)
        self.assertEqual((rc, classes(r)), (1, {"torn_or_foreign"}), r)


if __name__ == "__main__":
    unittest.main()
