# A replica hosted in the engine's process (hornctl ublk add --host-replica) next to a
# replica process: fio writes with crc32c verification through the device (the hosted
# replica's file I/O on the queue rings, page cache and direct), the engine's verify
# finds the two replicas identical, and a new engine on the same two reads every
# block back.
source "$HORN_REPO/tests/vm/lib.sh"
for cache in page direct; do
    mkdir "$cache" && cd "$cache"
    start_replicas 1 256M
    host=(--host-replica "$PWD/here-$cache" --host-replica-size 256M --host-replica-control 127.0.0.1:0
        --host-replica-cache "$cache")
    add_device "hosted-$cache" "${host[@]}"
    grep "on 2 replicas" "ublk-hosted-$cache.log"
    job=(--name=verify --ioengine=io_uring --direct=1 --rw=randwrite --bsrange=4k-256k --iodepth=32
        --size=96M --verify=crc32c --verify_fatal=1 --filename="$DEV")
    fio "${job[@]}" --do_verify=1 --output="fio-$cache.out"
    grep -E "err= *0" "fio-$cache.out"
    control=$(sed -n 's/.*, control on \([0-9.:]*\).*/\1/p' "ublk-hosted-$cache.log" | head -1)
    hornctl engine --engine "$control" verify
    del_device
    add_device "hosted-$cache-again" "${host[@]}"
    fio "${job[@]}" --verify_only --output="fio-$cache-2.out"
    grep -E "err= *0" "fio-$cache-2.out"
    del_device
    cd ..
done
