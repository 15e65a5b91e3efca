"""Bundles from an OCI registry: `oci://HOST[:PORT]/REPO:TAG` or
`oci://HOST/REPO@sha256:HEX` (`oci+http://` for a registry on plain HTTP, a
lab or loopback only), wherever the agent accepts a bundle URL.

`Resolver` asks the distribution API for the manifest (by tag, or by digest,
then checking that the manifest's bytes hash to it), answers the registry's
`WWW-Authenticate` challenge (an anonymous or credentialed Bearer token from
the challenge's realm, or Basic auth) and finds the layer of the bundle media
type `ota-bundle push` writes. It hands back a `BlobLocation`: the blob URL and
the headers to fetch it with (a registry redirecting to object storage or a
CDN gets no Authorization header there).

`OciSource` streams that blob through `agent.ranged` (`HttpRangeSource` with
the registry's Authorization header added to the `[download]` headers): a
dropped connection resumes with a Range request pinned to the blob's
validator, transient errors are retried under `[download] retries`, and a
damaged payload can be fetched again by range. `[download]` TLS and proxy
keys apply to the registry as to any https URL. The manifest and token
requests run under the same retry policy (`agent.ranged.RetryPolicy`: transient
errors, Retry-After, a cancel ending the wait). The registry is transport
only: the bundle's own signature, checked by the reader, stays the trust
root. The media types repeat those of `bundler.oci.artifact`."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field, replace

from agent.config import DownloadConfig
from agent.errors import SourceError
from agent.httpclient import HttpClient, HttpResponse
from agent.pace import Pace
from agent.ranged import HttpRangeSource, ResumableSource, RetryPolicy, status_error
from agent.sources import BundleSource, RawStream, tls_context
from ota_common.text import clean

ARTIFACT_TYPE = "application/vnd.edge-ota.bundle.v1"
BUNDLE_MEDIA_TYPE = "application/vnd.edge-ota.bundle.v1.otab"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
SCHEMES = {"oci://": "https", "oci+http://": "http"}
MAX_DOCUMENT = 1 << 20  # a manifest or a token answer
MAX_TOKEN = 16 << 10
_HOST = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](?::[0-9]{1,5})?")
_REPO = re.compile(r"[a-z0-9]+(?:(?:[._-]|__)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._-]|__)[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_PARAM = re.compile(r'([A-Za-z_]+)="([^"]*)"')
_TOKEN_TEXT = re.compile(r"[\x21-\x7e]+")


def is_oci(spec: str) -> bool:
    return spec.startswith(tuple(SCHEMES))


@dataclass(frozen=True, slots=True)
class OciRef:
    scheme: str  # https | http
    host: str
    repo: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.host}/v2/{self.repo}/{path}"


def parse_ref(spec: str) -> OciRef:
    prefix = next((p for p in SCHEMES if spec.startswith(p)), None)
    if prefix is None:
        raise SourceError(spec, "not an oci:// reference", transient=False)
    rest = spec[len(prefix) :]
    host, slash, path = rest.partition("/")
    bad = SourceError(spec, "use oci://HOST[:PORT]/REPO:TAG or oci://HOST/REPO@sha256:HEX", transient=False)
    if not slash or not _HOST.fullmatch(host) or not path:
        raise bad
    tag = digest = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not _DIGEST.fullmatch(digest):
            raise bad
    elif ":" in path.rsplit("/", 1)[-1]:
        path, _, tag = path.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise bad
    if not _REPO.fullmatch(path):
        raise bad
    return OciRef(SCHEMES[prefix], host, path, tag, digest)


@dataclass(frozen=True, slots=True)
class BlobLocation:
    url: str
    headers: dict[str, str]
    digest: str
    size: int
    manifest_digest: str


@dataclass
class Resolver:
    """The distribution API for one reference; keeps the token it was given."""

    ref: OciRef
    name: str
    limits: DownloadConfig
    tls: ssl.SSLContext | None = None
    credentials: tuple[str, str] | None = None
    _auth: dict[str, str] = field(default_factory=dict)

    def client(self, extra: dict[str, str]) -> HttpClient:
        """A client sending the `[download]` headers and `extra` (Authorization, Accept)
        to the origin it is asked for, through the `[download]` proxy."""
        lim = self.limits
        headers = (*lim.headers, *extra.items())
        return HttpClient(
            tls=self.tls, connect_timeout=lim.connect_timeout, headers=headers, proxy=lim.proxy, no_proxy=lim.no_proxy
        )

    def blob_limits(self) -> DownloadConfig:
        """`[download]` with this registry's Authorization added, for the blob."""
        return replace(self.limits, headers=(*self.limits.headers, *self._auth.items()))

    def resolve(self, pace: Pace) -> BlobLocation:
        ref = self.ref
        response = self.get(ref.url(f"manifests/{ref.reference}"), pace, MAX_DOCUMENT, accept=MANIFEST_TYPE)
        data = _read_all(response, MAX_DOCUMENT, self.name, "manifest")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if ref.digest is not None and digest != ref.digest:
            raise SourceError(
                self.name, f"manifest digest mismatch: pinned {ref.digest}, got {digest}", transient=False
            )
        layer = self._bundle_layer(data)
        return BlobLocation(ref.url(f"blobs/{layer[0]}"), dict(self._auth), layer[0], layer[1], digest)

    def _bundle_layer(self, data: bytes) -> tuple[str, int]:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise SourceError(self.name, "the manifest is not JSON", transient=False) from None
        layers = doc.get("layers") if isinstance(doc, dict) else None
        if not isinstance(layers, list):
            raise SourceError(self.name, "the manifest has no layers", transient=False)
        found = [d for d in layers if isinstance(d, dict) and d.get("mediaType") == BUNDLE_MEDIA_TYPE]
        if len(found) != 1:
            kind = clean(str(doc.get("artifactType") or doc.get("config", {}).get("mediaType")), 80)
            raise SourceError(
                self.name, f"not an edge-ota bundle artifact (one {BUNDLE_MEDIA_TYPE} layer; {kind})", transient=False
            )
        digest, size = found[0].get("digest"), found[0].get("size")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise SourceError(self.name, "the bundle layer has no sha256 digest", transient=False)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise SourceError(self.name, "the bundle layer has no size", transient=False)
        return digest, size

    def get(self, url: str, pace: Pace, cap: int, *, accept: str | None = None) -> HttpResponse:
        """GET with the auth this registry asked for; one challenge answered."""
        for attempt in range(2):
            headers = dict(self._auth)
            if accept:
                headers["Accept"] = accept
            response = self.client(headers).get(url, pace, cap=cap)
            if response.status in (200, 206):
                return response
            challenge = response.headers.get("www-authenticate") or ""
            response.close()
            if response.status == 401 and attempt == 0:
                self._answer(challenge, pace)
                continue
            code = response.status
            if code != 401:
                raise status_error(self.name, response, url)  # 429/503 with Retry-After: waited for as asked
            refused = "the credentials" if self.credentials else "anonymous access ([download] registry_credentials)"
            raise SourceError(self.name, f"the registry refused {refused}", transient=False, status_code=code)
        raise AssertionError("unreachable")

    def _basic(self) -> str | None:
        if self.credentials is None:
            return None
        user, password = self.credentials
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")

    def _answer(self, challenge: str, pace: Pace) -> None:
        kind = challenge.split(" ", 1)[0].lower()
        if kind == "basic":
            basic = self._basic()
            if basic is None:
                raise SourceError(
                    self.name,
                    "the registry asks for credentials ([download] registry_credentials)",
                    transient=False,
                    status_code=401,
                )
            self._auth = {"Authorization": basic}
            return
        if kind != "bearer":
            raise SourceError(
                self.name, f"unsupported auth challenge {clean(challenge, 60)!r}", transient=False, status_code=401
            )
        params = dict(_PARAM.findall(challenge))
        realm = params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise SourceError(self.name, f"token realm {clean(realm, 80)!r} is not an http(s) URL", transient=False)
        query = {"scope": params.get("scope", f"repository:{self.ref.repo}:pull")}
        if "service" in params:
            query["service"] = params["service"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        basic = self._basic()
        response = self.client({"Authorization": basic} if basic else {}).get(url, pace, cap=MAX_DOCUMENT)
        if response.status != 200:
            response.close()
            raise SourceError(
                self.name,
                f"token service: HTTP {response.status}",
                status_code=response.status,
                transient=response.status >= 500,
            )
        data = _read_all(response, MAX_DOCUMENT, self.name, "token answer")
        try:
            doc = json.loads(data)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError, RecursionError):
            token = None
        if not isinstance(token, str) or len(token) > MAX_TOKEN or not _TOKEN_TEXT.fullmatch(token):
            raise SourceError(self.name, "token service answered no usable token", transient=False)
        self._auth = {"Authorization": f"Bearer {token}"}


