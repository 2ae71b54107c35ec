"""A JSON file whose top level is an object, read one member at a time in bounded memory.

The provenance record of a grown DeepSeek-V3 (moegrow.json) maps 362,000 output tensors to their
parts: 45 MB of text, over 600 MB once `json.loads` makes it Python lists. `read_object` parses every
top-level member but one (`streamed`) into a dict and gives, in that one's place, a `StreamedObject`:
a read-only mapping whose entries are parsed from the file each time they are iterated, one at a time.
Any JSON layout is read (indented or not, members in any order): records written before the mapping
was streamed read the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
_SPACES = re.compile(r"[ \t\n\r]*").match
_NUMBER = "0123456789.eE+-"  # characters that may continue a number
_DECODER = json.JSONDecoder()


class _Scanner:
    """JSON values from a text file, one at a time, through a buffer of about `_CHUNK` characters."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, encoding="utf-8")  # noqa: SIM115 - closed by `close`
        self.buf = ""
        self.pos = 0
        self.eof = False

    def close(self) -> None:
        self.f.close()

    def _more(self) -> bool:
        """Read the next chunk after what is left of the buffer; False at the end of the file."""
        if self.eof:
            return False
        chunk = self.f.read(_CHUNK)
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        self.eof = not chunk
        return bool(chunk)

    def peek(self) -> str:
        """The next character that is not white space ("" at the end)."""
        while True:
            self.pos = _SPACES(self.buf, self.pos).end()  # a regular expression: not a Python loop per space
            if self.pos < len(self.buf) or not self._more():
                return self.buf[self.pos:self.pos + 1]

    def expect(self, char: str) -> None:
        if self.peek() != char:
            self.fail(f"expected {char!r}")
        self.pos += 1

    def value(self) -> Any:
        """The next JSON value. One cut by the buffer's end fails to parse, or is a number the next
        character could go on (`1` of `1.5`): both are parsed again once the next chunk is in."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                if self._more():
                    continue
                raise
            if (end == len(self.buf) or self.buf[end] in _NUMBER) and self._more():
                continue
            self.pos = end
            return value

    def fail(self, message: str) -> None:
        raise json.JSONDecodeError(message, self.buf, self.pos)

    def members(self) -> Iterator[str]:
        """The keys of the object that starts here; after each, the caller reads or skips its value."""
        self.expect("{")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            key = self.value()
            if not isinstance(key, str):
                self.fail("expected a string key")
            self.expect(":")
            yield key
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect("}")
            return


    def entries(self) -> Iterator[tuple[str, Any]]:
        """(key, value) of each member of the object that starts here: `members` and `value`, an entry at a
        time parsed straight from the buffer where it lies whole in it (362,000 entries a pass)."""
        self.expect("{")
        if self.peek() == "}":
            self.pos += 1
            return
        decode, space = _DECODER.raw_decode, _SPACES
        while True:
            buf = self.buf
            try:
                key, p = decode(buf, self.pos)
                p = space(buf, p).end()
                if buf[p] != ":" or not isinstance(key, str):
                    raise ValueError
                value, p = decode(buf, space(buf, p + 1).end())
                if buf[p] in _NUMBER:  # a number the next chunk may go on
                    raise ValueError
                p = space(buf, p).end()
                end = buf[p]
                if end not in ",}":
                    raise ValueError
                after = space(buf, p + 1).end() if end == "," else p + 1
                if after == len(buf) and end == ",":
                    raise ValueError  # the next key starts in the next chunk: `peek` reads it
            except (ValueError, IndexError):  # cut by the buffer's end, or not valid: the careful way
                key = self.value()
                if not isinstance(key, str):
                    self.fail("expected a string key")
                self.expect(":")
                value = self.value()
                end = self.peek()
                if end == ",":
                    self.pos += 1
                    self.peek()
                else:
                    self.expect("}")
                yield key, value
                if end != ",":
                    return
                continue
            self.pos = after
            yield key, value
            if end == "}":
                return


class StreamedObject(Mapping[str, Any]):
    """The object under top-level key `key` of a JSON file, parsed entry by entry on each pass."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        self._len: int | None = None

    def items(self) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        scanner = _Scanner(self.path)
        try:
            for top in scanner.members():
                if top != self.key:
                    scanner.value()
                    continue
                if scanner.peek() != "{":
                    scanner.fail(f"{self.key} is not an object")
                yield from scanner.entries()
                return
        finally:
            scanner.close()

    def values(self) -> Iterator[Any]:  # type: ignore[override]
        return (v for _, v in self.items())

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self.items())

    def __len__(self) -> int:
        if self._len is None:
            self._len = sum(1 for _ in self.items())
        return self._len

    def __getitem__(self, name: str) -> Any:  # a pass over the file: for a few look-ups only
        for k, v in self.items():
            if k == name:
                return v
        raise KeyError(name)


def read_object(path: Path, streamed: str) -> dict[str, Any]:
    """The top-level object of a JSON file with member `streamed` (if present and an object) as a
    `StreamedObject`; raises json.JSONDecodeError (or OSError, UnicodeDecodeError) as json.loads would."""
    scanner = _Scanner(path)
    out: dict[str, Any] = {}
    try:
        if scanner.peek() != "{":  # not an object: whatever it is, as json.loads reads it
            return json.loads(path.read_text())
        for key in scanner.members():
            if key == streamed and scanner.peek() == "{":
                if key in out:
                    scanner.fail(f"{key} appears twice")
                out[key] = StreamedObject(path, key)
                depth = 0  # skip the object: its entries are read again, one at a time, when iterated
                for _ in scanner.entries():
                    depth += 1
                out[key]._len = depth
            else:
                out[key] = scanner.value()
        if scanner.peek() != "":
            scanner.fail("extra data after the object")
    finally:
        scanner.close()
    return out
