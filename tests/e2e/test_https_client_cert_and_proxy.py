"""HTTPS with the `[download]` TLS keys against a real TLS server (Python's `ssl`,
a test PKI made with `cryptography`) that requires a client certificate: the
install goes through with the CA bundle, client certificate and key, resumes
across a reset connection, and sends the configured bearer token (never shown
in output). A wrong CA or a missing client certificate fails at once with one
clear line. Through a real HTTP proxy: CONNECT for https, absolute-form for
http, `no_proxy` bypasses it. A redirect from https to http is refused."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bundler.fleet.serve import BundleHandler, BundleServer
from tests.e2e._download import download_table
from tests.e2e._sim import SimDevice
from tests.e2e.conftest import BundleFactory
from tests.fixtures.faultproxy import FaultProxy, Faults
from tests.fixtures.httpproxy import HttpProxy
from tests.fixtures.pki import Pki, make_pki

MiB = 1 << 20
TOKEN = "Bearer s3cret-token-0123"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Site:
    root: Path
    port: int
    seen: list[dict[str, str]]  # the headers of every request

    def url(self, name: str = "update.otab", port: int | None = None) -> str:
        return f"https://127.0.0.1:{port or self.port}/{name}"


def _serve(root: Path, context: ssl.SSLContext | None, plain_port: int = 0) -> Iterator[Site]:
    root.mkdir()
    seen: list[dict[str, str]] = []
    server = BundleServer(root, quiet=True)

    class Recording(server.RequestHandlerClass):  # type: ignore[name-defined,misc]
        def do_GET(self) -> None:
            seen.append(dict(self.headers.items()))
            if self.path == "/to-http":
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{plain_port}/update.otab")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_GET()

    assert issubclass(Recording, BundleHandler)
    server.RequestHandlerClass = Recording
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    server.start()
    try:
        yield Site(root, server.server_address[1], seen)
    finally:
        server.stop()


@pytest.fixture
def tls_site(tmp_path: Path, pki: Pki) -> Iterator[Site]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: a device certificate from the test CA
    context.load_verify_locations(pki.ca)
    yield from _serve(tmp_path / "www-tls", context)


@pytest.fixture
def plain_site(tmp_path: Path) -> Iterator[Site]:
    yield from _serve(tmp_path / "www", None)


@pytest.fixture
def bundle(make_bundle: BundleFactory) -> Path:
    return make_bundle("2.0")


def publish(site: Site, bundle: Path) -> None:
    (site.root / "update.otab").write_bytes(bundle.read_bytes())


def mtls(pki: Pki, **extra: object) -> dict[str, object]:
    return {"ca_file": pki.ca, "client_cert": pki.client.cert, "client_key": pki.client.key,
            "headers": {"Authorization": TOKEN}, **extra}


def assert_installed(device: SimDevice) -> dict[str, object]:
    doc = device.status()
    assert (doc["primary"], doc["slots"]["B"]["boot_state"], doc["slots"]["B"]["version"]) == ("B", "trial", "2.0")
    last: dict[str, object] = doc["last_result"]
    return last


def test_installs_with_a_client_certificate_and_resumes_across_a_reset(
    device: SimDevice, tls_site: Site, pki: Pki, bundle: Path
) -> None:
    publish(tls_site, bundle)
    download_table(device, **mtls(pki))
    with FaultProxy(tls_site.port, raw=True) as proxy:  # TLS: bytes counted from the connection's start
        proxy.then(Faults(reset_after=2 * MiB))
        run = device.install_ok(tls_site.url(port=proxy.port))
        assert proxy.fired == 1
        assert len(proxy.requests) == 2
    last = assert_installed(device)
    size = bundle.stat().st_size
    assert size <= int(str(last["downloaded"])) < 1.1 * size
    assert [h.get("Authorization") for h in tls_site.seen] == [TOKEN, TOKEN]
    assert "Range" in tls_site.seen[1]
    assert TOKEN not in run.out + run.err
    assert "s3cret" not in (device.dir / "state" / "outbox.log").read_text()


def test_a_server_certificate_from_another_ca_fails_at_once(
    device: SimDevice, tls_site: Site, pki: Pki, bundle: Path
) -> None:
    publish(tls_site, bundle)
    download_table(device, **mtls(pki, ca_file=pki.directory / "foreign-ca.crt"))
    line = device.install(tls_site.url()).one_error_line()
    assert "server certificate not trusted" in line, line
    assert tls_site.seen == []


def test_a_missing_client_certificate_fails_at_once_and_says_so(
    device: SimDevice, tls_site: Site, pki: Pki, bundle: Path
) -> None:
    publish(tls_site, bundle)
    download_table(device, ca_file=pki.ca)
    with FaultProxy(tls_site.port, raw=True) as counter:
        line = device.install(tls_site.url(port=counter.port)).one_error_line()
        assert len(counter.requests) == 1  # not retried
    assert "TLS" in line
    assert "client_cert" in line, line
    assert device.status()["last_result"]["result"] == "failed"


def test_a_client_certificate_from_another_ca_is_refused(
    device: SimDevice, tls_site: Site, pki: Pki, bundle: Path
) -> None:
    publish(tls_site, bundle)
    download_table(device, **mtls(pki, client_cert=pki.foreign_client.cert, client_key=pki.foreign_client.key))
    line = device.install(tls_site.url()).one_error_line()
    assert "TLS: the server refused the connection" in line, line
    assert "gave up" not in line  # a refusal, not retried


def test_https_goes_through_the_proxy_with_connect(device: SimDevice, tls_site: Site, pki: Pki, bundle: Path) -> None:
    publish(tls_site, bundle)
    proxy = HttpProxy()
    try:
        download_table(device, **mtls(pki, proxy=proxy.url))
        device.install_ok(tls_site.url())
        assert proxy.lines == [f"CONNECT 127.0.0.1:{tls_site.port}"]
        assert b"s3cret" not in proxy.heads[0]  # the token goes inside the tunnel only
    finally:
        proxy.close()
    assert_installed(device)


def test_http_goes_through_the_proxy_in_absolute_form(device: SimDevice, plain_site: Site, bundle: Path) -> None:
    publish(plain_site, bundle)
    proxy = HttpProxy()
    try:
        download_table(device, proxy=proxy.url)
        url = f"http://127.0.0.1:{plain_site.port}/update.otab"
        device.install_ok(url)
        assert proxy.lines == [f"GET {url}"]
    finally:
        proxy.close()
    assert_installed(device)


def test_no_proxy_hosts_are_reached_directly(device: SimDevice, plain_site: Site, bundle: Path) -> None:
    publish(plain_site, bundle)
    proxy = HttpProxy()
    try:
        download_table(device, proxy=proxy.url, no_proxy=["127.0.0.1"])
        device.install_ok(f"http://127.0.0.1:{plain_site.port}/update.otab")
        assert proxy.lines == []
    finally:
        proxy.close()


def test_a_redirect_from_https_to_http_is_refused(
    device: SimDevice, tmp_path: Path, pki: Pki, plain_site: Site, bundle: Path
) -> None:
    publish(plain_site, bundle)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    serving = _serve(tmp_path / "www-redirect", context, plain_port=plain_site.port)
    site = next(serving)
    try:
        download_table(device, ca_file=pki.ca)
        line = device.install(site.url("to-http")).one_error_line()
        assert "refusing a redirect from https to http://" in line, line
        assert plain_site.seen == []
    finally:
        next(serving, None)


def test_configured_headers_are_not_sent_to_another_host_a_redirect_names(
    device: SimDevice, tmp_path: Path, plain_site: Site, bundle: Path
) -> None:
    publish(plain_site, bundle)
    serving = _serve(tmp_path / "www-redirect", None, plain_port=plain_site.port)
    site = next(serving)
    try:
        download_table(device, headers={"Authorization": TOKEN})
        device.install_ok(f"http://127.0.0.1:{site.port}/to-http")
        assert site.seen[0].get("Authorization") == TOKEN
        assert [h.get("Authorization") for h in plain_site.seen] == [None]  # another port: another origin
    finally:
        next(serving, None)
