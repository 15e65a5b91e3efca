"""The durable outbox: framed records that survive torn appends, acknowledgement
that survives restarts and power cuts, bounds with a drop policy that is
never silent, and a damaged file set aside instead of emptied."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from agent import outbox as outbox_mod
from agent.events import Event
from agent.outbox import ACKED_FILE, FILE, MAX_RECORD_BYTES, Outbox, Record, encode

ROOT = Path(__file__).resolve().parents[2]


def result(n: int) -> Event:
    return Event(event="install", result="ok", reason=f"report {n}", txn=str(n))


def progress(n: int) -> Event:
    return Event(event="progress", result="running", reason=f"progress {n}", txn=str(n))


def txns(records: list[Record]) -> list[str | None]:
    return [r.event.txn for r in records]


def corrupt_files(d: Path) -> list[Path]:
    return sorted(d.glob(f"{FILE}.corrupt-*"))


# --- framing ----------------------------------------------------------------


def test_each_record_is_one_line_with_a_crc_of_its_json(tmp_path: Path) -> None:
    record = Outbox(tmp_path).append(
        Event(event="install", result="ok", reason="fine\nota-agent: install: ok", txn="t")
    )
    line = (tmp_path / FILE).read_bytes()
    assert line.count(b"\n") == 1
    crc, _, body = line.rstrip(b"\n").partition(b" ")
    assert int(crc, 16) == zlib.crc32(body)
    assert line == encode(record)
    assert record.seq == 1
    assert record.dropped == 0


def test_a_torn_append_at_any_byte_never_costs_the_next_report_or_the_earlier_ones(tmp_path: Path) -> None:
    torn_line = encode(Record(3, "a" * 32, Event(event="install", result="ok", reason="torn report", txn="torn")))
    for cut in range(len(torn_line)):
        d = tmp_path / str(cut)
        box = Outbox(d)
        box.append(result(1))
        box.append(result(2))
        with (d / FILE).open("ab") as f:  # the power cut: only `cut` bytes of the third append reached the disk
            f.write(torn_line[:cut])
        after_restart = Outbox(d)
        new = after_restart.append(result(4))
        pending = after_restart.pending()
        assert new in pending
        assert txns(pending)[:2] == ["1", "2"]
        assert txns(pending)[-1] == "4"
        if cut == 0:
            assert txns(pending) == ["1", "2", "4"]
        elif cut == len(torn_line) - 1:  # everything but the newline: the record checks and is kept
            assert txns(pending) == ["1", "2", "torn", "4"]
        else:
            repaired = [r for r in pending if r.event.event == "outbox"]
            assert len(repaired) == 1, cut
            assert repaired[0].dropped == 1
            assert "torn record" in repaired[0].event.reason
            assert "torn" not in txns(pending)
        assert (d / FILE).read_bytes().endswith(b"\n")
        assert sorted(r.seq for r in pending) == [r.seq for r in pending]
        assert len({r.seq for r in pending}) == len(pending)


def test_a_record_failing_its_crc_is_skipped_counted_and_the_file_kept_aside(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    for n in (1, 2, 3):
        box.append(result(n))
    data = bytearray((tmp_path / FILE).read_bytes())
    at = data.index(b"report 2") + len("report ")
    data[at : at + 1] = b"7"  # still valid JSON, wrong CRC
    (tmp_path / FILE).write_bytes(bytes(data))

    pending = Outbox(tmp_path).pending()
    assert txns(pending)[:2] == ["1", "3"]
    notice = pending[-1]
    assert (notice.event.event, notice.event.result, notice.dropped) == ("outbox", "repaired", 1)
    [aside] = corrupt_files(tmp_path)
    assert aside.read_bytes() == bytes(data)  # kept for whoever investigates
    assert notice.event.reason.endswith(f"moved to {aside.name}")


def test_lines_that_are_not_records_are_skipped_without_hiding_their_neighbours(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.append(result(1))
    with (tmp_path / FILE).open("ab") as f:
        f.write(b'{"event": "install", "result": "ok"}\n\x00\x00\x00\nzzzzzzzz {}\n' + b"[" * 100_000 + b"\n")
    box.append(result(2))
    pending = Outbox(tmp_path).pending()
    assert txns(pending)[0] == "1"
    assert txns(pending)[-1] == "2"
    assert [r.dropped for r in pending if r.event.event == "outbox"] == [4]


# --- ids and acknowledgement ----------------------------------------------------


def test_sequence_ids_continue_after_a_restart_even_when_everything_was_acknowledged(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    records = [box.append(result(n)) for n in range(1, 6)]
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert len({r.id for r in records}) == 5
    box.ack(5)
    assert Outbox(tmp_path).pending() == []
    assert Outbox(tmp_path).append(result(6)).seq == 6


def test_ack_removes_up_to_and_including_a_record_and_holds_across_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    sent = [box.append(result(n)) for n in range(1, 6)]
    box.ack(sent[2].seq)
    reopened = Outbox(tmp_path)
    assert reopened.pending() == sent[3:]  # the same records, same ids: redelivery is deduplicable
    reopened.ack(1)  # an older acknowledgement changes nothing
    assert reopened.pending() == sent[3:]
    with pytest.raises(ValueError, match="newest record is 5"):
        reopened.ack(6)
    reopened.ack(5)
    assert Outbox(tmp_path).pending() == []


def test_acknowledged_records_are_compacted_away(tmp_path: Path) -> None:
    box = Outbox(tmp_path, max_bytes=4 * MAX_RECORD_BYTES)
    last = None
    for n in range(200):
        last = box.append(Event(event="install", result="ok", reason="x" * 200, txn=str(n)))
    assert last is not None
    big = (tmp_path / FILE).stat().st_size
    box.ack(last.seq)
    assert (tmp_path / FILE).stat().st_size < big // 10
    assert Outbox(tmp_path).append(result(1)).seq == last.seq + 1


def test_every_power_cut_during_ack_leaves_the_unacknowledged_records_pending(tmp_path: Path) -> None:
    """ack = replace outbox.acked, then maybe rewrite outbox.log: each is atomic, so
    after a cut the disk holds old or new of each file; every mix must be safe."""
    src = tmp_path / "src"
    box = Outbox(src, max_bytes=4 * MAX_RECORD_BYTES)
    sent = [box.append(Event(event="install", result="ok", reason="y" * 250, txn=str(n))) for n in range(1, 161)]
    old_log = (src / FILE).read_bytes()
    box.ack(120)  # enough acknowledged bytes to compact
    new_log, new_acked = (src / FILE).read_bytes(), (src / ACKED_FILE).read_bytes()
    assert new_log != old_log
    for i, (log_bytes, acked_bytes) in enumerate(itertools.product([old_log, new_log], [None, new_acked])):
        d = tmp_path / f"mix{i}"
        d.mkdir()
        (d / FILE).write_bytes(log_bytes)
        if acked_bytes is not None:
            (d / ACKED_FILE).write_bytes(acked_bytes)
        pending = Outbox(d).pending()
        assert pending[-40:] == sent[120:], i  # nothing unacknowledged lost, order kept
        assert all(r in sent for r in pending)  # at worst acknowledged ones again, unchanged


def test_appends_from_two_processes_are_all_kept_in_order(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from agent.outbox import Outbox; from agent.events import Event\n"
        "box = Outbox(Path(sys.argv[1]))\n"
        "for n in range(40): box.append(Event(event='install', result='ok', txn=f'{sys.argv[2]}-{n}'))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path), name], cwd=ROOT) for name in ("left", "right")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    pending = Outbox(tmp_path).pending()
    assert [r.seq for r in pending] == list(range(1, 81))
    for name in ("left", "right"):
        assert [t for t in txns(pending) if t and t.startswith(name)] == [f"{name}-{n}" for n in range(40)]


def test_creating_the_outbox_makes_its_directory_entry_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    Outbox(tmp_path).append(result(1))
    path = str(tmp_path / FILE)
    assert synced.index(path) < synced.index(str(tmp_path))  # the data, then the new directory entry


# --- bounds and the drop policy ---------------------------------------------


def test_outbox_stays_within_its_bounds(tmp_path: Path) -> None:
    box = Outbox(tmp_path, max_bytes=4 * MAX_RECORD_BYTES, max_records=10)
    for n in range(300):
        box.append(Event(event="install", result="ok", reason="z" * (n % 300), txn=str(n)))
        assert (tmp_path / FILE).stat().st_size <= 4 * MAX_RECORD_BYTES
        assert len(box.pending()) <= 10


def test_a_full_outbox_drops_progress_before_results_and_says_how_many(tmp_path: Path) -> None:
    box = Outbox(tmp_path, max_records=20)
    appended = 0
    for n in range(20):
        box.append(progress(n) if n % 2 else result(n))
        appended += 1
    assert sum(r.dropped for r in box.pending()) == 0
    forcing = box.append(result(100))
    appended += 1
    pending = box.pending()
    assert len(pending) < 20
    assert forcing.dropped > 0  # the report whose append forced the drop carries the count
    assert pending[-1] == forcing
    kept_results = [r.event.txn for r in pending if r.event.event == "install"]
    assert kept_results == [str(n) for n in range(0, 20, 2)] + ["100"]  # every result kept: only progress went
    assert len(pending) <= 15  # progress cut to three quarters, so the next appends are cheap again
    assert len(pending) + sum(r.dropped for r in pending) == appended  # nothing lost uncounted


def test_with_only_results_left_the_oldest_go_first_and_every_loss_is_counted(tmp_path: Path) -> None:
    box = Outbox(tmp_path, max_records=8)
    for appended, n in enumerate(range(50), start=1):
        box.append(result(n))
        pending = box.pending()
        assert len(pending) + sum(r.dropped for r in pending) == appended
    assert txns(box.pending()) == [str(n) for n in range(42, 50)]
    assert Outbox(tmp_path).pending() == box.pending()  # the counts are on disk, not in memory


# --- damaged files -----------------------------------------------------------------


def test_an_oversized_outbox_is_set_aside_keeping_what_it_can(tmp_path: Path) -> None:
    box = Outbox(tmp_path, max_bytes=4 * MAX_RECORD_BYTES)
    first = box.append(result(1))
    with (tmp_path / FILE).open("ab") as f:
        f.write(b"q" * (1 << 20))  # one endless line: far past what the reader accepts
    size = (tmp_path / FILE).stat().st_size
    box2 = Outbox(tmp_path, max_bytes=4 * MAX_RECORD_BYTES)
    new = box2.append(result(2))
    pending = box2.pending()
    assert pending[0] == first
    assert pending[-1] == new
    [notice] = [r for r in pending if r.event.event == "outbox"]
    assert "larger than" in notice.event.reason
    [aside] = corrupt_files(tmp_path)
    assert aside.stat().st_size == size  # set aside, never emptied
    assert (tmp_path / FILE).stat().st_size < 16 * 1024


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_an_outbox_that_is_not_a_regular_file_is_set_aside_and_appends_go_on(tmp_path: Path, kind: str) -> None:
    path = tmp_path / FILE
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(victim)
    box = Outbox(tmp_path)
    record = box.append(result(1))
    assert box.pending()[-1] == record
    assert box.pending()[0].event.result == "repaired"
    assert victim.read_bytes() == b"precious\n"
    assert len(corrupt_files(tmp_path)) == 1


def test_a_corrupt_ack_marker_means_redelivery_never_loss(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    sent = [box.append(result(n)) for n in range(3)]
    (tmp_path / ACKED_FILE).write_bytes(b"\xff" * 20)
    assert Outbox(tmp_path).pending() == sent


def framed(body: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(body), body)


def test_the_reader_is_total_on_arbitrary_bytes_even_with_valid_crcs() -> None:
    blobs = [b"", b"\n" * 10, b"0" * 8 + b" " + b"{" * 50_000, os.urandom(4096), b"deadbeef \xff\xfe\n"]
    blobs += [framed(b"[" * 200_000), framed(b'{"seq": ' + b"9" * 5000 + b"}"), framed(b'{"seq": 1, "id": "x"}')]
    blobs += [framed(b'{"seq": 1, "id": "%s", "event": "e", "result": "r"}' % (b"\xe2\x80\xa8" * 20))]
    for blob in blobs:
        parsed = outbox_mod.parse(blob)
        assert parsed.lines == []
        assert (parsed.bad_lines + parsed.torn_tail > 0) == bool(blob.strip(b"\n"))  # counted, never silent


def test_a_copied_outbox_directory_reads_the_same(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "a")
    for n in range(5):
        box.append(result(n))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert Outbox(tmp_path / "b").pending() == box.pending()
