"""A real registry for the tests: Debian's `docker-registry` (Docker
Distribution 2.8) on a loopback port, storage in a temporary directory, with
TLS (the test PKI's server certificate) and htpasswd basic auth when asked.
Started by the test, stopped (terminate, wait, kill) when it ends."""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.pki import Pki, make_pki
from tests.fixtures.procs import free_ports, log_tail, spawn, stop_process, wait_for_ports
from tests.oci._token import ISSUER, SERVICE, TokenService

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt  # bcrypt hashes for htpasswd (Debian's libcrypt makes them); gone in Python 3.13

USER, PASSWORD = "ci", "s3cret"


@dataclass(frozen=True, slots=True)
class Registry:
    host: str  # 127.0.0.1:PORT
    tls: Pki | None
    auth: bool
    root: Path
    tokens: TokenService | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"


def needs_registry() -> None:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry not installed (Debian package docker-registry)")


@contextlib.contextmanager
def running_registry(
    directory: Path, *, tls: bool = False, auth: bool = False, token: bool = False
) -> Iterator[Registry]:
    """`auth`: htpasswd basic auth; `token`: the token flow (`TokenService`)."""
    needs_registry()
    directory.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    lines = [
        "version: 0.1",
        "log: {level: info}",
        f"storage: {{filesystem: {{rootdirectory: {directory / 'data'}}}, delete: {{enabled: true}}}}",
        "http:",
        f"  addr: 127.0.0.1:{port}",
    ]
    pki = None
    if tls:
        pki = make_pki(directory / "pki")
        lines += ["  tls:", f"    certificate: {pki.server.cert}", f"    key: {pki.server.key}"]
    tokens = None
    if token:
        tokens = TokenService(directory, USER, PASSWORD)
        lines += ["auth:", "  token:", f"    realm: {tokens.realm}", f"    service: {SERVICE}"]
        lines += [f"    issuer: {ISSUER}", f"    rootcertbundle: {tokens.bundle}"]
    elif auth:
        (directory / "htpasswd").write_text(
            f"{USER}:{crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}\n"
        )
        lines += ["auth:", "  htpasswd:", "    realm: edge-ota-test", f"    path: {directory / 'htpasswd'}"]
    (directory / "config.yml").write_text("\n".join(lines) + "\n")
    log = directory / "registry.log"
    proc = spawn(["docker-registry", "serve", str(directory / "config.yml")], log)
    try:
        wait_for_ports(proc, [port], 15.0, "docker-registry", log)
        yield Registry(f"127.0.0.1:{port}", pki, auth or token, directory, tokens)
    except Exception:
        print(log_tail(log))
        raise
    finally:
        stop_process(proc)
        if tokens is not None:
            tokens.close()
