# ext4 on a 3-replica volume: write files, unmount, delete the device; serve the same
# replicas again as a new device: every checksum matches and fsck is clean.
source "$HORN_REPO/tests/vm/lib.sh"
start_replicas 3 256M
add_device fs
mkfs.ext4 -q -F "$DEV"
mkdir mnt && mount "$DEV" mnt
head -c 48M /dev/urandom >mnt/big
for i in $(seq 1 200); do head -c $((RANDOM * 3 + 1)) /dev/urandom >"mnt/small-$i"; done
mkdir mnt/dir && cp mnt/small-1* mnt/dir/
(cd mnt && find . -type f -print0 | sort -z | xargs -0 sha256sum) >sums
sync
# A mounted device cannot be deleted.
if hornctl ublk del "$DEV_ID" 2>del.err; then echo "deleting a mounted device succeeded"; exit 1; fi
grep -q "in use" del.err || { echo "unexpected refusal: $(cat del.err)"; exit 1; }
umount mnt
del_device

add_device fs-again
fsck.ext4 -n -f "$DEV"
mount "$DEV" mnt
(cd mnt && sha256sum --quiet -c ../sums)
echo "all $(wc -l <sums) checksums match"
umount mnt
del_device
