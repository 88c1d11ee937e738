"""One size parser for every ``--max-shard-size`` (and anything else given as a byte count).

The units mean what they mean on the Hugging Face Hub (``huggingface_hub`` shards with ``"5GB"`` = 5·10⁹ bytes):
decimal for ``KB``/``MB``/``GB``/``TB`` (10³, 10⁶, 10⁹, 10¹²) and binary for ``KiB``/``MiB``/``GiB``/``TiB``
(2¹⁰, 2²⁰, 2³⁰, 2⁴⁰); ``B`` or no unit is a plain byte count. Units are case-insensitive (``2gb`` = ``2GB``),
spaces between number and unit are allowed, the number may have a fractional part (``1.5GB``; the result is
rounded down to whole bytes).

Refused with a one-line :class:`ValueError`: an empty string, zero or a negative size, ``inf``/``nan``,
more than 2**53 bytes, a ``bool``, a unit without ``B`` (``2G``: it meant 2·10⁹ bytes to ``convert`` and 2·2³⁰
bytes to ``quantize`` before both used this parser, so it is ambiguous) and anything else that is not a size.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
MAX_SIZE = 1 << 53  # larger counts are not sizes anyone means (and stop being exact as JSON numbers/floats)

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.ASCII | re.IGNORECASE)
_EXAMPLES = "examples: 2GB = 2*10^9 bytes, 500MiB = 500*2^20 bytes, 1048576 = bytes"


def _refuse(value: object, why: str) -> ValueError:
    return ValueError(f"not a size: {value!r} ({why}; {_EXAMPLES})")


def parse_size(value: str | int) -> int:
    """``'2GB'`` -> 2_000_000_000, ``'2GiB'`` -> 2_147_483_648, ``'500MiB'``, ``'1.5GB'``, ``'1024'``, ``1024``
    -> a positive number of bytes (see the module docstring for the units and what is refused)."""
    if isinstance(value, bool):  # bool is an int subclass: True would otherwise be 1 byte
        raise _refuse(value, "a boolean")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m is None:
            raise _refuse(value, "expected a number and a unit")
        number, unit = m.group(1), m.group(2).lower() or "b"
        if unit not in UNITS:
            raise _refuse(value, f"unknown unit {m.group(2)!r}; units: KB MB GB TB (decimal), KiB MiB GiB TiB "
                                 f"(binary), B or none (bytes)")
        try:
            n = int(Decimal(number) * UNITS[unit])  # exact: no float rounding (0.29KB is 290 bytes)
        except InvalidOperation:  # pragma: no cover - the pattern admits only decimal numbers
            raise _refuse(value, "not a number") from None
    else:
        raise _refuse(value, f"a {type(value).__name__}, expected a string or an int")
    if n <= 0:
        raise _refuse(value, "must be at least 1 byte")
    if n > MAX_SIZE:
        raise _refuse(value, "larger than 2**53 bytes")
    return n


__all__ = ["MAX_SIZE", "UNITS", "parse_size"]
