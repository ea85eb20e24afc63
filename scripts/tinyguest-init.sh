#!/bin/busybox sh
# /init of the tiny test guest (scripts/tinyguest.sh puts it in the initramfs). Every fact it
# sees is one line "TINYGUEST <WHAT> ... t=<uptime>" on ttyS0, for tests/test_real_guest.py:
# the image tag, the root disk's previous boot, the config drive, each volume, the ephemeral
# marker (read, then rewritten), READY, and POWEROFF when it powers off.
/bin/busybox --install -s /bin; export PATH=/bin
mkdir -p /proc /sys /dev /tmp /mnt/cfg /mnt/eph /etc/acpi/PWRF
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
say() { echo "TINYGUEST $* t=$(cut -d' ' -f1 /proc/uptime)" > /dev/ttyS0; }
BOOT=$(cat /proc/sys/kernel/random/uuid)
say "BOOTED tag=$(sed -n 's/.*tinyguest.tag=\([^ ]*\).*/\1/p' /proc/cmdline) boot=$BOOT"
modprobe -a virtio_pci virtio_blk ata_piix sr_mod isofs button evdev
# ACPI power button -> busybox acpid -> /etc/acpi/PWRF/00000080 -> poweroff -f (no teardown:
# everything is unmounted before READY)
printf '#!/bin/sh\necho "TINYGUEST POWEROFF by=acpi t=$(cut -d" " -f1 /proc/uptime)" >/dev/ttyS0\nsync\npoweroff -f\n' \
  > /etc/acpi/PWRF/00000080
chmod 755 /etc/acpi/PWRF/00000080; acpid -l /tmp/acpid.log && say "ACPID started"
for i in $(seq 30); do [ -b /dev/vda ] && [ -b /dev/sr0 ] && break; sleep 0.1; done  # async probes
# root disk: sector 1000 (the gap before the partition) holds the previous boot's id
P=$(dd if=/dev/vda bs=512 skip=1000 count=1 2>/dev/null | tr -dc 'a-f0-9-' | head -c 36)
say "ROOT previous=${P:-none}"
printf '%-512s' "$BOOT" | dd of=/dev/vda bs=512 seek=1000 count=1 conv=notrunc,fsync 2>/dev/null
SELF_OFF=
CFG=$(findfs LABEL=config-2 2>/dev/null) || CFG=
if [ -n "$CFG" ] && mount -t iso9660 -o ro "$CFG" /mnt/cfg; then
  L=/mnt/cfg/openstack/latest
  J=$(cat $L/meta_data.json)
  T=$(echo "$J" | sed 's/"keys": *\[[^]]*\]//')   # top level only: the keys list has names too
  v() { echo "$T" | grep -o "\"$1\": *\"[^\"]*\"" | head -1 | sed 's/.*: *"\(.*\)"/\1/'; }
  K=$(echo "$J" | grep -o '"public_keys": *{"[^"]*"' | sed 's/.*{"//; s/"$//')
  say "CONFIGDRIVE dev=${CFG#/dev/} uuid=$(v uuid) hostname=$(v hostname) name=$(v name) key=${K:-none}"
  for f in meta_data.json user_data network_data.json; do
    [ -f $L/$f ] && say "CONFIGFILE $f sha256=$(sha256sum < $L/$f | cut -c1-64)"
  done
  [ -f $L/user_data ] && grep -q '^tinyguest: poweroff$' $L/user_data && SELF_OFF=1
  umount /mnt/cfg
else say "CONFIGDRIVE none"; fi
EPH=$(findfs LABEL=ephemeral0 2>/dev/null) || EPH=
for d in /sys/block/vd*; do n=${d##*/}; { [ "$n" = vda ] || [ "/dev/$n" = "$EPH" ]; } && continue
  say "VOLUME $n serial=$(cat $d/serial 2>/dev/null) head=$(head -c 64 /dev/$n | tr -c 'A-Za-z0-9._:=/+-' '.')"
done
if [ -n "$EPH" ] && mount -t ext4 "$EPH" /mnt/eph; then
  say "EPHEMERAL dev=${EPH#/dev/} previous=$(cat /mnt/eph/tinyguest.marker 2>/dev/null || echo none)"
  echo "$BOOT" > /mnt/eph/tinyguest.marker; umount /mnt/eph
else say "EPHEMERAL none"; fi
sync
say READY
if [ -n "$SELF_OFF" ]; then say "POWEROFF by=user_data"; poweroff -f; fi
while :; do sleep 3600; done
