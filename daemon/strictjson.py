"""JSON from outside, decoded strictly: one decoder for request bodies and CRM answers.

The standard library's ``json.loads`` accepts what the rest of the daemon cannot use, and fails
in ways a caller does not expect: ``NaN``/``Infinity`` and ``1e999`` (not JSON, and PostgreSQL's
``jsonb`` refuses them), a 5,000-digit number (``ValueError``, not ``JSONDecodeError``), nesting
a few thousand levels deep (``RecursionError``), ``\\u0000`` and lone surrogates such as
``\\ud800`` (``jsonb`` refuses the first, UTF-8 cannot encode the second). :func:`loads` turns
each into one :class:`Rejected` error with a stable ``error_id`` and, where it helps, a JSON
pointer to the culprit:

* ``invalid_json`` — not JSON at all, or not UTF-8;
* ``invalid_number`` — ``NaN``, ``Infinity``, a number out of range;
* ``too_deep`` — nested deeper than ``max_depth``;
* ``invalid_text`` — ``\\u0000`` or a lone surrogate in a string or a key (``check_text``).

Fast for the common case: the depth is walked only when the text has more brackets than
``max_depth``, the strings only when the text holds a ``\\u`` escape (the only way either can
appear in valid UTF-8 JSON).
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

DEFAULT_MAX_DEPTH: Final = 32


class Rejected(ValueError):
    """The JSON cannot be used; ``error_id`` says why, ``pointer`` where (``/a/0/b``).

    ``message`` reads as what is wrong with the whole text: "is nested deeper than 32
    levels", "holds NaN, which is not a JSON number"...
    """

    def __init__(self, error_id: str, message: str, pointer: str = "") -> None:
        super().__init__(message)
        self.error_id = error_id
        self.message = message
        self.pointer = pointer


def _constant(name: str) -> Any:
    raise Rejected("invalid_number", f"holds {name}, which is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Rejected("invalid_number", f"holds the number {text[:20]}, out of range")
    return value


_DECODER: Final = json.JSONDecoder(parse_constant=_constant, parse_float=_float)


def loads(data: bytes | str, *, max_depth: int = DEFAULT_MAX_DEPTH,
          check_text: bool = True) -> Any:
    """Decode ``data`` or raise :class:`Rejected` (see the module docstring)."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("invalid_json", "is not UTF-8 text") from None
    else:
        text = data
    try:
        value = _DECODER.decode(text)
    except Rejected:
        raise
    except json.JSONDecodeError as exc:
        raise Rejected("invalid_json", f"is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise Rejected("too_deep", f"is nested deeper than {max_depth} levels") from None
    except ValueError:  # an integer longer than the interpreter's limit (4,300 digits)
        raise Rejected("invalid_number", "holds a number with too many digits") from None
    if text.count("[") + text.count("{") > max_depth:
        _check_depth(value, max_depth)
    if check_text and "\\u" in text:
        _check_text(value)
    return value


def _check_depth(value: Any, max_depth: int) -> None:
    if not isinstance(value, dict | list):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise Rejected("too_deep", f"is nested deeper than {max_depth} levels")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def _check_text(value: Any) -> None:
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, pointer = stack.pop()
        if isinstance(item, str):
            _check_string(item, pointer)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_string(key, f"{pointer}/{_escape(key)}")
                stack.append((child, f"{pointer}/{_escape(key)}"))
        elif isinstance(item, list):
            stack.extend((child, f"{pointer}/{i}") for i, child in enumerate(item))


def _check_string(text: str, pointer: str) -> None:
    if "\x00" in text:
        raise Rejected("invalid_text", "holds a NUL character (\\u0000)", pointer)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise Rejected("invalid_text", "holds a lone surrogate (not Unicode text)",
                           pointer) from None


def _escape(key: str) -> str:
    """A key as one JSON pointer token (RFC 6901), kept short and printable for messages."""
    token = key.replace("~", "~0").replace("/", "~1")[:40]
    return token if token.isprintable() and token.isascii() else (
        token.encode("unicode_escape").decode("ascii"))
