"""Image and bundle references are parsed strictly on both sides, and the
bundle artifact's media types agree between `ota-bundle push` and the agent."""

from __future__ import annotations

import json

import pytest

from agent import oci as agent_oci
from agent.errors import SourceError
from agent.mqtt.schema import parse_job
from bundler.oci import artifact
from bundler.oci.errors import OciError
from bundler.oci.image import build_epoch
from bundler.oci.source import Image, Ref, parse_ref


def test_push_and_the_agent_agree_on_the_bundle_media_types() -> None:
    assert agent_oci.ARTIFACT_TYPE == artifact.ARTIFACT_TYPE
    assert agent_oci.BUNDLE_MEDIA_TYPE == artifact.BUNDLE_MEDIA_TYPE
    assert agent_oci.MANIFEST_TYPE == artifact.MANIFEST_MEDIA_TYPE


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("oci:/a/b", Ref("oci", "/a/b")),
        ("oci:/a/b:v1.2", Ref("oci", "/a/b", "v1.2")),
        ("docker-archive:/x/os.tar", Ref("docker-archive", "/x/os.tar")),
        ("docker://reg:5000/edge/os:2", Ref("docker", "reg:5000/edge/os", "2")),
        ("docker://reg/edge/os", Ref("docker", "reg/edge/os", "latest")),
        ("docker://reg/os@sha256:" + "a" * 64, Ref("docker", "reg/os", None, "sha256:" + "a" * 64)),
    ],
)
def test_image_references(text: str, ref: Ref) -> None:
    assert parse_ref(text) == ref


@pytest.mark.parametrize(
    "text",
    [
        "os.tar",
        "oci:",
        "docker://reg",
        "docker://reg/UPPER:1",
        "docker://reg/os:bad tag",
        "docker://r/os@md5:00",
        "x:y",
    ],
)
def test_bad_image_references_are_refused(text: str) -> None:
    with pytest.raises(OciError):
        parse_ref(text)


def test_bundle_references() -> None:
    r = agent_oci.parse_ref("oci://reg.example:443/fleet/os:2.1")
    assert (r.scheme, r.host, r.repo, r.reference) == ("https", "reg.example:443", "fleet/os", "2.1")
    pinned = agent_oci.parse_ref("oci+http://127.0.0.1:5000/os@sha256:" + "b" * 64)
    assert pinned.scheme == "http"
    assert pinned.url("manifests/x") == "http://127.0.0.1:5000/v2/os/manifests/x"
    assert agent_oci.parse_ref("oci://reg/os").reference == "latest"


@pytest.mark.parametrize(
    "text", ["oci://", "oci://reg", "oci://reg/../x:1", "oci://reg/os@sha256:12", "oci://reg/os:-x", "oci://a b/os"]
)
def test_bad_bundle_references_are_one_error(text: str) -> None:
    with pytest.raises(SourceError, match="use oci://HOST"):
        agent_oci.parse_ref(text)


def test_an_mqtt_install_job_may_name_a_bundle_in_a_registry() -> None:
    for url in ("oci://reg.example/fleet/os:2.1", "oci://reg.example/fleet/os@sha256:" + "c" * 64):
        body = {"schema": 1, "id": "job-1", "type": "install", "created": "2026-05-01T12:00:00Z", "url": url}
        assert parse_job(json.dumps(body).encode(), "job-1").url == url


@pytest.mark.parametrize(
    ("created", "epoch"),
    [
        ("2024-05-01T12:00:00Z", 1714564800),
        ("2024-05-01T12:00:00.123456789Z", 1714564800),  # Go's nanoseconds (podman, buildah)
        ("2024-05-01T14:00:00.5+02:00", 1714564800),
        ("yesterday", 0),
    ],
)
def test_the_build_epoch_comes_from_the_image_created_time(
    created: str, epoch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert build_epoch(Image("ref", {"created": created}, "sha256:" + "0" * 64, ())) == epoch
