"""A client of the OCI distribution API (the `/v2/` HTTP API of Docker
Distribution, Harbor, GHCR, ECR, ...) for the build host, on `http.client`:
pull an image into an OCI layout, push blobs and manifests.

Authentication follows the registry's `WWW-Authenticate` challenge: `Bearer`
(a token fetched from the challenge's realm for `repository:REPO:pull[,push]`,
with the credentials as basic auth when there are any) or `Basic`. TLS uses
the system CA store, or `ca_file`; `insecure` talks plain HTTP (a registry on
a loopback port, a lab). Redirects (blobs served from object storage) are
followed without the registry's Authorization header on another host.

Every blob is verified against its digest while it is streamed to disk;
manifests fetched by digest are verified too, and bounded in size. With
`skopeo` (`RegistryOptions.skopeo`), pulling is `skopeo copy` into the layout
instead."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bundler.oci.blobs import CHUNK, MAX_JSON, VerifyingReader, check_digest, sha256_digest
from bundler.oci.errors import DigestMismatch, OciError, RegistryError
from bundler.oci.source import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MT_MANIFEST,
    REF_NAME,
    Ref,
    choose_manifest,
)
from ota_common.retryafter import parse_retry_after

ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
_PARAM = re.compile(r'([A-Za-z_]+)="([^"]*)"')
TIMEOUT = 60.0
RETRIES = 5  # attempts per request when the registry throttles or is briefly away
RETRY_STATUS = frozenset({429, 502, 503, 504})
BACKOFF = 1.0  # seconds before the second attempt, doubling after
MAX_WAIT = 60.0  # the longest wait, whatever Retry-After asks


@dataclass(frozen=True, slots=True)
class RegistryOptions:
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    insecure: bool = False  # plain HTTP
    skopeo: bool = False


def split_host(path: str) -> tuple[str, str]:
    host, _, repo = path.partition("/")
    return host, repo


class Registry:
    """One registry host; keeps one connection and the tokens it was given."""

    def __init__(self, host: str, options: RegistryOptions | None = None) -> None:
        self.host = host
        self.options = options or RegistryOptions()
        self.scheme = "http" if self.options.insecure else "https"
        self._tokens: dict[str, str] = {}
        self._basic = False
        self.sleep: Callable[[float], None] = time.sleep
        self.notify: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)

    # --- transport -------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        ca = self.options.ca_file
        return ssl.create_default_context(cafile=str(ca) if ca else None)

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if scheme == "https":
            return http.client.HTTPSConnection(netloc, timeout=TIMEOUT, context=self._context())
        return http.client.HTTPConnection(netloc, timeout=TIMEOUT)

    def _credentials(self) -> str | None:
        o = self.options
        if o.username is None:
            return None
        raw = f"{o.username}:{o.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def request(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        body: bytes | IO[bytes] | None = None,
        what: str,
        redirects: int = 5,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request, answering one auth challenge and following
        redirects; returns the open connection and response (caller closes).

        A throttled or briefly unavailable registry (429, 502, 503, 504, or no
        connection) is asked again up to RETRIES times, after its `Retry-After`
        (capped at MAX_WAIT seconds) or an exponential backoff; a body that
        cannot be rewound is sent once."""
        url = f"{self.scheme}://{self.host}{path}"
        resendable = body is None or isinstance(body, bytes) or hasattr(body, "seek")
        for attempt in range(1, RETRIES + 1):
            last = attempt == RETRIES or not resendable
            try:
                conn, response = self._authorized(method, url, scope, headers or {}, body, what, redirects)
            except RegistryError as e:
                if last or not e.transient:
                    raise
                self._wait(what, str(e), BACKOFF * 2 ** (attempt - 1), attempt)
            else:
                if response.status not in RETRY_STATUS or last:
                    return conn, response
                asked = parse_retry_after(response.getheader("Retry-After"))
                response.read(MAX_JSON)
                conn.close()
                wait = BACKOFF * 2 ** (attempt - 1) if asked is None else asked
                self._wait(what, f"HTTP {response.status} {response.reason}", wait, attempt)
            if hasattr(body, "seek"):
                body.seek(0)  # type: ignore[union-attr]
        raise AssertionError("unreachable")

    def _wait(self, what: str, why: str, seconds: float, attempt: int) -> None:
        seconds = min(seconds, MAX_WAIT)
        self.notify(f"{what}: {why}; asking again in {seconds:.0f} s (attempt {attempt + 1} of {RETRIES})")
        self.sleep(seconds)

    def _authorized(  # noqa: PLR0917
        self, method: str, url: str, scope: str, headers: dict[str, str], body: Any, what: str, redirects: int
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        for attempt in range(2):
            conn, response = self._send(method, url, scope, headers, body, what, redirects)
            if response.status != 401:
                return conn, response
            if attempt == 1:
                conn.close()
                refused = "the credentials" if self.options.username is not None else "anonymous access (--creds)"
                raise RegistryError(what, f"the registry refused {refused}", 401)
            challenge = response.getheader("WWW-Authenticate", "")
            response.read(MAX_JSON)
            conn.close()
            self._answer(challenge, scope, what)
            if hasattr(body, "seek"):
                body.seek(0)
        raise AssertionError("unreachable")

    def _send(  # noqa: PLR0917
        self, method: str, url: str, scope: str, headers: dict[str, str], body: Any, what: str, redirects: int
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        own_host = True
        for _ in range(redirects + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise RegistryError(what, f"redirect to unsupported URL {url[:120]!r}")
            sent = dict(headers)
            auth = self._authorization(scope) if own_host else None
            if auth:
                sent["Authorization"] = auth
            conn = self._connection(parts.scheme, parts.netloc)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request(method, target or "/", body=body, headers=sent)
                response = conn.getresponse()
            except ssl.SSLError as e:
                conn.close()
                raise RegistryError(what, f"TLS: {e.reason or e}") from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise RegistryError(what, f"cannot reach {parts.netloc}: {e}", transient=True) from None
            if response.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                location = response.getheader("Location", "")
                response.read(MAX_JSON)
                conn.close()
                url = urllib.parse.urljoin(url, location)
                own_host = urllib.parse.urlsplit(url).netloc == self.host
                continue
            return conn, response
        raise RegistryError(what, f"more than {redirects} redirects")

    def _authorization(self, scope: str) -> str | None:
        if scope in self._tokens:
            return f"Bearer {self._tokens[scope]}"
        if self._basic:
            return self._credentials()
        return None

    def _answer(self, challenge: str, scope: str, what: str) -> None:
        kind = challenge.split(" ", 1)[0].lower()
        if kind == "basic":
            if self._credentials() is None:
                raise RegistryError(what, "the registry asks for a user name and password (--creds)", 401)
            if self._basic:
                raise RegistryError(what, "the registry refused the credentials", 401)
            self._basic = True
            return
        if kind != "bearer":
            raise RegistryError(what, f"unsupported authentication challenge {challenge[:80]!r}", 401)
        params = dict(_PARAM.findall(challenge))
        realm = params.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(what, f"token realm {realm[:80]!r} is not an http(s) URL", 401)
        query = {"scope": params.get("scope", scope)}
        if "service" in params:
            query["service"] = params["service"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        parts = urllib.parse.urlsplit(url)
        conn = self._connection(parts.scheme, parts.netloc)
        headers = {}
        cred = self._credentials()
        if cred:
            headers["Authorization"] = cred
        try:
            conn.request("GET", parts.path + "?" + parts.query, headers=headers)
            response = conn.getresponse()
            data = response.read(MAX_JSON)
        except (OSError, http.client.HTTPException) as e:
            raise RegistryError(what, f"token service {parts.netloc}: {e}") from None
        finally:
            conn.close()
        if response.status != 200:
            raise RegistryError(what, f"token service refused: HTTP {response.status}", response.status)
        try:
            doc = json.loads(data)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(what, "token service answered no token")
        self._tokens[scope] = token

    # --- the API ---------------------------------------------------------

    def _fail(self, response: http.client.HTTPResponse, what: str) -> RegistryError:
        body = response.read(4096).decode("utf-8", "replace")
        detail = ""
        try:
            errors = json.loads(body).get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors[:3] if isinstance(e, dict))
        except (ValueError, AttributeError):
            pass
        return RegistryError(
            what, f"HTTP {response.status} {response.reason}" + (f" ({detail})" if detail else ""), response.status
        )

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest); verified when `reference` is a digest."""
        what = f"docker://{self.host}/{repo}:{reference}"
        conn, r = self.request(
            "GET",
            f"/v2/{repo}/manifests/{reference}",
            scope=f"repository:{repo}:pull",
            headers={"Accept": ACCEPT},
            what=what,
        )
        try:
            if r.status != 200:
                raise self._fail(r, what)
            data = r.read(MAX_JSON + 1)
            if len(data) > MAX_JSON:
                raise RegistryError(what, f"manifest larger than {MAX_JSON} bytes")
            media = (r.getheader("Content-Type") or "").split(";")[0].strip()
        finally:
            conn.close()
        digest = sha256_digest(data)
        if reference.startswith("sha256:") and digest != reference:
            raise DigestMismatch(f"{what}: manifest", reference, digest)
        try:
            doc = json.loads(data)
        except ValueError:
            raise RegistryError(what, "manifest is not JSON") from None
        return data, (doc.get("mediaType") if isinstance(doc, dict) else None) or media, digest

    def fetch_blob(self, repo: str, digest: str, size: int | None, dest: Path) -> None:
        what = f"docker://{self.host}/{repo}@{digest[:19]}"
        conn, r = self.request("GET", f"/v2/{repo}/blobs/{digest}", scope=f"repository:{repo}:pull", what=what)
        tmp = dest.with_name(dest.name + ".part")
        try:
            if r.status != 200:
                raise self._fail(r, what)
            reader = VerifyingReader(r, digest, what, size)
            with tmp.open("wb") as out:
                while data := reader.read(CHUNK):
                    out.write(data)
                reader.finish()
            os.replace(tmp, dest)
        except (OSError, http.client.HTTPException) as e:
            raise RegistryError(what, f"download failed: {e}") from None
        finally:
            conn.close()
            tmp.unlink(missing_ok=True)

    def has_blob(self, repo: str, digest: str) -> bool:
        what = f"docker://{self.host}/{repo}@{digest[:19]}"
        conn, r = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", scope=f"repository:{repo}:pull,push", what=what)
        try:
            if r.status not in (200, 404):  # a refusal is not "absent": uploading would fail the same way
                raise self._fail(r, what)
        finally:
            conn.close()
        return r.status == 200

    def push_blob(self, repo: str, digest: str, size: int, body: IO[bytes] | bytes) -> None:
        """A monolithic upload: POST for a session, PUT the bytes with the digest."""
        what = f"docker://{self.host}/{repo} blob {digest[:19]}"
        if self.has_blob(repo, digest):
            return
        scope = f"repository:{repo}:pull,push"
        conn, r = self.request(
            "POST", f"/v2/{repo}/blobs/uploads/", scope=scope, headers={"Content-Length": "0"}, what=what
        )
        try:
            r.read(MAX_JSON)
            if r.status != 202:
                raise self._fail(r, what)
            location = r.getheader("Location", "")
        finally:
            conn.close()
        parts = urllib.parse.urlsplit(urllib.parse.urljoin(f"{self.scheme}://{self.host}/", location))
        query = parts.query + ("&" if parts.query else "") + urllib.parse.urlencode({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        conn, r = self.request("PUT", f"{parts.path}?{query}", scope=scope, headers=headers, body=body, what=what)
        try:
            if r.status != 201:
                raise self._fail(r, what)
            r.read(MAX_JSON)
        finally:
            conn.close()

    def push_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        what = f"docker://{self.host}/{repo}:{reference}"
        headers = {"Content-Type": media_type, "Content-Length": str(len(data))}
        conn, r = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            scope=f"repository:{repo}:pull,push",
            headers=headers,
            body=data,
            what=what,
        )
        try:
            if r.status != 201:
                raise self._fail(r, what)
            r.read(MAX_JSON)
        finally:
            conn.close()
        return sha256_digest(data)


def _write_layout(root: Path, manifest: bytes, media: str, digest: str, tag: str) -> None:
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": media, "digest": digest, "size": len(manifest), "annotations": {REF_NAME: tag}}],
    }
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps(index))


def pull_to_layout(ref: Ref, root: Path, options: RegistryOptions | None, want: tuple[str, str] | None) -> str:
    """Copy the image `ref` names into an OCI layout at `root`; returns its tag there."""
    options = options or RegistryOptions()
    tag = ref.tag or "pulled"
    if options.skopeo:
        return _skopeo_pull(ref, root, options, tag)
    host, repo = split_host(ref.path)
    reg = Registry(host, options)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    data, media, digest = reg.get_manifest(repo, ref.digest or tag)
    for _ in range(4):
        if media not in INDEX_TYPES:
            break
        chosen = choose_manifest(json.loads(data), f"docker://{ref.path}", None, want)
        data, media, digest = reg.get_manifest(repo, check_digest(chosen.get("digest"), "index entry"))
    if media not in MANIFEST_TYPES:
        raise RegistryError(f"docker://{ref.path}", f"not an image manifest ({media[:80]!r})")
    manifest = json.loads(data)
    (blobs / digest.split(":")[1]).write_bytes(data)
    descriptors = [manifest.get("config"), *(manifest.get("layers") or [])]
    for d in descriptors:
        if not isinstance(d, dict):
            raise RegistryError(f"docker://{ref.path}", "manifest descriptors must be objects")
        bdigest = check_digest(d.get("digest"), "blob")
        if bdigest.startswith("sha256:"):
            size = d.get("size")
            reg.fetch_blob(repo, bdigest, size if isinstance(size, int) else None, blobs / bdigest.split(":")[1])
        else:
            raise RegistryError(f"docker://{ref.path}", f"blob digest algorithm of {bdigest[:19]} not supported")
    _write_layout(root, data, media or MT_MANIFEST, digest, tag)
    return tag


def _skopeo_pull(ref: Ref, root: Path, options: RegistryOptions, tag: str) -> str:
    if shutil.which("skopeo") is None:
        raise OciError("--skopeo: skopeo not found (install the skopeo package)")
    src = f"docker://{ref.path}" + (f"@{ref.digest}" if ref.digest else f":{tag}")
    argv = ["skopeo", "copy", "--quiet"]
    if options.insecure:
        argv.append("--src-tls-verify=false")
    if options.ca_file:
        argv += ["--src-cert-dir", str(options.ca_file.parent)]
    if options.username is not None:
        argv += ["--src-creds", f"{options.username}:{options.password or ''}"]
    done = subprocess.run(
        [*argv, src, f"oci:{root}:{tag}"], capture_output=True, text=True, errors="replace", check=False
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        raise RegistryError(src, f"skopeo copy failed: {last}")
    return tag
