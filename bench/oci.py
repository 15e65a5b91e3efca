"""Container images into OS images, and bundles from a registry.

1. A Debian root filesystem as a `docker save` archive: a base layer of this
   machine's /usr (bin, sbin, lib, share; sorted walk until --size-mib of file
   data) plus an upper layer changing /etc, adding files, deleting some with
   whiteouts (a Containerfile's RUN step).
2. `ota-bundle image --from-oci docker-archive:...` into ext4 (and erofs),
   against what a script would do with the same input: extract the archive,
   extract each layer with `tar -xpf` into one tree (whiteouts applied by hand
   with `find -name '.wh.*'`), then `mkfs.ext4 -d`. Wall time and peak RSS of
   each (the largest of the steps for the script).
3. With docker-registry installed: `ota-bundle push` of a bundle of that image
   to a registry on a loopback port, and the bytes the agent fetches for the
   update through `oci+http://` (manifest, token answers and the blob), as a
   full pull and as an adaptive download (`[download] adaptive = true`) by a
   simulated device running the image of the base layer alone: it fetches by
   Range only the chunks it cannot assemble from its slots (the bundle as
   pushed, and one built with `--adaptive-base` that image).

Peak RSS is `ru_maxrss` of the command and the children it waited for, from
`os.wait4`. Prints a table; not a pass/fail test.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.install_vs_dd import scratch_dir

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("usr/bin", "usr/sbin", "usr/lib", "usr/share")


def measure(argv: list[str], **kw: object) -> tuple[float, int]:
    """(seconds, peak RSS in KiB) of one command and the children it waited for."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {err.strip()[-500:]}")
    return time.monotonic() - start, usage.ru_maxrss


def base_layer(out: Path, budget: int) -> tuple[int, int]:
    """A layer tar of this machine's /etc and /usr (bin, sbin, lib, share), each
    of the four /usr trees walked in order until a quarter of `budget` bytes."""
    files = total = 0
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for top in ("etc", *SOURCES):
            share = 0
            for dirpath, dirs, names in os.walk("/" + top):
                dirs.sort()
                rel = os.path.relpath(dirpath, "/")
                tar.add(dirpath, rel, recursive=False)
                for name in sorted(names):
                    path = os.path.join(dirpath, name)
                    try:
                        st = os.lstat(path)
                        tar.add(path, os.path.join(rel, name), recursive=False)
                    except OSError:
                        continue
                    files += 1
                    size = 0 if os.path.islink(path) else st.st_size
                    total += size
                    share += size
                    if top != "etc" and share >= budget // len(SOURCES):
                        break
                if top != "etc" and share >= budget // len(SOURCES):
                    break
    return files, total


