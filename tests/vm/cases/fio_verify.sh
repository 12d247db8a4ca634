# fio random writes with crc32c verification through the device on 3 replicas, the
# driver copying the data (--copy buffer); then the device is deleted, the same
# replicas served again by a new engine in the default mode (user copy where the
# driver offers it), and fio verifies every block it wrote.
source "$HORN_REPO/tests/vm/lib.sh"
start_replicas 3 256M
add_device fio --copy buffer
hornctl ublk list | grep -E "^$DEV_ID .* buffer "
# Each queue thread is pinned to the CPUs of its blk-mq queue (2 queues, 2 CPUs: one
# CPU each).
pid=$(hornctl ublk list | awk -v id="$DEV_ID" '$1 == id { print $7 }')
pinned=$(grep -h Cpus_allowed_list /proc/"$pid"/task/*/status | awk '$2 ~ /^[0-9]+$/' | sort -u | wc -l)
echo "engine threads pinned to $pinned distinct single CPUs"
[ "$pinned" -ge 2 ]
job=(--name=verify --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=32 --size=64M
    --verify=crc32c --verify_fatal=1)
fio "${job[@]}" --filename="$DEV" --do_verify=1 --output=fio.out
grep -E "err= *0" fio.out
del_device
add_device fio-again
if grep -q "offered=.*user-copy" ublk-fio-again.log; then
    hornctl ublk list | grep -E "^$DEV_ID .* user "
    grep "copy=\"\?user" ublk-fio-again.log
else
    echo "the driver offers no user copy: the default stays buffer"
    hornctl ublk list | grep -E "^$DEV_ID .* buffer "
fi
fio "${job[@]}" --filename="$DEV" --verify_only --output=fio2.out
grep -E "err= *0" fio2.out
# fio's own mix of sizes (4 KiB to 1 MiB) through the default mode, with verify.
fio --name=sizes --ioengine=io_uring --direct=1 --rw=randrw --bsrange=4k-1m --iodepth=16 \
    --size=32M --offset=160M --verify=crc32c --verify_fatal=1 --do_verify=1 --filename="$DEV" \
    --output=fio3.out
grep -E "err= *0" fio3.out
del_device
