#!/bin/sh
# tinyguest.sh [CACHE_DIR] -- the tiny real test guest (tests/test_real_guest.py), built from
# Debian packages and cached: prints the directory holding tinyguest-A.raw and tinyguest-B.raw,
# two 40 MiB BIOS-bootable raw disks (MBR + FAT16 + syslinux + Debian's cloud kernel + a
# busybox initramfs whose /init is tinyguest-init.sh) that differ only in their tag (A, B) on
# the kernel command line. The kernel and busybox-static are fetched with `apt-get download`
# and unpacked with `dpkg-deb -x`: never installed on the host. No loop device, no mount.
# The images are cached under a key made of the package versions and of these two scripts;
# a second run with the same key only prints the directory. Host tools (make test installs
# them, scripts/ensure-packages.sh): syslinux syslinux-common mtools dosfstools fdisk.
set -eu
HERE=$(dirname "$(realpath "$0")")
INIT=$HERE/tinyguest-init.sh
CACHE=${1:-${TINYGUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rebuildd/tinyguest}}
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"; flock 9   # two builds sharing the cache would race

kernel_pkg() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-.*\)/\1/p' | head -1
}
KPKG=$(kernel_pkg)
if [ -z "$KPKG" ] && [ "$(id -u)" = 0 ]; then apt-get update -qq >&2; KPKG=$(kernel_pkg); fi  # fresh machine
[ -n "$KPKG" ] || { echo "tinyguest: no linux-image-cloud-amd64 in apt's lists (apt-get update?)" >&2; exit 1; }
version() { apt-cache show --no-all-versions "$1" | sed -n 's/^Version: //p' | head -1; }
PKGS="$KPKG=$(version "$KPKG") busybox-static=$(version busybox-static)"
KEY=$(printf '%s\n' "$PKGS" | cat - "$INIT" "$0" | sha256sum | cut -c1-16)
OUT=$CACHE/images-$KEY
if [ -f "$OUT/.done" ]; then echo "$OUT"; exit 0; fi

W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
X=$CACHE/unpacked-$(printf '%s' "$PKGS" | sha256sum | cut -c1-16)
if [ ! -f "$X/.done" ]; then   # Debian's kernel and busybox, unpacked (never installed)
  rm -rf "$X"; mkdir -p "$W/debs"
  # shellcheck disable=SC2086
  (cd "$W/debs" && apt-get download -qq -o APT::Sandbox::User=root $PKGS >&2)
  for d in "$W"/debs/*.deb; do dpkg-deb -x "$d" "$X"; done
  "$X/bin/busybox" depmod -b "$X" "$(ls "$X/lib/modules")"
  touch "$X/.done"
fi
BB=$X/bin/busybox; K=$(ls "$X/lib/modules"); M=lib/modules/$K; R=$W/root
mkdir -p "$R/bin" "$R/$M" && cp "$BB" "$R/bin/" && cp "$X/$M/modules.builtin" "$R/$M/"
cp "$INIT" "$R/init" && chmod 755 "$R/init"
for m in virtio_pci virtio_blk ata_piix sr_mod isofs button evdev; do  # with their dependencies
  for f in $(grep "/$m.ko:" "$X/$M/modules.dep" | tr -d :); do
    mkdir -p "$R/$M/${f%/*}" && cp "$X/$M/$f" "$R/$M/$f"; done; done
"$BB" depmod -b "$R" "$K"
(cd "$R" && find . | "$BB" cpio -o -H newc -R 0:0 2>/dev/null | gzip -1) > "$W/initrd.gz"
cp "$X/boot/vmlinuz-$K" "$W/vmlinuz"
syslinux_cfg() {
  printf 'DEFAULT l\nPROMPT 0\nTIMEOUT 0\nLABEL l\n KERNEL vmlinuz\n INITRD initrd.gz\n APPEND %s\n' \
    "console=ttyS0 quiet tinyguest.tag=$1"
}
A=$W/tinyguest-A.raw
truncate -s 40M "$A"                                  # 1 MiB gap + 39 MiB FAT16 partition
echo 'start=2048, type=6, bootable' | sfdisk -q "$A"
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$A" conv=notrunc status=none
mkfs.fat -F 16 -n TINYBOOT -h 2048 --offset 2048 "$A" $((39 * 1024)) >/dev/null
syslinux_cfg A > "$W/syslinux.cfg"
mcopy -i "$A@@1M" "$W/vmlinuz" "$W/initrd.gz" "$W/syslinux.cfg" ::/
syslinux --install --offset $((2048 * 512)) "$A"
cp --sparse=always "$A" "$W/tinyguest-B.raw"
syslinux_cfg B | mcopy -o -i "$W/tinyguest-B.raw@@1M" - ::/syslinux.cfg
rm -rf "$OUT"; mkdir -p "$OUT"
mv "$A" "$W/tinyguest-B.raw" "$OUT/"
printf '%s\n' "$PKGS" > "$OUT/packages"
touch "$OUT/.done"
echo "$OUT"
