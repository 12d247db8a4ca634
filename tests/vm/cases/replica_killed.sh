# kill -9 one of three replicas while fio writes with verification: no fio error.
source "$HORN_REPO/tests/vm/lib.sh"
start_replicas 3 256M
add_device kill
fio --name=verify --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=32 --size=64M --verify=crc32c --do_verify=1 --verify_fatal=1 --output=fio.out &
fio_pid=$!
wait_written 8M
kill -9 "${REPLICA_PIDS[1]}"
echo "killed replica 2 during the writes"
wait "$fio_pid"
grep -E "err= *0" fio.out
hornctl ublk list
del_device
