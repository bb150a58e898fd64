"""Streaming parse of NDJSON commit bodies, so a large upload never sits in memory.

A regular upload arrives as one NDJSON line per file, ``{"key": "file", "value": {"content": "<base64>", ...}}``:
one line is the whole file, a third larger than it. ``json.loads`` on such a line would hold it (and its
decoded copy) in memory, so a 4 GiB commit needed gigabytes of RAM. This parser reads the body in chunks and
writes any long ``value.content`` string straight to a spool file on disk; everything else in a commit line
is small and is parsed into ordinary Python values (bounded by ``MAX_SMALL_STRING``).

NDJSON is a sequence of JSON values separated by whitespace (a JSON string cannot hold a raw newline), so the
parser reads values one after another and needs no line splitting.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import HubError

READ_CHUNK = 2**20
#: Longest string kept in memory; a longer ``value.content`` is spooled to disk, any other is refused.
MAX_SMALL_STRING = 2**20
_STRING_STOP = re.compile(rb'["\\\x00-\x1f]')
_LITERAL = re.compile(rb"[-+0-9.eEtruefalsn]+")
_ESCAPES = {b'"': '"', b"\\": "\\", b"/": "/", b"b": "\b", b"f": "\f", b"n": "\n", b"r": "\r", b"t": "\t"}
_WHITESPACE = b" \t\r\n"
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")


@dataclass
class Spooled:
    """A long string value, its UTF-8 bytes in ``path`` (deleted by ``NDJSONReader.cleanup``)."""

    path: Path
    size: int

    def chunks(self, size: int = READ_CHUNK) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            while chunk := f.read(size):
                yield chunk


def decode_base64_chunks(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Strict base64 decoding of a stream (same rules as ``b64decode(validate=True)``), chunk by chunk."""
    pending = b""
    done = False
    for chunk in chunks:
        data = pending + chunk
        cut = len(data) - len(data) % 4
        pending, data = data[cut:], data[:cut]
        if not data:
            continue
        if done or b"=" in data[:-2]:
            raise binascii.Error("padding inside base64 data")
        done = data.endswith(b"=")
        yield base64.b64decode(data, validate=True)
    if pending:
        raise binascii.Error("base64 data length is not a multiple of 4")


