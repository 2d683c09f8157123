"""Shared on-disk formats of the cut checker: the stamped block and the write log.

Imported by workload.py, checker.py and test_checker.py (all live in this
directory; run them with Debian's /usr/bin/python3). Standard library only.

Stamped block (BLOCK_SIZE = 4096 bytes, little endian):

    offset  size  field
    0       8     magic  b"USCUTCHK"
    8       8     write id (u64, globally increasing, starts at 1; 0 never used)
    16      4     disk index (u32, position of the disk in the workload's --uri list)
    20      4     format version (u32, = 1)
    24      8     block number (u64, block index inside the disk)
    32      8     checksum: blake2b with digest_size 8 over the whole block with
                  this field set to zero
    40      4056  fill: blake2b-512(b"fill" + id) repeated, so every write of
                  every block has different bytes and a shifted or mixed-up
                  block cannot pass the checksum by accident

Because the content depends only on (id, disk, block), any write recorded in
the log can be regenerated bit for bit (make_block) -- the tests use this to
build images of arbitrary cuts from a real run's log.

Write log (binary, little endian):

    header  (64 bytes) : LOG_HEADER = magic b"USCUTLOG", version u32, block
                         size u32, blocks per disk u64, disks u32, connections
                         u32, qd u32, pad u32, seed u64, start_ns i64, pad 8
    records (32 bytes) : LOG_RECORD = id u64, disk u16, flags u16, block u32,
                         issue_ns i64, ack_ns i64
    trailer (32 bytes) : a LOG_RECORD with id 0 and flags END; issue_ns = start,
                         ack_ns = end of the run. Absent if the workload died.

Records are appended when a write completes, so they are in completion order,
not id order. issue_ns is time.time_ns() (CLOCK_REALTIME) taken immediately
before submission; ack_ns immediately after the completion was observed. For
a FAILED write ack_ns is when the failure was observed and the write's outcome
is unknown (it may or may not have reached the disk).
"""

import hashlib
import struct

BLOCK_SIZE = 4096
MAGIC = b"USCUTCHK"
BLOCK_VERSION = 1
# magic, id, disk, version, block, checksum
BLOCK_HEADER = struct.Struct("<8sQIIQQ")
CSUM_OFF, CSUM_LEN = 32, 8
FILL_OFF = BLOCK_HEADER.size  # 40

LOG_MAGIC = b"USCUTLOG"
LOG_VERSION = 1
LOG_HEADER = struct.Struct("<8sIIQIIIIQq8x")
LOG_RECORD = struct.Struct("<QHHIqq")
assert LOG_HEADER.size == 64 and LOG_RECORD.size == 32

FLAG_FAILED = 1  # the write returned an error: outcome unknown
FLAG_END = 0x8000  # trailer record (id 0): clean end of the log

ZERO_BLOCK = bytes(BLOCK_SIZE)
_ZERO_CSUM = bytes(CSUM_LEN)


def _checksum(block_with_zero_csum):
    return hashlib.blake2b(block_with_zero_csum, digest_size=CSUM_LEN).digest()


def make_block(write_id, disk, block):
    """The exact 4 KiB content of write `write_id` to (disk, block)."""
    seed = hashlib.blake2b(b"fill" + write_id.to_bytes(8, "little"), digest_size=64).digest()
    fill_len = BLOCK_SIZE - FILL_OFF
    fill = (seed * (fill_len // len(seed) + 1))[:fill_len]
    buf = bytearray(BLOCK_HEADER.pack(MAGIC, write_id, disk, BLOCK_VERSION, block, 0))
    buf += fill
    buf[CSUM_OFF:CSUM_OFF + CSUM_LEN] = _checksum(buf)
    return buf


def parse_block(data):
    """Classify one 4 KiB block read from an image.

    Returns (write_id, disk, block, error):
      (0, None, None, None)          all zeros: the initial content
      (id, disk, block, None)        a well-formed stamp (the caller still has
                                     to check disk/block/id against the log)
      (None, disk?, block?, reason)  not a block any write could have produced
    """
    if data == ZERO_BLOCK:
        return 0, None, None, None
    if len(data) != BLOCK_SIZE:
        return None, None, None, "short block"
    magic, wid, disk, version, block, _ = BLOCK_HEADER.unpack_from(data)
    if magic != MAGIC or version != BLOCK_VERSION:
        return None, None, None, "bad magic"
    buf = bytearray(data)
    stored = bytes(buf[CSUM_OFF:CSUM_OFF + CSUM_LEN])
    buf[CSUM_OFF:CSUM_OFF + CSUM_LEN] = _ZERO_CSUM
    if _checksum(buf) != stored:
        return None, disk, block, "bad checksum"
    return wid, disk, block, None


def pack_header(blocks, disks, connections, qd, seed, start_ns):
    return LOG_HEADER.pack(LOG_MAGIC, LOG_VERSION, BLOCK_SIZE, blocks, disks,
                           connections, qd, 0, seed, start_ns)


def pack_record(write_id, disk, block, issue_ns, ack_ns, flags=0):
    return LOG_RECORD.pack(write_id, disk, flags, block, issue_ns, ack_ns)


class Log:
    """A write log loaded into flat per-id arrays (ids are dense 1..max_id).

    Arrays are indexed by write id; index 0 is unused. `known[id]` is 1 when a
    record for the id exists. Loading is linear in the number of records.
    """

    def __init__(self, path):
        with open(path, "rb") as f:
            raw = f.read()
        if len(raw) < LOG_HEADER.size:
            raise ValueError(f"{path}: too short for a cut log header")
        (magic, version, bsize, self.blocks, self.disks, self.connections,
         self.qd, _, self.seed, self.start_ns) = LOG_HEADER.unpack_from(raw)
        if magic != LOG_MAGIC or version != LOG_VERSION or bsize != BLOCK_SIZE:
            raise ValueError(f"{path}: not a version-{LOG_VERSION} cut log")
        body = memoryview(raw)[LOG_HEADER.size:]
        nrec = len(body) // LOG_RECORD.size
        self.truncated_bytes = len(body) % LOG_RECORD.size
        self.complete = False
        self.end_ns = None
        recs = []
        max_id = 0
        for rec in LOG_RECORD.iter_unpack(body[:nrec * LOG_RECORD.size]):
            wid, disk, flags, block, issue, ack = rec
            if flags & FLAG_END:
                self.complete = True
                self.end_ns = ack
                continue
            if wid == 0:
                raise ValueError(f"{path}: record with write id 0")
            recs.append(rec)
            if wid > max_id:
                max_id = wid
        self.max_id = max_id
        n = max_id + 1
        self.known = bytearray(n)
        self.failed = bytearray(n)
        self.disk = [0] * n
        self.block = [0] * n
        self.issue = [0] * n
        self.ack = [0] * n
        self.duplicates = 0
        for wid, disk, flags, block, issue, ack in recs:
            if self.known[wid]:
                self.duplicates += 1
            self.known[wid] = 1
            self.failed[wid] = 1 if flags & FLAG_FAILED else 0
            self.disk[wid] = disk
            self.block[wid] = block
            self.issue[wid] = issue
            self.ack[wid] = ack
        self.writes = len(recs)
