#!/bin/sh
# Fetch the U-Boot build the QEMU boot-script tests run: Debian's u-boot-sunxi
# (armhf), board orangepi_plus, which QEMU's "-M orangepi-pc" machine boots.
# The .deb is downloaded with apt-get and only unpacked (dpkg-deb -x), never
# installed; apt runs with a private state directory and a private architecture
# list, so the machine's dpkg/apt configuration is not touched (no
# dpkg --add-architecture). The package's hash is checked by apt against the
# signed Debian index, as for any install.
#
# Result (printed on stdout):
#   ${XDG_CACHE_HOME:-~/.cache}/edge-ota/u-boot-sunxi/orangepi_plus/u-boot-sunxi-with-spl.bin
# Re-running is a no-op once that file exists.
set -eu

PKG=u-boot-sunxi
ARCH=armhf
BOARD=orangepi_plus
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/edge-ota"
DEST="$CACHE/$PKG"
OUT="$DEST/$BOARD/u-boot-sunxi-with-spl.bin"

if [ -s "$OUT" ]; then
    echo "$OUT"
    exit 0
fi

for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "fetch-test-firmware: $tool not found (Debian/Ubuntu only)" >&2; exit 1; }
done

APT="$CACHE/apt-$ARCH"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$DEST"
set -- -q \
    -o "APT::Architecture=$ARCH" -o "APT::Architectures::=$ARCH" \
    -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" \
    -o "Dir::State::Status=/dev/null" -o "Debug::NoLocking=1"

# Some mirrors fail one index now and then ("File has unexpected size ... Mirror
# sync in progress?"); what matters is whether the package can be found afterwards.
if ! apt-get "$@" update >"$APT/update.log" 2>&1; then
    echo "fetch-test-firmware: apt-get update reported errors (see $APT/update.log), trying anyway" >&2
fi

WORK=$(mktemp -d "$CACHE/fetch.XXXXXX")
trap 'rm -rf "$WORK"' EXIT INT TERM
(cd "$WORK" && apt-get "$@" download "$PKG:$ARCH" >"$APT/download.log" 2>&1) || {
    echo "fetch-test-firmware: apt-get download $PKG:$ARCH failed:" >&2
    cat "$APT/download.log" >&2
    exit 1
}
dpkg-deb -x "$WORK"/"$PKG"_*_"$ARCH".deb "$WORK/root"
SRC="$WORK/root/usr/lib/u-boot/$BOARD/u-boot-sunxi-with-spl.bin"
[ -s "$SRC" ] || { echo "fetch-test-firmware: $SRC missing from the package" >&2; exit 1; }
mkdir -p "$DEST/$BOARD"
dpkg-deb -f "$WORK"/"$PKG"_*_"$ARCH".deb Version >"$DEST/VERSION"
cp "$SRC" "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
rm -rf "$APT"  # the package indexes (~18 MB) are not needed any more
echo "$OUT"
