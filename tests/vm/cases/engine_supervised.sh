# kill -9 the engine of a device `hornctl ublk add` started (supervised, the default)
# during a verified fio write run: with no command typed, `hornd supervise` starts the
# engine again, it reattaches to the device, and fio finishes with no I/O error and no
# verify failure. Then `hornctl ublk del` ends engine and supervisor both.
source "$HORN_REPO/tests/vm/lib.sh"
start_replicas 3 256M
add_device supervised
first=$(engine_pid "$DEV_ID")
supervisor=$(pgrep -f "hornd --log-file $PWD/ublk-supervised.log supervise")
[ -n "$supervisor" ] || { echo "no supervisor runs"; ps -ef | grep hornd; exit 1; }
fio --name=verify --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=32 --size=48M --verify=crc32c --do_verify=1 --verify_fatal=1 --output=fio.out &
fio_pid=$!
wait_written 8M
kill -9 "$first"
echo "engine $first killed during the writes"
now=""
for _ in $(seq 600); do
    now=$(engine_pid "$DEV_ID")
    [ -n "$now" ] && [ "$now" != "$first" ] && kill -0 "$now" 2>/dev/null && break
    sleep 0.1
done
[ -n "$now" ] && [ "$now" != "$first" ] || { echo "no new engine came"; tail -30 ublk-supervised.log; exit 1; }
echo "engine $now serves $DEV now, started by the supervisor"
grep "reattaching" ublk-supervised.log
grep "hornd supervise: pid $first ended" ublk-supervised.log
wait "$fio_pid"
grep -E "err= *0" fio.out
del_device
wait_gone "$supervisor"
! kill -0 "$supervisor" 2>/dev/null || { echo "the supervisor outlived the device"; exit 1; }
grep "exited cleanly" ublk-supervised.log
