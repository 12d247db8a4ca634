# The manager with the ublk frontend: `hornd all-in-one`, a volume of three replicas
# attached to the VM's node as /dev/ublkbN, ext4 on it; a detach is refused while it
# is mounted; after umount it detaches, attaches again and every checksum matches;
# detach and delete leave no instance and no replica file.
source "$HORN_REPO/tests/vm/lib.sh"
hornd all-in-one --data "$PWD/aio" --listen 127.0.0.1:9400 --name vm >aio.log 2>&1 &
AIO=$!
# On the way out, the manager stops; on a failure, its log and each instance's say why.
trap 'failed_at="line $LINENO: $BASH_COMMAND"' ERR
finish() {
    local status=$?
    set +x
    kill $AIO 2>/dev/null || true
    if [ "$status" -ne 0 ]; then
        echo "failed at $failed_at"
        tail -40 aio.log
        for f in aio/node/instances/*/*.log; do echo "== $f"; tail -8 "$f"; done
    fi
}
trap finish EXIT
export HORN_MANAGER=127.0.0.1:9400 HORN_TOKEN_FILE="$PWD/aio/cluster-token"
for _ in $(seq 100); do hornctl node list --json 2>/dev/null | grep -q '"state":"ready"' && break; sleep 0.2; done
hornctl node list
hornctl volume create fs --size 256M --replicas 3 --frontend ublk
hornctl volume attach fs vm
dev=$(hornctl volume info fs --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["endpoint"])')
case "$dev" in /dev/ublkb*) ;; *) echo "endpoint $dev"; exit 1;; esac
[ -b "$dev" ] || { echo "$dev is not a block device"; exit 1; }
mkfs.ext4 -q -F "$dev"
mkdir mnt && mount "$dev" mnt
head -c 32M /dev/urandom >mnt/big
for i in $(seq 1 50); do head -c $((RANDOM * 3 + 1)) /dev/urandom >"mnt/small-$i"; done
(cd mnt && find . -type f -print0 | sort -z | xargs -0 sha256sum) >sums
sync
# Mounted: the detach is refused and nothing changes.
if hornctl volume detach fs 2>detach.err; then echo "detaching a mounted volume succeeded"; exit 1; fi
grep -q "in use" detach.err || { echo "unexpected refusal: $(cat detach.err)"; exit 1; }
hornctl volume info fs --json | grep -q '"state":"attached"' || { echo "the refused detach changed the volume"; exit 1; }
umount mnt
hornctl volume detach fs
for _ in $(seq 100); do [ -b "$dev" ] || break; sleep 0.1; done
[ ! -b "$dev" ] || { echo "$dev still exists after the detach"; exit 1; }

hornctl volume attach fs vm
dev=$(hornctl volume info fs --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["endpoint"])')
fsck.ext4 -n -f "$dev"
mount "$dev" mnt
(cd mnt && sha256sum --quiet -c ../sums)
echo "all $(wc -l <sums) checksums match after detach and attach"
hornctl volume verify fs
umount mnt
hornctl volume detach fs
hornctl volume delete fs
for _ in $(seq 100); do [ -z "$(ls aio/node/instances)" ] && break; sleep 0.1; done
[ -z "$(ls aio/node/instances)" ] || { echo "instances left: $(ls aio/node/instances)"; exit 1; }
[ -z "$(ls aio/disk/replicas 2>/dev/null)" ] || { echo "replica files left: $(ls aio/disk/replicas)"; exit 1; }
echo "detached and deleted: no instance, no replica file left"
