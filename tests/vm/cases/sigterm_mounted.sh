# SIGTERM to the engine of a mounted device: the device and its filesystem stay (the
# engine ends as a crash would, and the driver holds the device for recovery); a new
# engine attaches with `hornctl ublk recover`, and every file written before reads
# back.
source "$HORN_REPO/tests/vm/lib.sh"
start_replicas 3 256M
add_device mounted
mkfs.ext4 -q "$DEV"
mkdir -p mnt
mount "$DEV" mnt
dd if=/dev/urandom of=mnt/data bs=1M count=16 status=none
sync
sum=$(md5sum < mnt/data)
engine=$(hornctl ublk list --json | grep -o '"pid":[0-9]*' | head -1 | cut -d: -f2)
[ -n "$engine" ] && [ "$engine" -gt 0 ] || { echo "no engine pid in: $(hornctl ublk list --json)"; exit 1; }
kill -TERM "$engine"
wait_gone "$engine"
[ -b "$DEV" ] || { echo "$DEV was removed under a mounted filesystem"; exit 1; }
mountpoint -q mnt || { echo "the filesystem on $DEV went away"; exit 1; }
hornctl ublk recover "$DEV_ID" "${REPLICAS[@]}" --name mounted --control 127.0.0.1:0 --log-dir "$PWD"
echo 3 > /proc/sys/vm/drop_caches
[ "$(md5sum < mnt/data)" = "$sum" ] || { echo "the file changed across the SIGTERM"; exit 1; }
umount mnt
hornctl ublk del "$DEV_ID"
for _ in $(seq 50); do [ -b "$DEV" ] || break; sleep 0.1; done
[ ! -b "$DEV" ] || { echo "$DEV stayed after hornctl ublk del"; exit 1; }
