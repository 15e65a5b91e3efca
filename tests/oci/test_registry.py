"""Registries for real: Debian's docker-registry on a loopback port, plain, with
TLS and with basic auth. Images pushed there (by our client and by `skopeo
copy`) are pulled by `ota-bundle image --from-oci docker://...` and give the
same bytes as from the layout; `ota-bundle push` stores a bundle as an OCI
artifact whose annotations carry the signed manifest's fields."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bundler.cli import main
from bundler.oci.errors import DigestMismatch, RegistryError
from bundler.oci.image import build_image
from bundler.oci.registry import Registry, RegistryOptions
from tests.oci._images import E, write_layout
from tests.oci._registry import PASSWORD, USER, running_registry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: owners are kept")

LAYERS = [
    [E("etc", "dir", mode=0o755), E("etc/os-release", data=b"ID=edge\n"), E("usr", "dir", mode=0o755)],
    [E("usr/app", data=b"v2" * 1000, mode=0o755), E("etc/.wh.os-release")],
]


def push_layout(reg: Registry, repo: str, layout: Path, tag: str) -> None:
    """Our client's push: every blob of the layout, then the manifest."""
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    blobs = layout / "blobs" / "sha256"
    manifest = (blobs / desc["digest"].split(":")[1]).read_bytes()
    doc = json.loads(manifest)
    for d in [doc["config"], *doc["layers"]]:
        data = (blobs / d["digest"].split(":")[1]).read_bytes()
        reg.push_blob(repo, d["digest"], len(data), data)
    reg.push_manifest(repo, tag, manifest, doc["mediaType"])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_image_pulled_from_a_plain_registry_gives_the_same_bytes_as_its_layout(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "layout", LAYERS)
    with running_registry(tmp_path / "reg") as r:
        opts = RegistryOptions(insecure=True)
        push_layout(Registry(r.host, opts), "edge/os", layout, "2")
        build_image(f"docker://{r.host}/edge/os:2", tmp_path / "pulled.ext4", registry=opts)
        _, _, digest = Registry(r.host, opts).get_manifest("edge/os", "2")
        build_image(f"docker://{r.host}/edge/os@{digest}", tmp_path / "pinned.ext4", registry=opts)
    build_image(f"oci:{layout}:1", tmp_path / "local.ext4")
    assert _digest(tmp_path / "pulled.ext4") == _digest(tmp_path / "local.ext4")
    assert _digest(tmp_path / "pinned.ext4") == _digest(tmp_path / "local.ext4")


def test_tls_and_basic_auth_registry_needs_the_ca_and_the_credentials(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "layout", LAYERS)
    with running_registry(tmp_path / "reg", tls=True, auth=True) as r:
        assert r.tls is not None
        good = RegistryOptions(USER, PASSWORD, ca_file=r.tls.ca)
        push_layout(Registry(r.host, good), "edge/os", layout, "2")
        ref = f"docker://{r.host}/edge/os:2"
        build_image(ref, tmp_path / "ok.ext4", registry=good)
        with pytest.raises(RegistryError, match="refused the credentials"):
            build_image(ref, tmp_path / "x.ext4", registry=RegistryOptions(USER, "wrong", ca_file=r.tls.ca))
        with pytest.raises(RegistryError, match="user name and password"):
            build_image(ref, tmp_path / "x.ext4", registry=RegistryOptions(ca_file=r.tls.ca))
        with pytest.raises(RegistryError, match="TLS"):
            build_image(ref, tmp_path / "x.ext4", registry=RegistryOptions(USER, PASSWORD))
    assert not (tmp_path / "x.ext4").exists()
    build_image(f"oci:{layout}:1", tmp_path / "local.ext4")
    assert _digest(tmp_path / "ok.ext4") == _digest(tmp_path / "local.ext4")


