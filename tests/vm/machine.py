"""One running virtual device: QEMU on a copy of the built disk, its serial
console and monitor on unix sockets, and a shell driven over the console.

    -device i6300esb -action watchdog=reset   the hardware watchdog
    -chardev socket (serial)                   console: GRUB, kernel, systemd, a root shell
    -chardev pty (second_serial)               ttyS1 on a host pty: a technician's serial cable
    -monitor unix socket                       quit (a power cut), system_reset, device_add
    -device qemu-xhci                          a USB bus for sticks (`plug_stick`)
    -netdev user                               the host is 10.0.2.2 (HTTP bundle server)

The console is read by a thread into a log (every boot of the machine, with
host timestamps) that `wait_for` searches from a cursor; `sh` runs a command
in the autologin root shell and returns its output and exit status, framed by
markers. Acceleration: KVM when a probe boot shows it works on this host
(cached per host kernel), TCG otherwise. Everything started is stopped by
`close` (the QEMU process is ours, killed by pid).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.vm import paths

ANSI = re.compile(rb"\x1b\[[0-9;?]*[a-zA-Z]|\x1b[()][0-9A-B]|\r")
PROMPT = "root@edge-ota-vm:"


def kvm_usable() -> bool:
    """Whether a KVM guest really runs here (/dev/kvm can exist and still hang
    guests): a GRUB rescue image that halts, booted once per host kernel."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which("grub-mkrescue") is None:
        return False
    with paths.exclusive(paths.KVM_PROBE):  # one probe per host, whichever worker asks first
        return _probe_kvm()