def upper_layer(out: Path, base: Path) -> None:
    """A RUN step: /etc changed, a few files added, some of the base deleted (whiteouts)."""
    with tarfile.open(base) as tar:
        victims = [m.name for m in tar if m.isreg() and m.name.startswith("usr/share/")][:50]
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc/hostname", b"edge-device\n"), ("etc/motd", b"built by a Containerfile\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        for i in range(100):
            data = hashlib.sha256(b"%d" % i).digest() * 256
            info = tarfile.TarInfo(f"opt/app/file{i:03d}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        for victim in victims:
            d, _, base_name = victim.rpartition("/")
            tar.addfile(tarfile.TarInfo(f"{d}/.wh.{base_name}"))


def docker_archive(out: Path, layers: list[Path]) -> None:
    diff_ids = []
    for layer in layers:
        h = hashlib.sha256()
        with layer.open("rb") as f:
            while chunk := f.read(MIB):
                h.update(chunk)
        diff_ids.append("sha256:" + h.hexdigest())
    config = json.dumps(
        {"created": "2024-05-01T12:00:00Z", "architecture": "amd64", "os": "linux",
         "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    names = [f"{d.split(':')[1]}/layer.tar" for d in diff_ids]
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["localhost/os:bench"], "Layers": names}]).encode()
    with tarfile.open(out, "w") as tar:
        for name, data in (("manifest.json", manifest), (config_name, config)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, layer in zip(names, layers, strict=True):
            tar.add(layer, name)


SCRIPT = """set -e
mkdir -p "$1/x" "$1/tree"
tar -C "$1/x" -xf "$2"
layers=$(python3 -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))[0]["Layers"]))' "$1/x/manifest.json")
for layer in $layers; do
  tar -C "$1/tree" --numeric-owner --xattrs -xpf "$1/x/$layer"
  find "$1/tree" -name '.wh.*' | while read -r w; do rm -rf "$(dirname "$w")/$(basename "$w" | cut -c5-)" "$w"; done
done
"""


def ota(*args: str) -> list[str]:
    return [sys.executable, "-m", "bundler.cli", *args]


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def adaptive_pull(work: Path, v1: Path, url: str) -> tuple[int, float]:
    """Bytes a simulated device booted from `v1` fetches installing `url` with
    `[download] adaptive = true` (the install result's `downloaded`), and seconds."""
    device = work / "device"
    shutil.rmtree(device, ignore_errors=True)
    agent = [sys.executable, "-m", "agent.cli"]
    slot = -(-max(v1.stat().st_size, (work / "os.ext4").stat().st_size) // MIB) * MIB
    subprocess.run([*agent, "sim", "init", str(device), "--image", str(v1), "--keyring",
                    str(work / "keys/signing.pub"), "--compatible", "bench", "--slot-size", str(slot)],
                   check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    config = device / "agent.toml"
    config.write_text(config.read_text() + "\n[download]\nadaptive = true\n")
    start = time.monotonic()
    subprocess.run([*agent, "-c", str(config), "install", url], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, cwd=ROOT)
    took = time.monotonic() - start
    status = subprocess.run([*agent, "-c", str(config), "status", "--json"], check=True, capture_output=True,
                            text=True, cwd=ROOT)
    last = json.loads(status.stdout)["last_result"]
    if last["result"] != "ok":
        raise SystemExit(f"adaptive install failed: {last}")
    shutil.rmtree(device, ignore_errors=True)
    return int(last["downloaded"]), took


def registry_bytes(work: Path, archive: Path, base_archive: Path) -> list[tuple[str, ...]]:
    if shutil.which("docker-registry") is None:
        return [("registry", "skipped: docker-registry not installed", "", "")]
    sys.path.insert(0, str(ROOT))
    from agent.oci import OciSource  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (work / "reg.yml").write_text(
        f"version: 0.1\nstorage: {{filesystem: {{rootdirectory: {work / 'reg'}}}}}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    reg = subprocess.Popen(["docker-registry", "serve", str(work / "reg.yml")], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.02)
        subprocess.run(ota("keygen", str(work / "keys")), check=True, stdout=subprocess.DEVNULL)
        image = work / "os.ext4"
        bundle = work / "os.otab"
        subprocess.run(ota("create", "--image", str(image), "--key", str(work / "keys/signing.key"), "--version", "2",
                           "--security-version", "1", "--compatible", "bench", "--level", "3", "-o", str(bundle)),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t_push, rss_push = measure(ota("push", str(bundle), f"docker://127.0.0.1:{port}/os:2", "--insecure-registry"),
                                   cwd=ROOT)
        source = OciSource(f"oci+http://127.0.0.1:{port}/os:2")
        start = time.monotonic()
        with source.open() as stream:
            got = 0
            while data := stream.read(MIB):
                got += len(data)
        t_pull = time.monotonic() - start
        # The update as a device sees it: it runs the image of the base layer alone (v1), the
        # registry holds the bundle of base + upper layer (v2), pushed as is and with its
        # chunks cut to v1 (ota-bundle create --adaptive-base).
        v1 = work / "v1.ext4"
        size = str((work / "os.ext4").stat().st_size)
        subprocess.run(ota("image", "--from-oci", f"docker-archive:{base_archive}", "--fs", "ext4", "--size", size,
                           "-o", str(v1), "--force"), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       cwd=ROOT)
        cut = work / "os-cut.otab"
        subprocess.run(ota("create", "--image", str(image), "--key", str(work / "keys/signing.key"), "--version", "2",
                           "--security-version", "1", "--compatible", "bench", "--level", "3",
                           "--adaptive-base", str(v1), "-o", str(cut)),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        subprocess.run(ota("push", str(cut), f"docker://127.0.0.1:{port}/os:2-cut", "--insecure-registry"),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        plain, t_plain = adaptive_pull(work, v1, f"oci+http://127.0.0.1:{port}/os:2")
        cut_got, t_cut = adaptive_pull(work, v1, f"oci+http://127.0.0.1:{port}/os:2-cut")
        return [
            ("push bundle", f"{bundle.stat().st_size / MIB:.1f} MiB", f"{t_push:.2f} s", f"{rss_push / 1024:.0f} MiB"),
            ("device: full pull (oci+http)", f"{got / MIB:.1f} MiB fetched", f"{t_pull:.2f} s", "-"),
            ("device on the base-layer image: adaptive download",
             f"{plain / MIB:.1f} MiB fetched ({plain / got:.2f}x the full pull)", f"{t_plain:.2f} s (install)", "-"),
            ("  same, bundle built with --adaptive-base",
             f"{cut_got / MIB:.1f} MiB fetched ({cut_got / got:.2f}x; bundle {cut.stat().st_size / MIB:.1f} MiB)",
             f"{t_cut:.2f} s (install)", "-"),
        ]
    finally:
        reg.terminate()
        reg.wait(10)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--size-mib", type=int, default=300, help="file data in the base layer (default 300)")
    ap.add_argument("--workdir", default="/var/tmp", help="parent of the scratch directory")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args(argv)
    work = scratch_dir(args.workdir, "bench-oci-")
    try:
        base, upper = work / "base.tar", work / "upper.tar"
        files, data = base_layer(base, args.size_mib * MIB)
        upper_layer(upper, base)
        archive = work / "os-docker.tar"
        docker_archive(archive, [base, upper])
        print(f"input: docker archive of {files} entries, {data / MIB:.0f} MiB of file data "
              f"({archive.stat().st_size / MIB:.0f} MiB), 2 layers, 50 whiteouts; root: {os.geteuid() == 0}")
        rows: list[tuple[str, ...]] = [("step", "result", "time", "peak RSS")]
        for fs in ("ext4", "erofs"):
            if shutil.which({"ext4": "mkfs.ext4", "erofs": "mkfs.erofs"}[fs]) is None:
                continue
            out = work / f"os.{fs}"
            t, rss = measure(ota("image", "--from-oci", f"docker-archive:{archive}", "--fs", fs, "-o", str(out),
                                 "--force"), cwd=ROOT)
            rows.append((f"ota-bundle image --fs {fs}", f"{out.stat().st_size / MIB:.0f} MiB image", f"{t:.2f} s",
                         f"{rss / 1024:.0f} MiB"))
        scratch = work / "script"
        scratch.mkdir()
        t1, rss1 = measure(["sh", "-c", SCRIPT, "sh", str(scratch), str(archive)])
        size = (work / "os.ext4").stat().st_size
        plain = work / "plain.ext4"
        t2, rss2 = measure(["mkfs.ext4", "-q", "-F", "-d", str(scratch / "tree"), str(plain), f"{size // 1024}k"])
        rows.append(("tar -x (archive, layers, whiteouts)", "tree", f"{t1:.2f} s", f"{rss1 / 1024:.0f} MiB"))
        rows.append(("  + mkfs.ext4 -d (same size)", f"{plain.stat().st_size / MIB:.0f} MiB image", f"{t2:.2f} s",
                     f"{rss2 / 1024:.0f} MiB"))
        rows.append(("  = script total", "not reproducible", f"{t1 + t2:.2f} s", f"{max(rss1, rss2) / 1024:.0f} MiB"))
        base_archive = work / "base-docker.tar"
        docker_archive(base_archive, [base])
        rows += registry_bytes(work, archive, base_archive)
        table(rows)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
