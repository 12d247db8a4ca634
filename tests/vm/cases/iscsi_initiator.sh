# The Linux kernel initiator (open-iscsi's iscsid and iscsiadm, iscsi_tcp) logs in to
# Horn's iSCSI target on 3 replicas with mutual CHAP: the LUN appears as /dev/sdX;
# mkfs.ext4, mount, write, unmount, log out, log in again: every checksum matches. A
# wrong secret is refused.
source "$HORN_REPO/tests/vm/lib.sh"
start_replicas 3 256M
iqn=iqn.2026-11.io.horn:vm-iscsi
printf 'initiator-secret-1\n' >secret
printf 'target-secret-22\n' >mutual
hornd engine "${REPLICAS[@]}" --control 127.0.0.1:0 --name vm-iscsi --frontend iscsi \
    --listen 127.0.0.1:3260 --chap-user alice --chap-secret-file secret \
    --mutual-user horn --mutual-secret-file mutual >iscsi.log 2>&1 &
for _ in $(seq 100); do grep -q "serving iSCSI" iscsi.log && break; sleep 0.1; done
grep "serving iSCSI" iscsi.log

modprobe iscsi_tcp
# iscsiadm keeps its node records under /etc/iscsi, read-only here: a writable copy.
mkdir -p etc-iscsi /run/lock/iscsi
cp -a /etc/iscsi/. etc-iscsi/
mount --bind "$PWD/etc-iscsi" /etc/iscsi
cleanup() { # (errexit applies in traps too: nothing here may fail the case)
    iscsiadm -m node --logoutall=all >/dev/null 2>&1 || true
    pkill -x iscsid || true
    sleep 0.5
    umount -l /etc/iscsi 2>/dev/null || true
}
trap cleanup EXIT
echo "InitiatorName=iqn.2026-11.io.horn:vm-initiator" >/etc/iscsi/initiatorname.iscsi
iscsid
sleep 1

iscsiadm -m discovery -t sendtargets -p 127.0.0.1:3260 | tee discovered
grep -q "$iqn" discovered
node=(-m node -T "$iqn" -p 127.0.0.1:3260)
set_auth() { # PASSWORD
    iscsiadm "${node[@]}" -o update -n node.session.auth.authmethod -v CHAP
    iscsiadm "${node[@]}" -o update -n node.session.auth.username -v alice
    iscsiadm "${node[@]}" -o update -n node.session.auth.password -v "$1"
    iscsiadm "${node[@]}" -o update -n node.session.auth.username_in -v horn
    iscsiadm "${node[@]}" -o update -n node.session.auth.password_in -v target-secret-22
}
disk() {
    local d=""
    for _ in $(seq 100); do
        d=$(iscsiadm -m session -P 3 | awk '/Attached scsi disk/ { print $4 }')
        [ -n "$d" ] && [ -b "/dev/$d" ] && break
        sleep 0.1
    done
    echo "/dev/$d"
}

set_auth wrong-secret-123
if iscsiadm "${node[@]}" --login 2>login.err; then echo "a wrong CHAP secret logged in"; exit 1; fi
cat login.err
set_auth initiator-secret-1
iscsiadm "${node[@]}" --login
DEV=$(disk)
echo "the LUN is $DEV ($(cat /sys/block/${DEV#/dev/}/size) sectors)"
mkfs.ext4 -q -F "$DEV"
mkdir mnt && mount "$DEV" mnt
head -c 32M /dev/urandom >mnt/big
for i in $(seq 1 100); do head -c $((RANDOM * 3 + 1)) /dev/urandom >"mnt/small-$i"; done
(cd mnt && find . -type f -print0 | sort -z | xargs -0 sha256sum) >sums
umount mnt
iscsiadm "${node[@]}" --logout
sleep 1
iscsiadm "${node[@]}" --login
DEV=$(disk)
fsck.ext4 -n -f "$DEV"
mount "$DEV" mnt
(cd mnt && sha256sum --quiet -c ../sums)
echo "all $(wc -l <sums) checksums match after logging in again"
umount mnt
iscsiadm "${node[@]}" --logout
