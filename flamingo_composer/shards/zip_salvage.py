"""The members of a zip that lost its end (a cut download: no central directory), read from their local headers in
file order and streamed: memory holds a few chunks and the longest line, whatever the archive's size (MMC4's zips
run to tens of GB). Stored and deflated members, Zip64 sizes and data descriptors (bit 3) are understood; reading
stops at the first member the cut (or any damage) reached, whose complete lines are still given."""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO

CHUNK_BYTES = 1 << 18  # read from the file, and inflated, at most this much at a time
LOCAL_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # signature, version, flags, method, time, date, crc, sizes, lengths
_DESCRIPTOR_MAGIC = b"PK\x07\x08"
_ZIP64_EXTRA = 0x0001
_ZIP64_SIZE = 0xFFFFFFFF  # a 32-bit size field that says: see the Zip64 extra field
_ENCRYPTED, _SIZES_AFTER_DATA, _UTF8_NAME = 0x1, 0x8, 0x800


class SalvagedMember:
    """One member as its local header describes it; its data is read once, in order, by `head`, `chunks` or
    `lines`. `complete` is known once the data ran out: it ended where the header (or the deflate stream) said."""

    def __init__(self, handle: BinaryIO, name: str, method: int, packed_size: int | None):
        self.name = name
        self.complete = False
        self._handle = handle
        self._packed_size = packed_size  # None: sizes follow the data (bit 3)
        self._stream = self._stored() if method == zipfile.ZIP_STORED else self._inflated()
        self._first = b""

    def head(self, size: int) -> bytes:
        """The member's first bytes (up to `size`), still given again by `chunks`."""
        if not self._first:
            self._first = next(self._stream, b"")
        return self._first[:size]

    def chunks(self) -> Iterator[bytes]:
        """The rest of the member's uncompressed data, at most CHUNK_BYTES at a time."""
        if self._first:
            first, self._first = self._first, b""
            yield first
        yield from self._stream

    def lines(self) -> Iterator[bytes]:
        """Its lines, each with its newline; a last line without one only if the member is complete (else the cut
        may have shortened it)."""
        tail = b""
        for chunk in self.chunks():
            parts = (tail + chunk).split(b"\n")
            tail = parts.pop()
            for part in parts:
                yield part + b"\n"
        if tail and self.complete:
            yield tail

    def drain(self) -> None:
        for _ in self.chunks():
            pass

    def _stored(self) -> Iterator[bytes]:
        remaining = self._packed_size
        while remaining is None or remaining > 0:
            chunk = self._handle.read(CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining))
            if not chunk:
                return  # cut (or, for an unknown size, the file's end: no way to tell where the data stopped)
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk
        self.complete = True

    def _inflated(self) -> Iterator[bytes]:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        remaining, pending = self._packed_size, b""
        while not inflater.eof:
            if not pending:
                pending = self._handle.read(CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining or 0))
                if not pending:  # the cut, or the header's size reached before the stream's end: what zlib holds
                    try:
                        rest = inflater.flush()
                    except zlib.error:
                        return
                    if rest:
                        yield rest
                    self.complete = inflater.eof
                    return
                if remaining is not None:
                    remaining -= len(pending)
            try:
                out = inflater.decompress(pending, CHUNK_BYTES)
            except zlib.error:
                return  # damaged data: stop here, incomplete
            pending = inflater.unconsumed_tail
            if out:
                yield out
        self._handle.seek(-len(inflater.unused_data), os.SEEK_CUR)  # read past the stream: give it back
        self.complete = True


def salvaged_members(path: str | os.PathLike) -> Iterator[SalvagedMember]:
    """Each member from its local header, in file order, until the first incomplete one (given too) or anything
    that is not a local header. A member not read by the caller is read through (not kept) before the next.
    zipfile.BadZipFile for an encrypted member or a compression other than stored / deflated."""
    with open(path, "rb") as handle:
        while True:
            header = handle.read(_LOCAL_HEADER.size)
            if len(header) < _LOCAL_HEADER.size or header[:4] != LOCAL_MAGIC:
                return
            _, _, flags, method, _, _, _, packed_size, size, name_len, extra_len = _LOCAL_HEADER.unpack(header)
            raw_name, extra = handle.read(name_len), handle.read(extra_len)
            name = raw_name.decode("utf-8" if flags & _UTF8_NAME else "cp437", "replace")
            if flags & _ENCRYPTED or method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise zipfile.BadZipFile(f"{path}: member {name!r} is encrypted or packed by method {method}")
            zip64 = _ZIP64_SIZE in (packed_size, size)
            if zip64:
                packed_size = _zip64_packed_size(extra, size, packed_size)
            member = SalvagedMember(handle, name, method, None if flags & _SIZES_AFTER_DATA else packed_size)
            yield member
            member.drain()
            if not member.complete:
                return
            if flags & _SIZES_AFTER_DATA:
                if method == zipfile.ZIP_STORED:
                    return  # read to the file's end: nothing follows
                start = handle.read(4)  # the descriptor's optional signature, or its crc
                handle.read((4 if start == _DESCRIPTOR_MAGIC else 0) + (16 if zip64 else 8))


def _zip64_packed_size(extra: bytes, size: int, packed_size: int) -> int:
    """The compressed size from the Zip64 extra field (its 64-bit sizes, in order, for each 32-bit field that was
    0xFFFFFFFF: uncompressed, then compressed)."""
    offset = 0
    while offset + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, offset)
        if kind == _ZIP64_EXTRA:
            values = struct.unpack_from(f"<{length // 8}Q", extra, offset + 4)
            index = 1 if size == _ZIP64_SIZE else 0
            return values[index] if packed_size == _ZIP64_SIZE else packed_size
        offset += 4 + length
    raise zipfile.BadZipFile("a Zip64 member without its Zip64 extra field")
