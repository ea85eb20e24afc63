#!/usr/bin/env bash
# ensure-packages.sh [run|test] — install the Debian 12 packages rebuildd needs, if missing.
#   run:  build deps for libvirt-python (gcc, pkg-config, libvirt-dev, python3-dev), mkfs.ext4
#         and mkswap for ephemeral and swap disks (e2fsprogs, util-linux),
#         a working `python3 -m venv`, and qemu-img.
#   test: run + a local libvirtd with the QEMU driver (TCG/KVM), virsh, tini, genisoimage,
#         ssh-keygen (the real-client tests make a key pair), nfs-common (Cinder's NFS driver
#         wants mount.nfs present; the tests' share is a bind mount, never NFS), and the tools
#         scripts/tinyguest.sh builds the tiny test guest's boot disk with (syslinux, mtools,
#         dosfstools, fdisk).
# Idempotent: when everything is present this is a fast no-op (no apt-get update).
set -euo pipefail

mode="${1:-run}"
pkgs=(python3-dev gcc pkg-config libvirt-dev qemu-utils e2fsprogs util-linux)
case "$mode" in
  run) ;;
  test) pkgs+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 tini genisoimage openssh-client nfs-common syslinux syslinux-common mtools dosfstools fdisk) ;;
  *) echo "usage: $0 [run|test]" >&2; exit 2 ;;
esac
# python3 may be a non-Debian build (e.g. pyenv) that already has venv/ensurepip.
python3 -c 'import ensurepip, venv' 2>/dev/null || pkgs+=(python3-venv)

missing=()
for p in "${pkgs[@]}"; do
  [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "ensure-packages ($mode): all present"
  exit 0
fi

[[ $EUID -eq 0 ]] || { echo "ensure-packages: need root to install: ${missing[*]}" >&2; exit 1; }
echo "ensure-packages ($mode): installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
