# fstrim on the mounted filesystem gives the space back in the replicas' files.
source "$HORN_REPO/tests/vm/lib.sh"
start_replicas 2 256M
add_device trim
mkfs.ext4 -q -F -E nodiscard "$DEV"
mkdir mnt && mount "$DEV" mnt
head -c 96M /dev/urandom >mnt/big && sync
before=$(du -sk r1 | cut -f1)
rm mnt/big && sync
fstrim -v mnt
sync
after=$(du -sk r1 | cut -f1)
echo "replica 1 holds $before KiB before and $after KiB after fstrim"
[ $((before - after)) -gt $((80 * 1024)) ] || { echo "fstrim gave back too little"; exit 1; }
umount mnt
del_device
