"""The console's line discipline: the bytes read from the serial port, split into
text lines and upload frames (`ota_common.frames`), whatever the wire carries.
Sans-IO: `feed(bytes)` returns what was recognised; no threads, no port.

- A line ends at LF or CR (CR LF gives one line; empty lines are skipped). A line
  longer than `max_line` bytes is dropped as it arrives (memory stays bounded by
  `max_line`, whatever the length) and reported once as `TooLong`.
- A line that is not UTF-8 text, or holds control characters (binary noise, a NUL
  byte: what a UART delivers for a break condition), is reported as `Noise`
  and never reaches the command parser.
- A frame starts at the frame magic, anywhere (the partial line before it is
  dropped). A header whose CRC fails is noise: scanning resumes one byte later,
  so a corrupted length never makes the reader wait for bytes that will not come.
  A frame whose CRC-32 fails is `BadFrame` (with the offset its header named).
  A frame left unfinished when the line goes quiet is dropped (`expire`).

Owns splitting; not what a line means (agent.console.session) nor the port.
"""

from __future__ import annotations

from dataclasses import dataclass

from ota_common.frames import HEADER_SIZE, MAGIC, Frame, FrameError, decode_frame, decode_header

MAX_LINE = 4096


@dataclass(frozen=True, slots=True)
class Line:
    text: str


@dataclass(frozen=True, slots=True)
class TooLong:
    limit: int


@dataclass(frozen=True, slots=True)
class Noise:
    size: int  # bytes dropped


@dataclass(frozen=True, slots=True)
class BadFrame:
    transfer: int
    offset: int
    reason: str


Item = Line | TooLong | Noise | Frame | BadFrame


def _line_end(buf: bytearray, stop: int) -> int:
    ends = [i for i in (buf.find(b"\n", 0, stop), buf.find(b"\r", 0, stop)) if i >= 0]
    return min(ends) if ends else -1


def _is_text(text: str) -> bool:
    return all(ch == "\t" or (ch.isprintable() or ch == " ") for ch in text)


class Splitter:
    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._discarding = False  # inside an over-long line: drop up to its end
        self.dropped = 0  # bytes dropped as noise or over-long lines, ever

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Item]:
        self._buf += data
        out: list[Item] = []
        while self._step(out):
            pass
        return out

    def _step(self, out: list[Item]) -> bool:
        """Take one item off the buffer; False when more bytes are needed."""
        buf = self._buf
        if not buf:
            return False
        magic = buf.find(MAGIC)
        end = _line_end(buf, magic if magic >= 0 else len(buf))
        if magic >= 0 and (end < 0 or magic < end):
            if magic:
                self._drop(magic, out, partial_line=True)
                return True
            return self._frame(out)
        if end >= 0:
            raw = bytes(buf[:end])
            del buf[: end + 1]
            if self._discarding:
                self._discarding = False
                self.dropped += len(raw)
            elif raw:
                out.append(self._line(raw))
            return True
        # No line end and no whole magic yet: keep a possible magic prefix at the tail.
        keep = _magic_prefix_at_tail(buf)
        if len(buf) - keep > self.max_line or (self._discarding and len(buf) > keep):
            if not self._discarding:
                out.append(TooLong(self.max_line))
                self._discarding = True
            self.dropped += len(buf) - keep
            del buf[: len(buf) - keep]
        return False

    def expire(self) -> Item | None:
        """The line went quiet: a frame begun but not finished (a cable pulled mid-frame)
        will not be finished; drop it, so the next line is not swallowed as its payload.
        A partial text line stays (a person types slowly)."""
        if self._buf.startswith(MAGIC):
            n = len(self._buf)
            self._buf.clear()
            self.dropped += n
            return Noise(n)
        return None

    def _drop(self, n: int, out: list[Item], *, partial_line: bool) -> None:
        del self._buf[:n]
        self.dropped += n
        if self._discarding:
            self._discarding = False
        elif partial_line:
            out.append(Noise(n))

    def _frame(self, out: list[Item]) -> bool:
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return False
        try:
            header = decode_header(buf)
        except FrameError:
            self._drop(1, out, partial_line=False)  # not a frame start after all: scan on
            return True
        if len(buf) < header.frame_size:
            return False
        try:
            out.append(decode_frame(header, buf))
        except FrameError as e:
            out.append(BadFrame(header.transfer, header.offset, str(e)))
        del buf[: header.frame_size]
        self._discarding = False
        return True

    def _line(self, raw: bytes) -> Item:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.dropped += len(raw)
            return Noise(len(raw))
        if not _is_text(text):
            self.dropped += len(raw)
            return Noise(len(raw))
        return Line(text)


def _magic_prefix_at_tail(buf: bytearray) -> int:
    for n in range(min(len(MAGIC) - 1, len(buf)), 0, -1):
        if buf.endswith(MAGIC[:n]):
            return n
    return 0
