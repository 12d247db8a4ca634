# kill -9 an unsupervised engine (--no-supervise) during a verified fio write run,
# then `hornctl ublk recover` by hand: the device never disappears, and fio finishes
# with no I/O error and no verify failure (the driver issues the commands the dead
# engine had in flight again to the new one).
source "$HORN_REPO/tests/vm/lib.sh"
start_replicas 3 256M
add_device upgrade --no-supervise
fio --name=verify --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=32 --size=48M --verify=crc32c --do_verify=1 --verify_fatal=1 --output=fio.out &
fio_pid=$!
wait_written 8M
engine=$(engine_pid "$DEV_ID")
[ -n "$engine" ] && [ "$engine" -gt 0 ] || { echo "no engine pid in: $(hornctl ublk list --json)"; exit 1; }
kill -9 "$engine"
wait_gone "$engine"
echo "engine $engine killed during the writes"
[ -b "$DEV" ] || { echo "$DEV disappeared with its engine"; exit 1; }
hornctl ublk list
hornctl ublk recover "$DEV_ID" "${REPLICAS[@]}" --name upgrade --control 127.0.0.1:0 --log-dir "$PWD"
wait "$fio_pid"
grep -E "err= *0" fio.out
[ -b "$DEV" ]
hornctl ublk list
del_device
