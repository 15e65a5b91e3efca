"""What every fuzz harness shares: the fixed test signing key, the rule for a
finding, and the entry point that hands a harness to atheris.

A harness is a module with `one_input(data: bytes) -> None` and a docstring.
It calls a reader of untrusted bytes and lets any exception escape except the
reader's documented errors (`OtaError` and its subclasses): atheris then
reports the input as a crash, and libFuzzer's -timeout reports a hang.
The harnesses import nothing from atheris at module level, so the seed check in
tests/unit/test_fuzz_harnesses.py runs them under plain pytest.

With FUZZ_FINDINGS=DIR in the environment (tests/fuzz/run.py sets it) a finding
does not stop the run: the first input of each distinct finding (exception type
and the line that raised it) is written to DIR with its traceback, and fuzzing
goes on, so one run reports every distinct crash instead of only the first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bundler.format.signing import Keyring, key_id
from ota_common.errors import OtaError

# Deterministic so that the seed generator and the harnesses agree; trusts nothing real.
TEST_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"edge-ota fuzz test key").digest())
TEST_KEYRING = Keyring({key_id(TEST_KEY.public_key()): TEST_KEY.public_key()}, "fuzz test keyring")
EXPECTED: tuple[type[BaseException], ...] = (OtaError,)

OneInput = Callable[[bytes], None]
_scratch: list[tempfile.TemporaryDirectory[str]] = []


def scratch_dir() -> Path:
    """One temporary directory per process for harnesses that read files (removed at exit)."""
    if not _scratch:
        _scratch.append(tempfile.TemporaryDirectory(prefix="edge-ota-fuzz-"))
    return Path(_scratch[0].name)


def guarded(one_input: OneInput) -> OneInput:
    """`one_input` with the documented errors swallowed: anything else is a finding."""
    findings = os.environ.get("FUZZ_FINDINGS")
    seen: set[str] = set()

    def run(data: bytes) -> None:
        try:
            one_input(data)
        except EXPECTED:
            pass
        except Exception as e:
            if not findings:
                raise
            _record(Path(findings), seen, e, data)

    return run


def _record(directory: Path, seen: set[str], error: Exception, data: bytes) -> None:
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if any(f"/{pkg}/" in f.filename for pkg in ("agent", "bundler", "hw"))]
    where = (ours or frames)[-1]  # the project's line that let it escape
    signature = f"{type(error).__name__} at {Path(where.filename).name}:{where.lineno}"
    if signature in seen:
        return
    seen.add(signature)
    name = f"finding-{hashlib.sha256(signature.encode()).hexdigest()[:12]}"
    (directory / f"{name}.input").write_bytes(data)
    text = "".join(traceback.format_exception(error))
    (directory / f"{name}.txt").write_text(f"{signature}\n\n{text}")


def main(one_input: OneInput) -> None:
    """Fuzz `one_input` with atheris (argv are libFuzzer's: corpus dirs, -max_total_time, ...)."""
    import atheris  # noqa: PLC0415  # only here: the harnesses must import without it

    logging.disable(logging.CRITICAL)  # readers log what they skip; at fuzzing speed that is noise
    atheris.instrument_all()
    atheris.Setup(sys.argv, guarded(one_input))
    atheris.Fuzz()