def _probe_kvm() -> bool:
    marker = paths.cache_dir() / f"kvm-{os.uname().release}"
    if marker.exists():
        return marker.read_text().strip() == "yes"
    work = paths.cache_dir() / "kvm-probe"
    shutil.rmtree(work, ignore_errors=True)
    (work / "iso/boot/grub").mkdir(parents=True)
    (work / "iso/boot/grub/grub.cfg").write_text("serial --unit=0\nterminal_output serial\necho KVM-PROBE-OK\nhalt\n")
    ok = False
    try:
        subprocess.run(["grub-mkrescue", "-o", str(work / "p.iso"), str(work / "iso")], check=True, capture_output=True)
        done = subprocess.run(
            [
                "qemu-system-x86_64",
                "-accel",
                "kvm",
                "-m",
                "128",
                "-nographic",
                "-no-reboot",
                "-cdrom",
                str(work / "p.iso"),
            ],
            capture_output=True,
            timeout=15,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        ok = b"KVM-PROBE-OK" in done.stdout and done.returncode == 0
    except (subprocess.SubprocessError, OSError):
        ok = False
    marker.write_text("yes\n" if ok else "no\n")
    shutil.rmtree(work, ignore_errors=True)
    return ok


class GuestError(AssertionError):
    pass


class Machine:
    """A QEMU virtual device on `disk` (modified in place: pass a copy)."""

    def __init__(
        self,
        disk: Path,
        workdir: Path,
        *,
        log_name: str = "console.log",
        echo: bool = False,
        second_serial: bool = False,
    ) -> None:
        self.disk = disk
        self.work = workdir
        self.work.mkdir(parents=True, exist_ok=True)
        self.serial_path = self.work / "serial.sock"
        self.monitor_path = self.work / "monitor.sock"
        self.log_path = self.work / log_name
        self.echo = echo
        self.second_serial = second_serial  # ttyS1 on a host pty (`serial_pty`)
        self.accel = "kvm" if kvm_usable() else "tcg"
        self.proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._buf = bytearray()
        self._lock = threading.Condition()
        self.cursor = 0
        self.t0 = time.monotonic()
        self.powered_on_at = self.t0

    # -- power -----------------------------------------------------------------

    def start(self) -> None:
        """Power on (a fresh QEMU process on the same disk)."""
        for p in (self.serial_path, self.monitor_path):
            p.unlink(missing_ok=True)
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else ["-accel", "tcg"]
        argv = ["qemu-system-x86_64", *accel, "-m", "1024", "-smp", "2", "-nographic", "-nodefaults"]
        argv += ["-drive", f"file={self.disk},format=raw,if=virtio"]
        argv += ["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,romfile="]
        argv += ["-device", "i6300esb", "-action", "watchdog=reset", "-device", "qemu-xhci,id=xhci"]
        argv += ["-chardev", f"socket,id=ser0,path={self.serial_path},server=on,wait=on", "-serial", "chardev:ser0"]
        if self.second_serial:
            argv += ["-chardev", "pty,id=ser1", "-serial", "chardev:ser1"]
        argv += ["-monitor", f"unix:{self.monitor_path},server=on,wait=off"]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(self.work / "qemu.err").open("ab")
        )
        deadline = time.monotonic() + 30
        while not self.serial_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise GuestError(f"QEMU did not start: {(self.work / 'qemu.err').read_text()[-2000:]}")
            time.sleep(0.05)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.serial_path))
        self._sock = s
        self.powered_on_at = time.monotonic()
        self._note(f"power on ({self.accel})")
        self._reader = threading.Thread(target=self._read, args=(s,), daemon=True)
        self._reader.start()

    def power_cut(self) -> None:
        """Power off without a shutdown: QEMU `quit` on the monitor."""
        self._note("power cut (monitor quit)")
        with contextlib.suppress(OSError):
            self.monitor("quit")
        self._stop()

    def close(self) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        with self._lock:
            self.cursor = len(self._buf)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self._stop()

    def monitor(self, command: str) -> str:
        """One human monitor command; returns what QEMU answered."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as m:
            m.settimeout(10)
            m.connect(str(self.monitor_path))
            m.sendall(command.encode() + b"\n")
            out = b""
            with contextlib.suppress(TimeoutError, OSError):
                m.settimeout(1)
                while chunk := m.recv(4096):
                    out += chunk
        return ANSI.sub(b"", out).decode(errors="replace")

    def plug_stick(self, image: Path, name: str = "stick") -> None:
        """Plug a USB stick (a raw image) into the running machine."""
        for command in (
            f"drive_add 0 if=none,id={name},file={image},format=raw",
            f"device_add usb-storage,bus=xhci.0,drive={name},id={name}-dev",
        ):
            answer = self.monitor(command)
            if "rror" in answer or "could not" in answer:
                raise GuestError(f"monitor {command!r}: {answer.strip()[-500:]}")

    def serial_pty(self) -> str:
        """The host pty of the guest's ttyS1 (`second_serial`), as the monitor names it."""
        answer = self.monitor("info chardev")
        m = re.search(r"ser1: filename=pty:(/dev/pts/\d+)", answer)
        if m is None:
            raise GuestError(f"no pty for ser1 in 'info chardev': {answer.strip()[-500:]}")
        return m.group(1)

    def unplug_stick(self, name: str = "stick") -> None:
        self.monitor(f"device_del {name}-dev")

    # -- console ----------------------------------------------------------------

    def _read(self, s: socket.socket) -> None:
        carry = b""
        with self.log_path.open("ab") as log:
            while True:
                try:
                    chunk = s.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                chunk, carry = carry + chunk, b""
                esc = chunk.rfind(b"\x1b")
                if (
                    esc >= 0
                    and not re.match(rb"\x1b(\[[0-9;?]*[a-zA-Z]|[()][0-9A-B])", chunk[esc:])
                    and len(chunk) - esc < 16
                ):
                    chunk, carry = chunk[:esc], chunk[esc:]  # an escape sequence split between reads
                clean = ANSI.sub(b"", chunk)
                log.write(clean)
                log.flush()
                if self.echo:
                    os.write(1, chunk)
                with self._lock:
                    self._buf += clean
                    self._lock.notify_all()

    def _note(self, what: str) -> None:
        line = f"\n=== [{time.monotonic() - self.t0:7.1f}s] {what} ===\n".encode()
        with self._lock:
            self._buf += line
        with self.log_path.open("ab") as log:
            log.write(line)

    def text(self) -> str:
        with self._lock:
            return self._buf.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of `pattern` in the console after the cursor; the
        cursor moves past it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                text = self._buf[self.cursor :].decode(errors="replace")
                m = rx.search(text)
                if m:
                    self.cursor += len(text[: m.end()].encode())
                    return m
                left = deadline - time.monotonic()
                if self.proc is None or self.proc.poll() is not None:
                    err = (self.work / "qemu.err").read_text(errors="replace")[-2000:]
                    raise GuestError(f"the machine is off while waiting for {pattern!r}; QEMU said:\n{err}")
                if left <= 0:
                    tail = text[-3000:]
                    raise GuestError(f"no {pattern!r} on the console within {timeout:.0f} s; last output:\n{tail}")
                self._lock.wait(min(left, 1.0))

    def send(self, data: str) -> None:
        if self._sock is None:
            raise GuestError("the machine is off")
        self._sock.sendall(data.encode())

    def wait_shell(self, timeout: float = 600) -> None:
        """Waits for the autologin shell and quiets it (no echo, no prompt noise)."""
        self.wait_for(re.escape(PROMPT), timeout)
        self.sh("stty -echo cols 200; dmesg -n 1; export SYSTEMD_PAGER= PAGER=cat", timeout=60)

    def sh(self, command: str, timeout: float = 300, check: bool = True) -> tuple[int, str]:
        """Runs `command` in the guest's root shell: (exit status, output)."""
        tag = secrets.token_hex(4)
        # The marker is assembled by the shell, so an echoed command line never matches it.
        self.send(f'{command}; echo "@@{tag}"\'-END\' "$?"\n')
        m = self.wait_for(rf"(?s)(.*?)@@{tag}-END (\d+)", timeout)
        out = m.group(1)
        out = "\n".join(line for line in out.split("\n") if not line.startswith(PROMPT) and command not in line)
        status = int(m.group(2))
        if check and status:
            raise GuestError(f"guest command {command!r} failed ({status}):\n{out[-3000:]}")
        return status, out

    def elapsed(self) -> float:
        return time.monotonic() - self.powered_on_at


@contextlib.contextmanager
def running(disk: Path, workdir: Path, *, echo: bool = False) -> Iterator[Machine]:
    m = Machine(disk, workdir, echo=echo)
    try:
        yield m
    finally:
        m.kill()
