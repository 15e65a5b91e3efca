#!/bin/sh
# Installs everything of edge-ota that is not Python code into a staging root:
# the systemd units (ExecStart pointing at BINDIR/ota-agent), udev rules (if
# any), the boot scripts, the docs and the example configuration. Used by
# `make install` (image builders) and by packaging/build-deb.sh.
# usage: install-data.sh DESTDIR PREFIX BINDIR SYSCONFDIR UNITDIR
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
destdir=$1 prefix=$2 bindir=$3 sysconfdir=$4 unitdir=$5
install -d "$destdir$unitdir" "$destdir$prefix/share/edge-ota" "$destdir$prefix/share/doc/edge-ota" \
	"$destdir$sysconfdir/edge-ota"
install -d -m 0700 "$destdir$sysconfdir/edge-ota/keys"
for unit in "$top"/systemd/*.service "$top"/systemd/*.timer "$top"/systemd/*.service.d/*.conf; do
	case $unit in *.conf) install -d "$destdir$unitdir/$(basename "$(dirname "$unit")")";
		name=$(basename "$(dirname "$unit")")/$(basename "$unit");; *) name=$(basename "$unit");; esac
	sed -e "s|/usr/bin/ota-agent|$bindir/ota-agent|g" -e "s|/etc/edge-ota/|$sysconfdir/edge-ota/|g" \
		-e "s|/usr/share/doc/edge-ota/|$prefix/share/doc/edge-ota/|g" "$unit" > "$destdir$unitdir/$name"
	chmod 0644 "$destdir$unitdir/$name"
done
if ls "$top"/systemd/*.rules >/dev/null 2>&1; then
	rules=$(dirname "$unitdir")/../udev/rules.d
	install -d "$destdir$rules"
	install -m 0644 "$top"/systemd/*.rules "$destdir$rules/"
fi
for f in grub.cfg boot.cmd boot.scr; do
	if [ -f "$top/hw/scripts/$f" ]; then install -m 0644 "$top/hw/scripts/$f" "$destdir$prefix/share/edge-ota/"; fi
done
install -m 0644 "$top/README.md" "$top"/docs/*.md "$destdir$prefix/share/doc/edge-ota/"
install -m 0644 "$top/packaging/agent.toml" "$destdir$sysconfdir/edge-ota/agent.toml"
