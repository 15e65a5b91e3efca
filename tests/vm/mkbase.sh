#!/bin/sh
# Debian bookworm base root filesystem for the virtual device (and the .deb's
# chroot test), as a tarball: debootstrap minbase plus the kernel, systemd,
# python3 and the few tools the device needs. Cached by the hash of this file.
# usage: mkbase.sh CACHE_DIR   -> prints the path of the tarball
set -eu
cache=$1
mirror=${EDGE_OTA_VM_MIRROR:-http://deb.debian.org/debian}
packages=systemd,systemd-sysv,udev,dbus,linux-image-amd64,initramfs-tools,kmod,python3,e2fsprogs,grub-common,iproute2,procps,util-linux
key=$(cat "$0" | sha256sum | cut -c1-16)
out=$cache/base-$key.tar
if [ -s "$out" ]; then echo "$out"; exit 0; fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/base.XXXXXX")
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase --include=$packages bookworm "$work/root" "$mirror" >"$work/log" 2>&1 \
	|| { tail -20 "$work/log" >&2; exit 1; }
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar -C "$work/root" --numeric-owner -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "$out"
