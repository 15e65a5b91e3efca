"""Fixtures for the end-to-end tests: signing keys (a trusted pair and an
unrelated one), deterministic images, a bundle builder, a fresh simulated
device per test, and a real HTTP server on a loopback port.

Keys, images and bundles are built once per session (they are immutable
inputs); every test gets its own device directory under tmp_path.
"""

from __future__ import annotations

import hashlib
import http.server
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from agent import sim
from bundler.build import BundleSpec, build_full
from bundler.format.signing import generate_key
from tests.e2e._sim import COMPATIBLE, SLOT_SIZE, MiB, SimDevice, sha256_file, write_image


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`main()` reconfigures the root logger onto the captured stderr; put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path


def _keypair(tmp_path_factory: pytest.TempPathFactory, name: str) -> KeyPair:
    private, public = generate_key(tmp_path_factory.mktemp(name))
    return KeyPair(private, public)


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """The key the devices trust."""
    return _keypair(tmp_path_factory, "trusted-key")


@pytest.fixture(scope="session")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """A valid Ed25519 key no device trusts."""
    return _keypair(tmp_path_factory, "other-key")


@dataclass(frozen=True)
class Image:
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class Images:
    factory: Image  # what both slots hold on a fresh device
    v2: Image
    v3: Image


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    d = tmp_path_factory.mktemp("images")

    def make(name: str, seed: int, size: int) -> Image:
        path = write_image(d / name, seed, size)
        return Image(path, size, sha256_file(path))

    # Sizes deliberately not multiples of 4096; v2 is the largest, v3 shorter than v2.
    return Images(
        factory=make("factory.img", 1, 4 * MiB + 777),
        v2=make("v2.img", 2, 6 * MiB + 1234),
        v3=make("v3.img", 3, 3 * MiB + 4095),
    )


BundleFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory: pytest.TempPathFactory, signing_key: KeyPair, images: Images) -> BundleFactory:
    """`make_bundle(version, security_version=1, compatible=COMPATIBLE, expires=None,
    key=signing_key, image=images.v2) -> Path`; identical requests share one file."""
    d = tmp_path_factory.mktemp("bundles")
    cache: dict[tuple[Any, ...], Path] = {}

    def build(
        version: str,
        *,
        security_version: int = 1,
        compatible: str = COMPATIBLE,
        expires: datetime | None = None,
        key: KeyPair | None = None,
        image: Image | None = None,
    ) -> Path:
        key = key or signing_key
        image = image or images.v2
        spec_key = (version, security_version, compatible, expires, key.private, image.path)
        if spec_key not in cache:
            name = hashlib.sha256(repr(spec_key).encode()).hexdigest()[:16]
            out = d / f"{version}-{name}.otab"
            spec = BundleSpec(
                image=image.path,
                key=key.private,
                version=version,
                security_version=security_version,
                compatible=compatible,
                expires=expires,
                threads=2,
            )
            build_full(spec, out)
            cache[spec_key] = out
        return cache[spec_key]

    return build


DeviceFactory = Callable[..., SimDevice]


@pytest.fixture
def make_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], signing_key: KeyPair, images: Images
) -> DeviceFactory:
    """`make_device(tries=3, name="device", bootloader="sim") -> SimDevice`: a fresh simulated
    device (both slots hold the factory image, A booted and good)."""

    def create(*, tries: int = 3, name: str = "device", bootloader: str = "sim") -> SimDevice:
        directory = tmp_path / name
        spec = sim.SimSpec(
            directory=directory,
            image=images.factory.path,
            keyring=signing_key.public,
            compatible=COMPATIBLE,
            tries=tries,
            bootloader=bootloader,
            slot_size=SLOT_SIZE,
        )
        sim.init(spec)
        return SimDevice(directory, capsys)

    return create


@pytest.fixture
def device(make_device: DeviceFactory) -> SimDevice:
    return make_device()


# --- HTTP -----------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files, plus `/cut/N/NAME`: announce NAME's full length, send
    its first N bytes, then close the connection (a server dying mid-stream)."""

    def do_GET(self) -> None:
        parts = self.path.split("/")
        if len(parts) == 4 and parts[1] == "cut":
            self._cut(int(parts[2]), parts[3])
            return
        super().do_GET()

    def _cut(self, n: int, name: str) -> None:
        data = (Path(self.directory) / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:n])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass(frozen=True)
class HttpServer:
    root: Path
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def publish(self, bundle: Path, name: str | None = None) -> str:
        """Copy a bundle into the served directory; returns its name."""
        name = name or bundle.name
        (self.root / name).write_bytes(bundle.read_bytes())
        return name


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[HttpServer]:
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield HttpServer(root, server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass(frozen=True)
class Broker:
    host: str
    port: int


@pytest.fixture(params=["mosquitto", "rabbitmq"])
def any_broker(request: pytest.FixtureRequest) -> Broker:
    """The broker under test: a fresh mosquitto, or the session's RabbitMQ node."""
    if request.param == "mosquitto":
        m = request.getfixturevalue("mosquitto")
        return Broker(m.host, m.port)
    endpoint = request.getfixturevalue("rabbitmq").endpoint("plain")
    return Broker(endpoint.host, endpoint.port)