class NDJSONReader:
    """JSON values read from ``stream`` (at most ``length`` bytes), long ``value.content`` strings spooled."""

    def __init__(self, stream: BinaryIO, length: int, spool_dir: Path) -> None:
        self._read: Callable[[int], bytes] = stream.read
        self.remaining = length  # bytes of the body not yet read from the stream
        self._buf = b""
        self._pos = 0
        self._spool_dir = spool_dir
        self._spooled: list[Path] = []

    # ------------------------------------------------------------------------------------------- input
    def _fill(self) -> bool:
        """Make unread buffered bytes available; False at the end of the body."""
        if self._pos < len(self._buf):
            return True
        if self.remaining <= 0:
            return False
        chunk = self._read(min(READ_CHUNK, self.remaining))
        if not chunk:
            raise HubError(400, "Truncated request body")
        self.remaining -= len(chunk)
        self._buf, self._pos = chunk, 0
        return True

    def _next(self) -> bytes:
        if not self._fill():
            raise HubError(400, "Malformed NDJSON commit line (truncated)")
        byte = self._buf[self._pos : self._pos + 1]
        self._pos += 1
        return byte

    def _peek_non_ws(self) -> bytes:
        while self._fill():
            byte = self._buf[self._pos : self._pos + 1]
            if byte not in _WHITESPACE:
                return byte
            self._pos += 1
        return b""

    def _expect(self, byte: bytes) -> None:
        if self._peek_non_ws() != byte:
            raise HubError(400, f"Malformed NDJSON commit line (expected {byte.decode()!r})")
        self._pos += 1

    # ------------------------------------------------------------------------------------------ values
    def __iter__(self) -> Iterator[Any]:
        """Every top-level JSON value of the body, in order."""
        while self._peek_non_ws():
            yield self._value(())

    def _value(self, path: tuple[str, ...]) -> Any:
        byte = self._peek_non_ws()
        if byte == b"{":
            self._pos += 1
            obj: dict[str, Any] = {}
            if self._peek_non_ws() == b"}":
                self._pos += 1
                return obj
            while True:
                self._expect(b'"')
                key = self._string(spool=False)
                if not isinstance(key, str):
                    raise HubError(400, "Malformed NDJSON commit line (key)")
                self._expect(b":")
                obj[key] = self._value((*path, key))
                separator = self._peek_non_ws()
                self._pos += 1
                if separator == b"}":
                    return obj
                if separator != b",":
                    raise HubError(400, "Malformed NDJSON commit line (object)")
        if byte == b"[":
            self._pos += 1
            items: list[Any] = []
            if self._peek_non_ws() == b"]":
                self._pos += 1
                return items
            while True:
                items.append(self._value((*path, "[]")))
                separator = self._peek_non_ws()
                self._pos += 1
                if separator == b"]":
                    return items
                if separator != b",":
                    raise HubError(400, "Malformed NDJSON commit line (array)")
        if byte == b'"':
            self._pos += 1
            return self._string(spool=path == ("value", "content"))
        match = _LITERAL.match(self._buf, self._pos)
        token = b""
        while match:  # a number or literal may straddle two reads
            token += match.group()
            self._pos = match.end()
            if self._pos < len(self._buf) or not self._fill():
                break
            match = _LITERAL.match(self._buf, self._pos)
        try:
            return json.loads(token)
        except ValueError:
            raise HubError(400, "Malformed NDJSON commit line") from None

    def _string(self, spool: bool) -> str | Spooled:
        """The rest of a string after its opening quote; spooled to disk past ``MAX_SMALL_STRING`` if allowed."""
        parts: list[bytes] = []
        size = 0
        out: BinaryIO | None = None
        spool_path: Path | None = None
        try:
            while True:
                if not self._fill():
                    raise HubError(400, "Malformed NDJSON commit line (unterminated string)")
                stop = _STRING_STOP.search(self._buf, self._pos)
                end = stop.start() if stop else len(self._buf)
                piece = self._buf[self._pos : end]
                self._pos = end
                if stop:
                    char = self._buf[end : end + 1]
                    self._pos += 1
                    if char == b"\\":
                        piece += self._escape()
                    elif char != b'"':
                        raise HubError(400, "Malformed NDJSON commit line (control character in a string)")
                if piece:
                    size += len(piece)
                    if out is not None:
                        out.write(piece)
                    else:
                        parts.append(piece)
                        if size > MAX_SMALL_STRING:
                            if not spool:
                                raise HubError(413, "A commit line holds a string too long for its field")
                            fd, name = tempfile.mkstemp(dir=self._spool_dir, prefix="upload-")
                            spool_path = Path(name)
                            self._spooled.append(spool_path)
                            out = os.fdopen(fd, "wb")
                            out.write(b"".join(parts))
                            parts = []
                if stop and char == b'"':
                    break
        finally:
            if out is not None:
                out.close()
        if spool_path is not None:
            return Spooled(spool_path, size)
        try:
            return b"".join(parts).decode("utf-8")
        except UnicodeDecodeError:
            raise HubError(400, "Malformed NDJSON commit line (invalid UTF-8)") from None

    def _escape(self) -> bytes:
        char = self._next()
        if char in _ESCAPES:
            return _ESCAPES[char].encode()
        if char != b"u":
            raise HubError(400, "Malformed NDJSON commit line (bad escape)")
        code = self._hex4()
        if 0xD800 <= code < 0xDC00:  # a surrogate pair: the low half must follow as another \u escape
            if self._next() + self._next() != b"\\u":
                raise HubError(400, "Malformed NDJSON commit line (lone surrogate)")
            low = self._hex4()
            if not 0xDC00 <= low < 0xE000:
                raise HubError(400, "Malformed NDJSON commit line (lone surrogate)")
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
        elif 0xDC00 <= code < 0xE000:
            raise HubError(400, "Malformed NDJSON commit line (lone surrogate)")
        return chr(code).encode("utf-8")

    def _hex4(self) -> int:
        digits = b"".join(self._next() for _ in range(4))
        if not _HEX4.fullmatch(digits):
            raise HubError(400, "Malformed NDJSON commit line (bad \\u escape)")
        return int(digits, 16)

    def cleanup(self) -> None:
        """Delete the spool files (their contents are in blobs by now, or the commit failed)."""
        for path in self._spooled:
            path.unlink(missing_ok=True)
        self._spooled.clear()
