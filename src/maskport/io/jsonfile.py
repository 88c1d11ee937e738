"""The one reader of untrusted JSON: bounded in size and nesting depth, duplicate keys refused, the top-level type
checked, every failure an :class:`~maskport.errors.UnreadableFile` naming the file.

Python's ``json`` accepts any size, nests until ``RecursionError`` and keeps the last of two equal keys silently
(two readers of one file may then disagree about it). :func:`loads_bounded` rejects all three before building
anything large: the size is checked before reading, deep nesting ends the C parser's recursion (caught) or the
depth check after parsing, duplicate keys are refused by an ``object_pairs_hook``, and ``NaN``/``Infinity`` literals (not JSON) are refused as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import MissingInput, UnreadableFile

JSON_MAX_BYTES = 64 << 20
"""The largest JSON file read (an index of 100k tensors is ~10 MB; configs are kilobytes)."""

JSON_MAX_DEPTH = 64
"""The deepest nesting of arrays/objects accepted (real configs nest < 10 levels)."""


class JsonError(ValueError):
    """Raised by :func:`loads_bounded`; the message says what is wrong (without the file name)."""


def _depth(data: Any, limit: int) -> None:
    """Refuse nesting deeper than ``limit`` (iterative walk of the parsed value)."""
    stack = [(data, 1)]
    while stack:
        obj, d = stack.pop()
        if isinstance(obj, (dict, list)):
            if d > limit:
                raise JsonError(f"nested deeper than {limit} levels")
            stack.extend((v, d + 1) for v in (obj.values() if isinstance(obj, dict) else obj)
                         if isinstance(v, (dict, list)))


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise JsonError(f"duplicate key {k[:80]!r}")
        out[k] = v
    return out


def _constant(name: str):
    raise JsonError(f"{name} is not JSON")


def loads_bounded(text: str | bytes, *, max_bytes: int = JSON_MAX_BYTES, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """Parse JSON text with the limits above; :class:`JsonError` (a ``ValueError``) on any problem."""
    if len(text) > max_bytes:
        raise JsonError(f"{len(text)} bytes, more than the {max_bytes} accepted")
    try:
        data = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
    except JsonError:
        raise
    except RecursionError:
        raise JsonError(f"nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise JsonError(f"not JSON ({str(exc)[:200]})") from None
    _depth(data, max_depth)
    return data


_TYPES = {dict: "a JSON object", list: "a JSON array", str: "a string", int: "a number", float: "a number"}


def read_json_file(path: str | Path, *, expect: type | None = dict, what: str = "",
                   max_bytes: int = JSON_MAX_BYTES, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """Read a JSON file an input of maskport holds: :class:`MissingInput` if it is missing,
    :class:`UnreadableFile` (naming the file) if it is too big, too deep, has duplicate keys, is not JSON or its
    top level is not ``expect``. ``what`` (e.g. "the base folder's config") prefixes the message."""
    path = Path(path)
    label = f"{what} {path}".strip()
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UnreadableFile(f"{label}: {size} bytes, more than the {max_bytes} a JSON file may have")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MissingInput(f"{label} is missing") from None
    except IsADirectoryError:
        raise UnreadableFile(f"{label} is a folder, not a JSON file") from None
    except OSError as exc:
        raise UnreadableFile(f"{label}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = loads_bounded(raw, max_bytes=max_bytes, max_depth=max_depth)
    except JsonError as exc:
        raise UnreadableFile(f"{label}: {exc}") from None
    if expect is not None and not isinstance(data, expect):
        raise UnreadableFile(f"{label}: expected {_TYPES.get(expect, expect.__name__)} at the top level, "
                             f"found {_TYPES.get(type(data), type(data).__name__)}")
    return data


def field(data: dict, key: str, expect: type | tuple[type, ...], where: str) -> Any:
    """``data[key]`` checked to be ``expect``; :class:`UnreadableFile` naming ``where`` (file) and the field."""
    if not isinstance(data, dict) or key not in data:
        raise UnreadableFile(f"{where}: field {key!r} is missing")
    v = data[key]
    if not isinstance(v, expect) or (expect in (int, float, (int, float)) and isinstance(v, bool)):
        names = expect.__name__ if isinstance(expect, type) else "/".join(t.__name__ for t in expect)
        raise UnreadableFile(f"{where}: field {key!r} should be {names}, found {type(v).__name__}")
    return v


__all__ = ["JSON_MAX_BYTES", "JSON_MAX_DEPTH", "JsonError", "field", "loads_bounded", "read_json_file"]
