"""Fuzz the OCI readers: the first byte picks one. 0: the bytes are an
uncompressed layer tar applied by `bundler.oci.apply.Stager` into a fresh
scratch root (unprivileged): whatever the entries, nothing is created outside
the root (a canary beside it stays as it was). 1: a JSON image index given to
`bundler.oci.source.choose_manifest`. 2: an `oci://` reference parsed by the
agent (`agent.oci.parse_ref`). Anything but their documented OtaError is a
finding."""

from __future__ import annotations

import io
import json
import os
import shutil

from agent.oci import parse_ref
from bundler.oci.apply import Stager
from bundler.oci.blobs import sha256_digest
from bundler.oci.source import Layer, choose_manifest
from tests.fuzz._harness import main, scratch_dir

TAR = "application/vnd.oci.image.layer.v1.tar"


def one_input(data: bytes) -> None:
    mode, body = (data[0] % 3, data[1:]) if data else (0, b"")
    if mode == 0:
        base = scratch_dir() / "oci"
        base.mkdir(exist_ok=True)
        root = base / "root"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        canary = base / "canary"
        if not canary.exists():
            canary.mkdir()
            (canary / "file").write_bytes(b"canary")
        layer = Layer(None, None, TAR, sha256_digest(body), lambda: io.BytesIO(body))
        try:
            Stager(root, 0, privileged=False).apply(layer)
        finally:
            assert sorted(os.listdir(base)) == ["canary", "root"], os.listdir(base)
            assert os.listdir(canary) == ["file"]
            assert (canary / "file").read_bytes() == b"canary"
    elif mode == 1:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            return
        if isinstance(doc, dict):
            choose_manifest(doc, "index", "v1" if len(body) % 2 else None, ("linux", "amd64"))
    else:
        parse_ref(body.decode("utf-8", "replace"))


if __name__ == "__main__":
    main(one_input)
