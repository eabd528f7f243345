"""Closed streams, compacted: their messages packed into compressed blocks.

While a stream is open its messages are rows of ``messages``, one per offset: cheap to
append and to read from any offset. Once it is closed nothing is appended again, and the
writer, when it has time, moves them into ``message_blocks``: runs of
consecutive messages, each block one zlib-compressed row. A finished answer then takes a
fraction of its rows' size (a row per message repeats the stream id and the JSON around
each delta, which compress to almost nothing); a generation's snapshot row is written
again once its stream is compacted, packed with the other finished ones.

Compaction goes a few blocks per transaction, first offsets first, so a stream's blocks
always hold a prefix of its messages and its rows the rest. A block's payload is ``count``
little-endian 32-bit lengths, then the messages.
"""

from __future__ import annotations

import sqlite3
import sys
import zlib
from array import array
from collections.abc import Generator, Iterator

BLOCK_BYTES = 64 * 1024  # raw bytes per block, about: the unit read to serve any offset
BLOCK_MESSAGES = 8192  # and at most this many messages
COMPRESSION_LEVEL = 6

_LENGTH = "I"


def pack(messages: list[bytes]) -> bytes:
    """Messages as one compressed block."""
    lengths = array(_LENGTH, map(len, messages))
    if sys.byteorder != "little":
        lengths.byteswap()
    return zlib.compress(lengths.tobytes() + b"".join(messages), COMPRESSION_LEVEL)


def unpack(block: bytes, count: int) -> list[bytes]:
    """A block's ``count`` messages."""
    raw = zlib.decompress(block)
    lengths = array(_LENGTH)
    lengths.frombytes(raw[: 4 * count])
    if sys.byteorder != "little":
        lengths.byteswap()
    messages = []
    at = 4 * count
    for length in lengths:
        messages.append(raw[at : at + length])
        at += length
    return messages


def runs(rows: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, list[bytes]]]:
    """``(first offset, messages)`` of each block, from ``(offset, data)`` rows in order."""
    first = -1
    batch: list[bytes] = []
    size = 0
    for offset, data in rows:
        if batch and (size + len(data) > BLOCK_BYTES or len(batch) >= BLOCK_MESSAGES):
            yield first, batch
            batch, size = [], 0
        if not batch:
            first = offset
        batch.append(bytes(data))
        size += len(data)
    if batch:
        yield first, batch


def compact(conn: sqlite3.Connection, stream_id: str, *, max_blocks: int) -> tuple[int, bool]:
    """Move up to ``max_blocks`` blocks' worth of a closed stream's first message rows into
    blocks, inside the caller's transaction. Returns how many messages moved and whether
    none is left (also true for a stream that is gone or open: nothing to do)."""
    row = conn.execute("SELECT closed FROM streams WHERE id = ?", (stream_id,)).fetchone()
    if row is None or not row[0]:
        return 0, True
    cursor = conn.execute(
        "SELECT offset, data FROM messages WHERE stream_id = ? ORDER BY offset", (stream_id,)
    )
    moved = 0
    last = -1
    done = True
    for first, messages in runs(iter(cursor)):
        if max_blocks == 0:
            done = False
            break
        conn.execute(
            "INSERT INTO message_blocks (stream_id, first_offset, count, data) VALUES (?, ?, ?, ?)",
            (stream_id, first, len(messages), pack(messages)),
        )
        moved += len(messages)
        last = first + len(messages) - 1
        max_blocks -= 1
    cursor.close()
    if moved:
        conn.execute("DELETE FROM messages WHERE stream_id = ? AND offset <= ?", (stream_id, last))
    if done:
        _rewrite_generation(conn, stream_id)
    return moved, done