def _read_all(response: HttpResponse, cap: int, name: str, what: str) -> bytes:
    parts, total = [], 0
    try:
        while data := response.read(64 << 10):
            total += len(data)
            if total > cap:
                raise SourceError(name, f"{what} larger than {cap} bytes", transient=False)
            parts.append(data)
    finally:
        response.close()
    return b"".join(parts)


class OciSource(BundleSource):
    """A bundle stored in a registry by `ota-bundle push`."""

    def __init__(
        self,
        spec: str,
        limits: DownloadConfig | None = None,
        *,
        tls: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(spec, limits)
        self.ref = parse_ref(spec)
        if tls is None and self.ref.scheme == "https":
            tls = tls_context(self.limits, spec)
        self.tls = tls
        self.credentials = credentials if credentials is not None else read_credentials(self.limits)
        self.ranged: HttpRangeSource | None = None
        self.location: BlobLocation | None = None

    def resolver(self) -> Resolver:
        return Resolver(self.ref, self.name, self.limits, self.tls, self.credentials)

    def _open(self, pace: Pace) -> tuple[RawStream, int | None]:
        resolver = self.resolver()
        # the manifest and token requests under the same retry policy as the blob (throttling registries)
        self.location = RetryPolicy(self.name, self.limits, self.cancel).call(lambda: resolver.resolve(pace), pace)
        self.ranged = HttpRangeSource(self.location.url, resolver.blob_limits(), tls=self.tls)
        self.ranged.cancel = self.cancel
        stream = self.ranged.stream(0, pace)
        stream.open()
        total = self.ranged.known_total
        if total is not None and total != self.location.size:
            stream.close()
            message = f"the registry serves {total} bytes for a blob its manifest says has {self.location.size}"
            raise SourceError(self.name, message, transient=False)
        return stream, self.location.size

    def _ranges(self) -> ResumableSource | None:
        return self.ranged


def read_credentials(limits: DownloadConfig) -> tuple[str, str] | None:
    """`[download] registry_credentials`: a file holding USER:PASSWORD."""
    path = limits.registry_credentials
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(str(path), f"registry credentials: cannot read: {clean(e, 80)}", transient=False) from None
    user, sep, password = text.partition(":")
    if not sep or not user or "\n" in text:
        raise SourceError(str(path), "registry credentials: the file must hold one USER:PASSWORD line", transient=False)
    return user, password