def test_a_registry_blob_whose_digest_lies_is_refused(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "layout", LAYERS)
    with running_registry(tmp_path / "reg") as r:
        opts = RegistryOptions(insecure=True)
        push_layout(Registry(r.host, opts), "edge/os", layout, "2")
        # corrupt the stored layer in the registry's own storage, behind its back
        data = next(p for p in (r.root / "data").rglob("data") if p.read_bytes()[:2] == b"\x1f\x8b")
        data.write_bytes(data.read_bytes()[:-8] + b"garbage!")
        with pytest.raises(DigestMismatch, match="digest mismatch"):
            build_image(f"docker://{r.host}/edge/os:2", tmp_path / "x.ext4", registry=opts)
    assert not (tmp_path / "x.ext4").exists()


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed (Debian package skopeo)")
def test_an_image_skopeo_copied_into_the_registry_is_pulled_by_both_clients(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "layout", LAYERS)
    with running_registry(tmp_path / "reg") as r:
        dest = f"docker://{r.host}/edge/os:3"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:1", dest], check=True)
        opts = RegistryOptions(insecure=True)
        build_image(dest, tmp_path / "ours.erofs", "erofs", registry=opts)
        build_image(dest, tmp_path / "skopeo.erofs", "erofs", registry=RegistryOptions(insecure=True, skopeo=True))
    assert _digest(tmp_path / "ours.erofs") == _digest(tmp_path / "skopeo.erofs")


def test_push_stores_a_bundle_as_an_artifact_with_the_manifest_fields_as_annotations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "rootfs.img"
    image.write_bytes(os.urandom(1 << 20))
    assert main(["keygen", str(tmp_path / "keys")]) == 0
    bundle = tmp_path / "os.otab"
    argv = ["create", "--image", str(image), "--key", str(tmp_path / "keys/signing.key"), "--version", "2.1"]
    assert main([*argv, "--security-version", "4", "--compatible", "board-x", "-o", str(bundle)]) == 0
    with running_registry(tmp_path / "reg", auth=True) as r:
        capsys.readouterr()
        push = ["push", str(bundle), f"docker://{r.host}/edge/bundles:2.1", "--insecure-registry"]
        assert main([*push, "--creds", f"{USER}:{PASSWORD}", "--json"]) == 0
        pushed = json.loads(capsys.readouterr().out)
        reg = Registry(r.host, RegistryOptions(USER, PASSWORD, insecure=True))
        data, _, digest = reg.get_manifest("edge/bundles", "2.1")
        reg.fetch_blob("edge/bundles", pushed["bundle_digest"], pushed["bundle_size"], tmp_path / "fetched.otab")
    doc = json.loads(data)
    assert digest == pushed["manifest_digest"]
    assert pushed["pinned"] == f"oci://{r.host}/edge/bundles@{digest}"
    assert doc["artifactType"] == "application/vnd.edge-ota.bundle.v1"
    assert doc["layers"][0]["mediaType"] == "application/vnd.edge-ota.bundle.v1.otab"
    notes = doc["annotations"]
    assert notes["io.edge-ota.bundle.version"] == "2.1"
    assert notes["io.edge-ota.bundle.security-version"] == "4"
    assert notes["io.edge-ota.bundle.compatible"] == "board-x"
    assert notes["io.edge-ota.bundle.images"] == f"rootfs:{1 << 20}:sha256:{_digest(image)}"
    assert (tmp_path / "fetched.otab").read_bytes() == bundle.read_bytes()


def test_bearer_token_auth_pulls_and_pushes_with_credentials_and_pulls_public_images_anonymously(
    tmp_path: Path,
) -> None:
    layout = write_layout(tmp_path / "layout", LAYERS)
    with running_registry(tmp_path / "reg", token=True) as r:
        assert r.tokens is not None
        creds = RegistryOptions(USER, PASSWORD, insecure=True)
        push_layout(Registry(r.host, creds), "edge/os", layout, "2")
        push_layout(Registry(r.host, creds), "public/os", layout, "2")
        build_image(f"docker://{r.host}/edge/os:2", tmp_path / "private.ext4", registry=creds)
        anonymous = RegistryOptions(insecure=True)
        build_image(f"docker://{r.host}/public/os:2", tmp_path / "public.ext4", registry=anonymous)
        with pytest.raises(RegistryError, match=r"refused anonymous access \(--creds\)"):
            build_image(f"docker://{r.host}/edge/os:2", tmp_path / "x.ext4", registry=anonymous)
        # A scope's actions in any order: the client may take them from the registry's challenge.
        issued = {(who, scope.rsplit(":", 1)[0], frozenset(scope.rsplit(":", 1)[1].split(",")))
                  for who, scope in r.tokens.issued}
    assert (True, "repository:edge/os", frozenset({"pull", "push"})) in issued
    assert (True, "repository:edge/os", frozenset({"pull"})) in issued
    assert (False, "repository:public/os", frozenset({"pull"})) in issued
    assert _digest(tmp_path / "private.ext4") == _digest(tmp_path / "public.ext4")
    assert not (tmp_path / "x.ext4").exists()
