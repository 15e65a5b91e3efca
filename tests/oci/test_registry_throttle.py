"""A throttling registry is waited for, not given up on: `ota-bundle push`
and pulls ask again after a 429 or 503, for as long as `Retry-After` says
(capped), or after a backoff when it says nothing, and fail with the
registry's own answer once the attempts are used up. The registry is Debian's
docker-registry; a proxy in front of it answers chosen requests itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bundler.cli import main
from bundler.oci import registry as registry_module
from bundler.oci.errors import RegistryError
from bundler.oci.registry import Registry, RegistryOptions
from tests.oci._registry import running_registry
from tests.oci._throttle import Refusal, ThrottlingProxy


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    image = tmp_path / "rootfs.img"
    image.write_bytes(os.urandom(256 << 10))
    assert main(["keygen", str(tmp_path / "keys")]) == 0
    out = tmp_path / "os.otab"
    argv = ["create", "--image", str(image), "--key", str(tmp_path / "keys/signing.key"), "--version", "2.1"]
    assert main([*argv, "--security-version", "1", "--compatible", "board-x", "-o", str(out)]) == 0
    return out


@pytest.fixture
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the waits instead of sleeping them (the registry's answers are what is tested)."""
    waits: list[float] = []
    real_init = Registry.__init__

    def init(self: Registry, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        self.sleep = waits.append

    monkeypatch.setattr(Registry, "__init__", init)
    return waits


def throttle_every_other_put(n: int, line: str) -> Refusal:
    if line.startswith("PUT ") and n % 2 == 1:
        return ("429 Too Many Requests", {"Retry-After": "7"})
    return None


def test_push_waits_as_a_429_asks_and_completes(
    tmp_path: Path, bundle: Path, no_waiting: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    with running_registry(tmp_path / "reg") as r:
        proxy = ThrottlingProxy(int(r.host.rsplit(":", 1)[1]), throttle_every_other_put)
        try:
            capsys.readouterr()
            assert main(["push", str(bundle), f"docker://{proxy.host}/edge/os:2.1", "--insecure-registry"]) == 0
            err = capsys.readouterr().err
            reg = Registry(r.host, RegistryOptions(insecure=True))
            data, _, _ = reg.get_manifest("edge/os", "2.1")
        finally:
            proxy.close()
    refused = proxy.refused()
    assert refused
    assert all(line.startswith("PUT ") for line in refused)
    assert no_waiting[: len(refused)] == [7.0] * len(refused)
    assert "HTTP 429 Too Many Requests; asking again in 7 s (attempt 2 of 5)" in err
    assert b"application/vnd.edge-ota.bundle.v1" in data


def test_retry_after_is_capped_and_a_503_without_it_backs_off(tmp_path: Path, no_waiting: list[float]) -> None:
    answers: list[Refusal] = [
        ("503 Service Unavailable", {"Retry-After": "86400"}),
        ("503 Service Unavailable", {}),
        ("503 Service Unavailable", {"Retry-After": "Tue, 01 Dec 1998 12:00:00 GMT"}),
    ]

    def refuse(n: int, line: str) -> Refusal:
        return answers[n - 1] if n <= len(answers) else None

    with running_registry(tmp_path / "reg") as r:
        proxy = ThrottlingProxy(int(r.host.rsplit(":", 1)[1]), refuse)
        try:
            reg = Registry(proxy.host, RegistryOptions(insecure=True))
            reg.notify = lambda line: None
            with pytest.raises(RegistryError, match=r"MANIFEST_UNKNOWN|404"):
                reg.get_manifest("edge/none", "1")  # reached the registry in the end, which has no such thing
        finally:
            proxy.close()
    assert no_waiting == [registry_module.MAX_WAIT, 2.0, 0.0]
    assert len(proxy.requests) == 4


def test_a_registry_that_stays_throttled_fails_with_its_answer_after_the_last_attempt(
    tmp_path: Path, bundle: Path, no_waiting: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    with running_registry(tmp_path / "reg") as r:
        proxy = ThrottlingProxy(int(r.host.rsplit(":", 1)[1]), lambda n, line: ("429 Too Many Requests", {}))
        try:
            capsys.readouterr()
            assert main(["push", str(bundle), f"docker://{proxy.host}/edge/os:2.1", "--insecure-registry"]) == 1
        finally:
            proxy.close()
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].endswith("HTTP 429 Too Many Requests")
    assert len(proxy.requests) == registry_module.RETRIES
    assert no_waiting == [1.0, 2.0, 4.0, 8.0]


def test_an_unreachable_registry_is_asked_again_then_named(no_waiting: list[float]) -> None:
    reg = Registry("127.0.0.1:1", RegistryOptions(insecure=True))
    reg.notify = lambda line: None
    with pytest.raises(RegistryError, match=r"cannot reach 127\.0\.0\.1:1"):
        reg.get_manifest("edge/os", "1")
    assert len(no_waiting) == registry_module.RETRIES - 1
