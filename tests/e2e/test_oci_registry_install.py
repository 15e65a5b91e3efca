"""A device installs a bundle from a real registry (Debian's docker-registry on
a loopback port): `ota-bundle push` stores it, `ota-agent install oci://...`
resolves the tag or the pinned digest through the distribution API and streams
the blob, resuming a dropped connection with a Range request. A wrong pin, an
image that is not a bundle, or missing credentials are one clear error and
change nothing; the bundle's signature stays the trust root."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundler.cli import main as bundle_main
from bundler.oci.registry import Registry as Client
from bundler.oci.registry import RegistryOptions
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory
from tests.fixtures.faultproxy import FaultProxy, Faults
from tests.oci._images import E, write_layout
from tests.oci._proxy import DroppingProxy
from tests.oci._registry import PASSWORD, USER, Registry, running_registry
from tests.oci.test_registry import push_layout


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry", auth=True) as r:
        yield r


def push(bundle: Path, dest: str, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    capsys.readouterr()
    argv = ["push", str(bundle), dest, "--insecure-registry", "--creds", f"{USER}:{PASSWORD}", "--json"]
    assert bundle_main(argv) == 0
    doc: dict[str, str] = json.loads(capsys.readouterr().out)
    return doc


def with_credentials(device: SimDevice) -> None:
    creds = device.dir / "registry.creds"
    creds.write_text(f"{USER}:{PASSWORD}\n")
    text = device.config.read_text()
    if "[download]" in text:
        text = text.replace("[download]", f'[download]\nregistry_credentials = "{creds}"', 1)
    else:
        text += f'\n[download]\nregistry_credentials = "{creds}"\n'
    device.config.write_text(text)


def test_install_from_a_registry_tag_and_from_a_pinned_digest(
    device: SimDevice, make_bundle: BundleFactory, registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_bundle("2.0")
    pushed = push(bundle, f"docker://{registry.host}/edge/os:2.0", capsys)
    with_credentials(device)
    device.install_ok(f"oci+http://{registry.host}/edge/os:2.0")
    status = device.status()
    assert status["last_result"]["result"] == "ok"
    device.install_ok(pushed["pinned"].replace("oci://", "oci+http://"))


def test_a_dropped_connection_is_resumed_with_a_range_request(
    device: SimDevice, make_bundle: BundleFactory, registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_bundle("2.0")
    push(bundle, f"docker://{registry.host}/edge/os:2.0", capsys)
    with_credentials(device)
    proxy = DroppingProxy(int(registry.host.split(":")[1]), cut_after=bundle.stat().st_size // 3)
    try:
        device.install_ok(f"oci+http://{proxy.host}/edge/os:2.0")
    finally:
        proxy.close()
    blob_gets = [r for r in proxy.requests if "/blobs/" in r]
    assert len(blob_gets) == 2
    assert blob_gets[1].endswith("(ranged)")
    assert device.status()["last_result"]["result"] == "ok"


def test_a_wrong_pin_an_image_and_missing_credentials_are_clear_errors_that_change_nothing(
    device: SimDevice,
    make_bundle: BundleFactory,
    registry: Registry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = make_bundle("2.0")
    push(bundle, f"docker://{registry.host}/edge/os:2.0", capsys)
    layout = write_layout(tmp_path / "layout", [[E("etc", "dir"), E("etc/x", data=b"x")]])
    push_layout(Client(registry.host, RegistryOptions(USER, PASSWORD, insecure=True)), "edge/img", layout, "1")
    before = device.snapshot()
    line = device.install(f"oci+http://{registry.host}/edge/os:2.0").one_error_line()
    assert "asks for credentials" in line
    with_credentials(device)
    wrong = "sha256:" + "0" * 64
    line = device.install(f"oci+http://{registry.host}/edge/os@{wrong}").one_error_line()
    assert "HTTP 404" in line or "digest mismatch" in line
    line = device.install(f"oci+http://{registry.host}/edge/img:1").one_error_line()
    assert "not an edge-ota bundle artifact" in line
    line = device.install(f"oci+http://{registry.host}/Bad/Repo:1").one_error_line()
    assert "use oci://HOST" in line
    after = device.snapshot()
    assert (after.slot("A"), after.slot("B"), after.bootloader) == (
        before.slot("A"),
        before.slot("B"),
        before.bootloader,
    )


def test_install_through_bearer_token_auth_with_credentials_and_anonymously_for_public_repositories(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_bundle("2.0")
    with running_registry(tmp_path / "token-registry", token=True) as r:
        assert r.tokens is not None
        push(bundle, f"docker://{r.host}/public/os:2.0", capsys)
        push(bundle, f"docker://{r.host}/edge/os:2.0", capsys)
        device.install_ok(f"oci+http://{r.host}/public/os:2.0")  # an anonymous pull token
        line = device.install(f"oci+http://{r.host}/edge/os:2.0", "--reinstall").one_error_line()
        assert "the registry refused anonymous access ([download] registry_credentials)" in line
        with_credentials(device)
        device.install_ok(f"oci+http://{r.host}/edge/os:2.0")
        issued = list(r.tokens.issued)
    assert (False, "repository:public/os:pull") in issued
    assert (True, "repository:edge/os:pull") in issued


def test_oci_over_https_with_a_private_ca_installs_to_the_commit_and_a_wrong_ca_is_refused(
    device: SimDevice, make_bundle: BundleFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The registry serves TLS with a certificate from the test CA: the agent trusts it
    through `[download] ca_file` only; another CA (or none: the system store) is refused
    at the handshake with one line, and nothing is written."""
    bundle = make_bundle("2.0", security_version=3)
    with running_registry(tmp_path / "tls-registry", tls=True, auth=True) as r:
        assert r.tls is not None
        capsys.readouterr()
        argv = ["push", str(bundle), f"docker://{r.host}/edge/os:2.0", "--registry-ca", str(r.tls.ca),
                "--creds", f"{USER}:{PASSWORD}", "--json"]
        assert bundle_main(argv) == 0
        pinned = json.loads(capsys.readouterr().out)["pinned"]
        assert pinned.startswith(f"oci://{r.host}/edge/os@sha256:")
        with_credentials(device)
        plain = device.config.read_text()
        before = device.snapshot()
        for ca in (r.tls.directory / "foreign-ca.crt", None):
            extra = f'ca_file = "{ca}"\n' if ca else ""
            device.config.write_text(plain.replace("[download]\n", f"[download]\n{extra}", 1))
            line = device.install(f"oci://{r.host}/edge/os:2.0").one_error_line()
            assert "TLS: server certificate not trusted: unable to get local issuer certificate" in line, line
            assert f"oci://{r.host}/edge/os:2.0" in line
        after = device.snapshot()
        assert (after.slot("A"), after.slot("B"), after.bootloader) == (before.slot("A"), before.slot("B"),
                                                                       before.bootloader)
        device.config.write_text(plain.replace("[download]\n", f'[download]\nca_file = "{r.tls.ca}"\n', 1))
        device.install_ok(pinned)
    assert device.status()["slots"]["B"]["version"] == "2.0"
    assert device.boot().out.splitlines()[-1] == "settled on slot B after 1 boot(s)"
    status = device.status()
    assert (status["booted"], status["slots"]["B"]["boot_state"]) == ("B", "good")
    assert status["committed_security_version"] == 3


def test_a_throttling_registry_is_waited_for_as_its_retry_after_asks(
    device: SimDevice, make_bundle: BundleFactory, registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """The manifest request is under the same retry policy as the blob: a 429 with
    Retry-After (Docker Hub's rate limit answers manifests so) is waited for, capped by
    retry_backoff_max, and the install goes on."""
    push(make_bundle("2.0"), f"docker://{registry.host}/edge/os:2.0", capsys)
    with_credentials(device)
    device.config.write_text(device.config.read_text().replace(
        "[download]\n", "[download]\nretries = 3\nretry_backoff = 0.01\nretry_backoff_max = 1\n", 1))
    answer = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 30\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    with FaultProxy(int(registry.host.split(":")[1])) as proxy:
        proxy.then(Faults(answer=answer))
        run = device.install_ok(f"oci+http://127.0.0.1:{proxy.port}/edge/os:2.0")
        assert proxy.fired == 1
        assert b"/manifests/2.0" in proxy.requests[0]
    [wait] = [line for line in run.err.splitlines() if "retrying in" in line]
    assert "HTTP 429 Too Many Requests (Retry-After 30 s); retrying in 1.0 s" in wait  # capped
    assert device.status()["last_result"]["result"] == "ok"
