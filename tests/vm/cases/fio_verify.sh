# fio random writes with crc32c verification through the device on 3 replicas; then
# the device is deleted, the same replicas served again by a new engine, and fio
# verifies every block it wrote.
source "$HORN_REPO/tests/vm/lib.sh"
start_replicas 3 256M
add_device fio
job=(--name=verify --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=32 --size=128M
    --verify=crc32c --verify_fatal=1)
fio "${job[@]}" --filename="$DEV" --do_verify=1 --output=fio.out
grep -E "err= *0" fio.out
hornctl ublk del "$DEV_ID"
sleep 1
add_device fio-again
fio "${job[@]}" --filename="$DEV" --verify_only --output=fio2.out
grep -E "err= *0" fio2.out
hornctl ublk del "$DEV_ID"
