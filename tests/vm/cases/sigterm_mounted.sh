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
engine=$(engine_pid "$DEV_ID")
[ -n "$engine" ] && [ "$engine" -gt 0 ] || { echo "no engine pid in: $(hornctl ublk list --json)"; exit 1; }
kill -TERM "$engine"
wait_gone "$engine"
[ -b "$DEV" ] || { echo "$DEV was removed under a mounted filesystem"; exit 1; }
mountpoint -q mnt || { echo "the filesystem on $DEV went away"; exit 1; }
# A recovery pinned to another volume is refused before it claims anything; pinned to
# this one (the ID the engine printed), it attaches.
volume=$(grep -o 'hornd engine: volume [0-9a-f]\{32\}' ublk-mounted.log | head -1 | awk '{print $4}')
[ -n "$volume" ] || { echo "no volume ID in: $(cat ublk-mounted.log)"; exit 1; }
if hornctl ublk recover "$DEV_ID" "${REPLICAS[@]}" --name mounted --control 127.0.0.1:0 --log-dir "$PWD" \
    --volume 00000000000000000000000000000000 2>pin.err; then
    echo "a recovery pinned to another volume attached"; exit 1
fi
grep -q "pinned to volume" pin.err ublk-mounted.log || { echo "unexpected refusal: $(cat pin.err)"; exit 1; }
hornctl ublk recover "$DEV_ID" "${REPLICAS[@]}" --name mounted --control 127.0.0.1:0 --log-dir "$PWD" --volume "$volume"
echo 3 > /proc/sys/vm/drop_caches
[ "$(md5sum < mnt/data)" = "$sum" ] || { echo "the file changed across the SIGTERM"; exit 1; }
umount mnt
# The unmounted device goes as any other (the kernel may take a moment to let go of
# the filesystem's exclusive hold).
for _ in $(seq 20); do hornctl ublk del "$DEV_ID" 2>del.err && break; sleep 0.5; done
if [ -b "$DEV" ]; then
    echo "$DEV stayed after hornctl ublk del: $(cat del.err)"
    grep ublkb /proc/mounts || echo "(not in /proc/mounts)"
    echo "holders: $(ls /sys/block/$(basename "$DEV")/holders 2>&1)"
    for p in /proc/[0-9]*; do ls -l "$p/fd" 2>/dev/null | grep -q "$DEV" && echo "held by $(cat "$p/comm") (${p#/proc/})"; done
    hornctl ublk list
    exit 1
fi
