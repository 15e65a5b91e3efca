#!/bin/sh
# Builds the edge-ota Debian package from a staging tree (no debhelper):
#   /opt/edge-ota              the agent in its own virtualenv, made by Debian's
#                              /usr/bin/python3 (the target's interpreter) with
#                              the pinned wheels of packaging/requirements.txt
#   /usr/bin/ota-agent, ota-bundle    symlinks into the virtualenv
#   /lib/systemd/system        the units of systemd/ (and udev rules, if any)
#   /usr/share/edge-ota        the boot scripts of hw/scripts
#   /usr/share/doc/edge-ota    README, docs/*.md, copyright, changelog
#   /usr/share/man/man1        ota-agent.1, ota-bundle.1 (packaging/manpage.py)
#   /etc/edge-ota/agent.toml   an example configuration (a conffile)
# usage: packaging/build-deb.sh OUTDIR       -> prints the path of the .deb
# PYTHON (default /usr/bin/python3) must be the Python of the target release.
# SOURCE_DATE_EPOCH defaults to the last commit's time, so a rebuild of one
# commit with the same wheels gives the same package.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
out=$(mkdir -p "$1" && cd "$1" && pwd)
python=${PYTHON:-/usr/bin/python3}
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$top/pyproject.toml")
debversion=$version-1
arch=$(dpkg --print-architecture)
: "${SOURCE_DATE_EPOCH:=$(git -C "$top" log -1 --format=%ct 2>/dev/null || date +%s)}"
export SOURCE_DATE_EPOCH
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pynext=$("$python" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')

stage=$out/edge-ota_${debversion}_$arch
rm -rf "$stage"
mkdir -p "$stage/DEBIAN"
venv=/opt/edge-ota

# The host's pip configuration (local indexes, caches) must not change what
# is shipped: only PyPI and the pins.
export PIP_CONFIG_FILE=/dev/null PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT || true
index=${EDGE_OTA_PIP_INDEX:-https://pypi.org/simple}

cd /  # nothing of the checkout on sys.path: pip must install edge-ota, not find it
unset PYTHONPATH PYTHONHOME PYTHONUSERBASE || true
"$python" -m venv "$stage$venv"
vpy=$stage$venv/bin/python
"$vpy" -I -m pip install -q --index-url "$index" --only-binary :all: --no-compile \
	-r "$here/requirements.txt"
rm -rf "$out/wheel" && mkdir -p "$out/wheel"
"$vpy" -I -m pip wheel -q --index-url "$index" --no-deps -w "$out/wheel" "$top"
"$vpy" -I -m pip install -q --no-deps --no-compile --no-index "$out/wheel"/edge_ota-*.whl
"$vpy" -I -m pip uninstall -q -y pip setuptools
rm -rf "$out/wheel"
for cmd in ota-agent ota-bundle; do
	[ -x "$stage$venv/bin/$cmd" ] || { echo "build-deb: $cmd was not installed into the virtualenv" >&2; exit 1; }
done

# The virtualenv was made in the staging tree: point it at its final path.
site=$stage$venv/lib/python$pyver/site-packages
rm -f "$stage$venv"/bin/activate* "$stage$venv"/bin/Activate.ps1 "$stage$venv"/bin/pip*
for f in "$stage$venv"/bin/*; do
	[ -f "$f" ] && [ ! -L "$f" ] || continue
	sed -i "1s|^#!$stage$venv/bin/|#!$venv/bin/|" "$f"
done
# pip records where a wheel came from (a build path): not part of the package.
for d in "$site"/*.dist-info; do
	if [ -f "$d/direct_url.json" ]; then
		rm "$d/direct_url.json"
		sed -i '/direct_url.json/d' "$d/RECORD"
	fi
done
sed -i "s|$stage$venv|$venv|" "$stage$venv/pyvenv.cfg"
# The console scripts' RECORD entries describe them as rewritten.
"$python" - "$site" <<'PY'
import base64, csv, hashlib, io, pathlib, sys
site = pathlib.Path(sys.argv[1])
for record in site.glob("*.dist-info/RECORD"):
    rows = list(csv.reader(io.StringIO(record.read_text())))
    for row in rows:
        target = (site / row[0]).resolve() if row and row[0].startswith("../../../bin/") else None
        if target is not None and target.is_file():
            data = target.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            row[1:3] = [f"sha256={digest}", str(len(data))]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    record.write_text(out.getvalue())
PY
# Man pages from the commands' own argparse parsers (packaging/manpage.py).
install -d "$stage/usr/share/man/man1"
for pair in agent.cli:ota-agent bundler.cli:ota-bundle; do
	page=$stage/usr/share/man/man1/${pair##*:}.1
	"$vpy" -I "$here/manpage.py" "${pair%%:*}" "${pair##*:}" > "$page"
	gzip -9n "$page"
done
find "$stage$venv" -name __pycache__ -prune -exec rm -rf {} +
if grep -rlI --exclude-dir=__pycache__ "$stage" "$stage$venv" >/dev/null; then
	echo "build-deb: the staging path is still named in:" >&2
	grep -rlI "$stage" "$stage$venv" >&2
	exit 1
fi

install -d "$stage/usr/bin"
for cmd in ota-agent ota-bundle; do ln -s "$venv/bin/$cmd" "$stage/usr/bin/$cmd"; done
sh "$here/install-data.sh" "$stage" /usr /usr/bin /etc /lib/systemd/system
install -m 0644 "$here/copyright" "$stage/usr/share/doc/edge-ota/copyright"
sed "s/@VERSION@/$debversion/; s/@DATE@/$(date -u -R -d "@$SOURCE_DATE_EPOCH")/" "$here/changelog.in" \
	| gzip -9n > "$stage/usr/share/doc/edge-ota/changelog.Debian.gz"
install -d "$stage/usr/share/lintian/overrides"
install -m 0644 "$here/lintian-overrides" "$stage/usr/share/lintian/overrides/edge-ota"

for s in postinst prerm postrm; do install -m 0755 "$here/$s" "$stage/DEBIAN/$s"; done
echo /etc/edge-ota/agent.toml > "$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$debversion/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
	-e "s/@PYVER@/$pyver/" -e "s/@PYNEXT@/$pynext/" "$here/control.in" > "$stage/DEBIAN/control"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' | LC_ALL=C sort \
	| xargs -d '\n' md5sum > DEBIAN/md5sums)
chmod 0644 "$stage/DEBIAN/md5sums" "$stage/DEBIAN/control" "$stage/DEBIAN/conffiles"
find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
find "$stage" -type d -exec chmod 0755 {} +
chmod 0700 "$stage/etc/edge-ota/keys"
deb=$out/edge-ota_${debversion}_$arch.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
rm -rf "$stage"
echo "$deb"
