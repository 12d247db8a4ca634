# Helpers for the VM cases (sourced; the case runs in its own scratch directory).

# start_replicas N SIZE: N `hornd replica` daemons in ./rI; fills REPLICAS (hornctl
# --replica arguments) and REPLICA_PIDS.
start_replicas() {
    local n="$1" size="$2" i line addrs
    REPLICAS=(); REPLICA_PIDS=()
    for i in $(seq 1 "$n"); do
        hornd replica --dir "$PWD/r$i" --size "$size" --listen 127.0.0.1:0 --control 127.0.0.1:0 \
            >"r$i.log" 2>"r$i.err" &
        REPLICA_PIDS+=($!)
        for _ in $(seq 100); do grep -q serving "r$i.log" 2>/dev/null && break; sleep 0.1; done
        line=$(head -1 "r$i.log")
        [ -n "$line" ] || { echo "replica $i did not start"; cat "r$i.err"; return 1; }
        addrs=${line#* on }
        REPLICAS+=(--replica "${addrs%%, control on *},${addrs##*, control on }")
    done
}

# add_device NAME [ARG...]: serves the volume on REPLICAS as a ublk device (extra
# arguments go to `hornctl ublk add`); sets DEV and DEV_ID.
add_device() {
    local name="$1"; shift
    DEV=$(hornctl ublk add "${REPLICAS[@]}" --name "$name" --control 127.0.0.1:0 --queues 2 --depth 64 \
        --log-dir "$PWD" "$@")
    DEV_ID=${DEV#/dev/ublkb}
    for _ in $(seq 100); do [ -b "$DEV" ] && break; sleep 0.1; done
    [ -b "$DEV" ] || { echo "$DEV did not appear"; return 1; }
    echo "serving $name as $DEV"
}

# wait_gone PID...: waits until the processes have exited.
wait_gone() {
    local p
    for p in "$@"; do
        for _ in $(seq 200); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    done
}

# engine_pid ID: the pid of the engine serving ublk device ID (from `hornctl ublk list`).
engine_pid() {
    hornctl ublk list --json | python3 -c '
import json, sys
devices = json.load(sys.stdin)
devices = devices if isinstance(devices, list) else devices.get("devices", [])
print(next((d["pid"] for d in devices if d["id"] == int(sys.argv[1])), ""))' "$1"
}

# wait_written BYTES: waits until the device has completed BYTES of writes (its block
# statistics), so a fault comes while a run is under way, not after a guessed sleep.
wait_written() {
    local want=$(( $(numfmt --from=iec "$1") / 512 )) sectors=0
    for _ in $(seq 1200); do
        sectors=$(awk '{ print $7 }' "/sys/block/${DEV#/dev/}/stat" 2>/dev/null || echo 0)
        [ "${sectors:-0}" -ge "$want" ] && return 0
        sleep 0.1
    done
    echo "only $((sectors * 512)) bytes written to $DEV in 120 s (waited for $1)"
    return 1
}

# del_device: deletes DEV (within 60 s) and waits until its engine has exited and the
# device node is gone, so the next step finds the replicas released.
del_device() {
    local pid
    pid=$(engine_pid "$DEV_ID")
    timeout 60 hornctl ublk del "$DEV_ID"
    [ -n "$pid" ] && [ "$pid" -gt 0 ] && wait_gone "$pid"
    for _ in $(seq 100); do [ -b "$DEV" ] || break; sleep 0.1; done
    [ ! -b "$DEV" ] || { echo "$DEV still exists after del"; return 1; }
    ! { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; } || { echo "engine $pid still runs after del"; return 1; }
}
