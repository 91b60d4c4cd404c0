"""One size parser for every size option and config key: `16M`, `16MiB`, `4k`, `65536`.

A number alone is bytes. K, M, G and T are powers of 1024 whether written
`16M`, `16MiB` or `16MB` (as QEMU reads its sizes), case-insensitive, with
optional spaces before the unit. Anything else is refused with the value
quoted, so that a command line or config file error reads as one line.

This module imports nothing of fastshadow: the proxy, the CLI, the bench and
the test bed (qemu-storage-daemon sizes) read it.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*(\d+)\s*(?:([kmgt])(?:i?b)?|b)?\s*", re.IGNORECASE)


class SizeError(ValueError):
    """Not a size; the message quotes the value and says what a size looks like."""


def parse_size(value: str | int) -> int:
    """Bytes from `value`: an int (bytes), or a string such as ``"16M"``, ``"16MiB"``, ``"4096"``."""
    if isinstance(value, bool):
        raise SizeError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise SizeError(f"{value} is not a size: sizes are not negative")
        return value
    m = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise SizeError(f"{value!r} is not a size: want bytes, or a number with K, M, G or T "
                        f"(powers of 1024; 16M = 16MiB = 16777216)")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").lower()]


def format_size(n: int) -> str:
    """The shortest exact spelling: 16777216 -> '16 MiB', 1000 -> '1000 B'."""
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n and n % mult == 0:
            return f"{n // mult} {unit}"
    return f"{n} B"