def _rewrite_generation(conn: sqlite3.Connection, stream_id: str) -> None:
    """Write a finished generation's row again, at the end of its table.

    Its snapshot grew in place while the answer ran, a second at a time, and every growing
    row spread the b-tree leaves it passed through: a finished 4 KB answer was left alone on
    a page holding 0.5 KB of it (the rest overflows). Written again at its final size, with
    a new rowid, it packs next to the rows that finished before it, and the pages it left
    are freed or merged. (Rows are ordered by ``created_at``, which the pool keeps strictly
    increasing; the rowid only ever broke ties, and no longer tells insertion order.)
    """
    cursor = conn.execute("SELECT * FROM generations WHERE stream_id = ?", (stream_id,))
    row = cursor.fetchone()
    if row is None:
        return
    columns = [description[0] for description in cursor.description]
    conn.execute("DELETE FROM generations WHERE stream_id = ?", (stream_id,))
    conn.execute(
        f"INSERT INTO generations ({', '.join(columns)}) VALUES ({', '.join('?' * len(row))})",
        row,
    )


def delete(conn: sqlite3.Connection, stream_id: str) -> None:
    """Delete every message of a stream, rows and blocks, inside the caller's transaction."""
    conn.execute("DELETE FROM messages WHERE stream_id = ?", (stream_id,))
    conn.execute("DELETE FROM message_blocks WHERE stream_id = ?", (stream_id,))


def read(
    conn: sqlite3.Connection, stream_id: str, offset: int, limit: int
) -> Generator[bytes, None, None]:
    """Up to ``limit`` messages from ``offset`` on, whichever way they are kept.

    A stream's blocks hold a prefix of its messages and its rows the rest (compaction moves
    the first rows first), so a read starts in the blocks only when the rows do not start
    at ``offset``. Run it inside one snapshot (a transaction).
    """
    cursor = conn.execute(
        "SELECT offset, data FROM messages WHERE stream_id = ? AND offset >= ?"
        " ORDER BY offset LIMIT ?",
        (stream_id, offset, limit),
    )
    head = cursor.fetchone()
    if head is not None and head[0] == offset:
        yield head[1]
        yield from (data for _, data in cursor)
        return
    position = offset
    for message in _read_blocks(conn, stream_id, offset, limit):
        yield message
        position += 1
    if head is None or (position > offset and head[0] != position):
        return  # blocks end before the rows begin only where ``limit`` was reached
    left = limit - (position - offset)
    if left > 0:
        yield head[1]
        if left > 1:  # fetchmany(0) would fetch ``arraysize`` rows
            yield from (data for _, data in cursor.fetchmany(left - 1))


def _read_blocks(
    conn: sqlite3.Connection, stream_id: str, offset: int, limit: int
) -> Iterator[bytes]:
    cursor = conn.execute(
        "SELECT first_offset, count, data FROM message_blocks WHERE stream_id = ?"
        " AND first_offset >= coalesce((SELECT max(first_offset) FROM message_blocks"
        " WHERE stream_id = ? AND first_offset <= ?), 0) ORDER BY first_offset",
        (stream_id, stream_id, offset),
    )
    left = limit
    for first, count, data in cursor:
        if left <= 0:
            break
        if first + count <= offset:
            continue
        messages = unpack(data, count)[max(0, offset - first) :][:left]
        yield from messages
        left -= len(messages)


def end(conn: sqlite3.Connection, stream_id: str) -> int | None:
    """The offset after a stream's last block; ``None`` if it has none."""
    found = conn.execute(
        "SELECT first_offset + count FROM message_blocks WHERE stream_id = ?"
        " ORDER BY first_offset DESC LIMIT 1",
        (stream_id,),
    ).fetchone()
    return None if found is None else int(found[0])


def pending(conn: sqlite3.Connection, limit: int) -> list[str]:
    """Closed streams that still have message rows (closed by a process that died, or
    before compaction existed), at most ``limit``."""
    rows = conn.execute(
        "SELECT id FROM streams WHERE closed = 1"
        " AND EXISTS (SELECT 1 FROM messages WHERE stream_id = streams.id) LIMIT ?",
        (limit,),
    ).fetchall()
    return [stream_id for (stream_id,) in rows]
