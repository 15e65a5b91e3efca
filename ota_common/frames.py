"""The wire form of a bundle upload over a serial console, shared by the device
(`agent.console`) and the technician's client (`bundler.console`): data frames
host -> device, and the upload control lines device -> host (docs/console.md).

A data frame (all integers big-endian):

    offset  size  field
    0       4     magic     A5 4F 54 46 (0xA5 "OTF")
    4       1     version   1
    5       1     kind      1 = data
    6       2     length    payload bytes, 1..MAX_PAYLOAD
    8       4     transfer  the id the device gave the upload
    12      8     offset    where the payload goes in the bundle (a multiple of the frame size)
    20      2     hcrc      CRC-16/CCITT (binascii.crc_hqx, initial 0xFFFF) of bytes 4..19
    22      N     payload
    22+N    4     crc       CRC-32 (zlib.crc32) of bytes 4..22+N (header fields and payload)

The header CRC lets a receiver reject a frame whose length field was hit by noise
before it waits for that many bytes; the offset is the sequence number (a repeated
offset is a duplicate, a higher one than expected is out of order).

Control lines (device -> host, one line each, in text and JSON mode alike):

    @ack TRANSFER NEXT LIMIT   the device wants NEXT; it may be sent frames below LIMIT
    @nak TRANSFER NEXT REASON  a frame was refused (bad CRC, unknown transfer, ...): send from NEXT

Standard library only.
"""

from __future__ import annotations

import binascii
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"\xa5OTF"
VERSION = 1
KIND_DATA = 1
_HEADER = struct.Struct(">4sBBHIQH")
HEADER_SIZE = _HEADER.size  # 22
TRAILER_SIZE = 4
OVERHEAD = HEADER_SIZE + TRAILER_SIZE
MAX_PAYLOAD = 16384
DEFAULT_PAYLOAD = 4096
CHALLENGE_PREFIX = "edge-ota console challenge v1 "  # a client signs only texts that start so


class FrameError(ValueError):
    """A frame that is not what the format says (one line: what is wrong)."""


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    kind: int
    length: int
    transfer: int
    offset: int

    @property
    def frame_size(self) -> int:
        return OVERHEAD + self.length


@dataclass(frozen=True, slots=True)
class Frame:
    transfer: int
    offset: int
    payload: bytes


def _hcrc(fields: bytes) -> int:
    return binascii.crc_hqx(fields, 0xFFFF)


def encode(transfer: int, offset: int, payload: bytes) -> bytes:
    if not 1 <= len(payload) <= MAX_PAYLOAD:
        raise FrameError(f"a payload of {len(payload)} bytes is outside 1..{MAX_PAYLOAD}")
    head = _HEADER.pack(MAGIC, VERSION, KIND_DATA, len(payload), transfer, offset, 0)
    head = head[:-2] + struct.pack(">H", _hcrc(head[4:-2]))
    body = head + payload
    return body + struct.pack(">I", zlib.crc32(body[4:]))


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """The header at the start of `data` (at least HEADER_SIZE bytes, starting with MAGIC)."""
    raw = bytes(data[:HEADER_SIZE])
    if len(raw) < HEADER_SIZE:
        raise FrameError(f"a frame header needs {HEADER_SIZE} bytes, got {len(raw)}")
    magic, version, kind, length, transfer, offset, hcrc = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise FrameError("no frame magic")
    if _hcrc(raw[4:-2]) != hcrc:
        raise FrameError("header CRC mismatch")
    if version != VERSION:
        raise FrameError(f"frame version {version}, this side speaks {VERSION}")
    if kind != KIND_DATA:
        raise FrameError(f"unknown frame kind {kind}")
    if not 1 <= length <= MAX_PAYLOAD:
        raise FrameError(f"payload length {length} outside 1..{MAX_PAYLOAD}")
    return Header(version, kind, length, transfer, offset)


def decode_frame(header: Header, data: bytes | bytearray | memoryview) -> Frame:
    """The whole frame (header.frame_size bytes at the start of `data`), its CRC checked."""
    raw = bytes(data[: header.frame_size])
    if len(raw) < header.frame_size:
        raise FrameError(f"the frame needs {header.frame_size} bytes, got {len(raw)}")
    (crc,) = struct.unpack_from(">I", raw, header.frame_size - TRAILER_SIZE)
    if zlib.crc32(raw[4 : header.frame_size - TRAILER_SIZE]) != crc:
        raise FrameError(f"CRC-32 mismatch in the frame at offset {header.offset}")
    return Frame(header.transfer, header.offset, raw[HEADER_SIZE : header.frame_size - TRAILER_SIZE])


def efficiency(payload: int) -> float:
    """Payload bytes per wire byte for frames of `payload` bytes."""
    return payload / (payload + OVERHEAD)


# --- control lines -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Control:
    kind: str  # "ack" or "nak"
    transfer: int
    next: int
    limit: int = 0  # ack: frames below it may be sent
    reason: str = ""  # nak


def ack_line(transfer: int, next_offset: int, limit: int) -> str:
    return f"@ack {transfer} {next_offset} {limit}"


def nak_line(transfer: int, next_offset: int, reason: str) -> str:
    return f"@nak {transfer} {next_offset} {reason.replace(chr(10), ' ')[:200]}"


def parse_control(line: str) -> Control | None:
    """A control line, or None when `line` is not one (or is malformed)."""
    if not line.startswith("@"):
        return None
    parts = line.split(" ", 3)
    try:
        if parts[0] == "@ack" and len(parts) == 4:
            return Control("ack", int(parts[1]), int(parts[2]), limit=int(parts[3]))
        if parts[0] == "@nak" and len(parts) >= 3:
            return Control("nak", int(parts[1]), int(parts[2]), reason=parts[3] if len(parts) > 3 else "")
    except ValueError:
        return None
    return None
