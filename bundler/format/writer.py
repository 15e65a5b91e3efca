"""Assembling a bundle file from a manifest, an op table and a payload file.

Owns the on-disk order of regions, the signing step, and publishing the file
(a temporary file beside the output, fsynced, then renamed or linked into
place); it does not decide which ops an image needs (that is `bundler.build`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.format.header import Header
from bundler.format.manifest import Manifest
from bundler.format.ops import Op, pack_table
from bundler.format.signing import pack_signatures, sign, signature_block_length


def op_table_digest(ops: Sequence[Op]) -> str:
    return hashlib.sha256(pack_table(ops)).hexdigest()


def write_bundle(
    out: BinaryIO, manifest: Manifest, ops: Sequence[Op], payload: IO[bytes], keys: Sequence[Ed25519PrivateKey]
) -> Header:
    """Write header, manifest, signatures, op table, then copy the payload."""
    if not keys:
        raise ValueError("at least one signing key is required")
    table = pack_table(ops)
    if hashlib.sha256(table).hexdigest() != manifest.op_table_sha256:
        raise ValueError("manifest does not pin this op table")
    manifest_bytes = manifest.encode()
    header = Header(
        manifest_length=len(manifest_bytes),
        signature_length=signature_block_length(len(keys)),
        op_count=len(ops),
        payload_length=manifest.payload_length,
    )
    header_bytes = header.pack()
    signatures = pack_signatures(sign(keys, header_bytes, manifest_bytes))
    out.write(header_bytes)
    out.write(manifest_bytes)
    out.write(signatures)
    out.write(table)
    shutil.copyfileobj(payload, out, 1 << 20)
    return header


def write_bundle_file(
    path: Path,
    manifest: Manifest,
    ops: Sequence[Op],
    payload: Path | IO[bytes],
    keys: Sequence[Ed25519PrivateKey],
    *,
    overwrite: bool = True,
    check: Callable[[Path], None] | None = None,
) -> Header:
    """Write the bundle to a new, uniquely named temporary file beside `path`,
    fsync it, run `check` on it (e.g. read it back), then publish it as `path`
    and fsync the directory. An existing `path` is replaced only if
    `overwrite`; otherwise publishing is atomic and never clobbers a file that
    appeared meanwhile. On any failure, KeyboardInterrupt included, the
    temporary file is removed and `path` is untouched; OS errors name `path`,
    never the temporary file."""
    fd, tmp_name = _create_temp(path)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            umask = os.umask(0o022)
            os.umask(umask)
            os.fchmod(out.fileno(), 0o666 & ~umask)  # mkstemp's 0600 is for secrets; a bundle is public
            if isinstance(payload, Path):
                with payload.open("rb") as source:
                    header = write_bundle(out, manifest, ops, source, keys)
            else:
                header = write_bundle(out, manifest, ops, payload, keys)
            out.flush()
            os.fsync(out.fileno())
        if check is not None:
            check(tmp)
        _publish(tmp, path, overwrite)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, FileExistsError) and e.filename == str(path):
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return header


def _create_temp(path: Path) -> tuple[int, str]:
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    return fd, name


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        tmp.replace(path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails if `path` exists
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists (not replaced)", str(path)) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        if path.exists() or path.is_symlink():  # no hard links here: check, then rename
            raise FileExistsError(errno.EEXIST, "exists (not replaced)", str(path)) from None
        tmp.replace(path)
        return
    tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
