# I/O past the end of the device is refused by the kernel; with every replica gone,
# I/O fails with EIO promptly instead of hanging.
source "$HORN_REPO/tests/vm/lib.sh"
start_replicas 2 64M
add_device bad
size=$(blockdev --getsize64 "$DEV")
[ "$size" -eq $((64 << 20)) ] || { echo "device size $size"; exit 1; }
if dd if=/dev/zero of="$DEV" bs=4096 seek=$((size / 4096)) count=1 oflag=direct 2>dd.err; then
    echo "a write past the end succeeded"; exit 1
fi
cat dd.err
kill -9 "${REPLICA_PIDS[@]}"
start=$(date +%s)
if timeout 60 dd if=/dev/zero of="$DEV" bs=4096 count=1 oflag=direct 2>dd2.err; then
    echo "a write with every replica gone succeeded"; exit 1
fi
took=$(( $(date +%s) - start ))
cat dd2.err
grep -qi "input/output error" dd2.err || { echo "expected EIO"; exit 1; }
[ "$took" -lt 30 ] || { echo "took $took s"; exit 1; }
echo "failed with EIO in $took s"
del_device
