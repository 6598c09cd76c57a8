"""Canonical byte encoding shared by signing bytes, block hashes and the write-ahead file.

Fixed-width big-endian integers and length-prefixed byte strings: every value has exactly
one encoding, so two nodes that agree on a value agree on its bytes. The reader rejects
truncated input and trailing bytes; it never guesses.
"""

from __future__ import annotations

import struct


class CanonicalDecodeError(ValueError):
    """Bytes are not a well-formed canonical encoding (truncated, oversized or trailing)."""


class Writer:
    """Appends canonical fields to a byte buffer."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Writer:
        self._parts.append(struct.pack(">B", value))
        return self

    def u32(self, value: int) -> Writer:
        self._parts.append(struct.pack(">I", value))
        return self

    def u64(self, value: int) -> Writer:
        self._parts.append(struct.pack(">Q", value))
        return self

    def i64(self, value: int) -> Writer:
        self._parts.append(struct.pack(">q", value))
        return self

    def blob(self, value: bytes) -> Writer:
        self._parts.append(struct.pack(">I", len(value)))
        self._parts.append(value)
        return self

    def raw(self, value: bytes) -> Writer:
        self._parts.append(value)
        return self

    def bytes(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads canonical fields in the order a `Writer` wrote them."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, size: int) -> bytes:
        end = self._pos + size
        if size < 0 or end > len(self._data):
            raise CanonicalDecodeError(
                f"truncated: need {size} bytes at offset {self._pos}, have "
                f"{len(self._data) - self._pos}"
            )
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self) -> int:
        return int(struct.unpack(">B", self._take(1))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self._take(8))[0])

    def i64(self) -> int:
        return int(struct.unpack(">q", self._take(8))[0])

    def blob(self, max_size: int = 1 << 26) -> bytes:
        size = self.u32()
        if size > max_size:
            raise CanonicalDecodeError(f"field of {size} bytes exceeds the limit of {max_size}")
        return self._take(size)

    def raw(self, size: int) -> bytes:
        return self._take(size)

    def end(self) -> None:
        if self._pos != len(self._data):
            raise CanonicalDecodeError(f"{len(self._data) - self._pos} trailing bytes")
