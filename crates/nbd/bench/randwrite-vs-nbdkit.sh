#!/bin/bash
# 4 KiB random writes at queue depth 32 through fio's nbd engine: our example server against
# `nbdkit file` on the same sparse 1 GiB image, measured in the same run; prints IOPS and the
# ratio. Usage: crates/nbd/bench/randwrite-vs-nbdkit.sh [seconds] [workers]
# Needs: fio, nbdkit (apt-get install -y fio nbdkit). Builds the example in release mode.
set -euo pipefail
RUNTIME=${1:-6}
WORKERS=${2:-4}
cd "$(dirname "$0")/../../.."
for tool in fio nbdkit; do
    command -v $tool >/dev/null || { echo "missing $tool: apt-get install -y $tool" >&2; exit 1; }
done
cargo build -q --release -p understudy-nbd --example nbd-file-server
TARGET=${CARGO_TARGET_DIR:-target}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
IMG=$WORK/disk.img

iops() { # URI
    fio --name=bench --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=32 --numjobs=1 \
        --size=1G --time_based --runtime="$RUNTIME" --output-format=json --output="$WORK/fio.json" >/dev/null
    python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"]))' "$WORK/fio.json"
}

truncate -s 1G "$IMG"
nbdkit -f -U "$WORK/kit.sock" file "$IMG" & KIT=$!
sleep 0.5
KIT_IOPS=$(iops "nbd+unix:///?socket=$WORK/kit.sock")
kill $KIT; wait $KIT 2>/dev/null || true

rm -f "$IMG"; truncate -s 1G "$IMG"
# The example server runs until its stdin closes: give it a FIFO and close our end to stop it.
mkfifo "$WORK/ctl"
"$TARGET/release/examples/nbd-file-server" "$WORK/us.sock" disk="$IMG" --workers "$WORKERS" <"$WORK/ctl" >/dev/null &
SRV=$!
exec 7>"$WORK/ctl"
sleep 0.5
US_IOPS=$(iops "nbd+unix:///disk?socket=$WORK/us.sock")
exec 7>&-
wait $SRV

python3 -c "print(f'randwrite 4k QD32: understudy {$US_IOPS} IOPS, nbdkit file {$KIT_IOPS} IOPS, ratio {$US_IOPS/$KIT_IOPS:.2f}')"
