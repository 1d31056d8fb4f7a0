"""Phone number normalisation: what the PBX sends, turned into what a CRM can match.

Owns one decision: how a raw number from an Asterisk body (``+375291234567``,
``375291234567``, ``80291234567``, ``291234567``, ``8 (029) 123-45-67``...) becomes the
E.164 form CRMs match customers by (``+375291234567``), using ``phonenumbers``
(libphonenumber) and the enterprise's default region.

Contract of every function here: pure, never raises on bad input, never does I/O.

- A short internal extension (2–5 digits, nothing else) is never a phone: it is returned as
  it came (``"150"`` stays ``"150"``).
- A number libphonenumber accepts as *possible* is returned in E.164.
- Anything else (garbage, too long, too short, ``anonymous``) falls back to its digits only
  (``""`` when it has none); :func:`normalize_ex` tells the caller so it can log it.

The parse is memoised with ``functools.lru_cache``: a bounded memo of a pure function over
immutable arguments, not shared mutable state, so it does not break the no-singletons rule.
"""

from __future__ import annotations

import functools
import re
import traceback

import phonenumbers

DEFAULT_REGION = "BY"

_EXTENSION = re.compile(r"\d{2,5}")
_NON_DIGITS = re.compile(r"\D+")
_CACHE_SIZE = 8192


def is_valid_region(code: str) -> bool:
    """Whether ``code`` is a region libphonenumber knows (ISO 3166-1 alpha-2, any case).

    ``"BY"``, ``"by"`` and ``"RU"`` are valid; ``""``, ``"ZZ"`` and ``"XX"`` are not.
    """
    return isinstance(code, str) and code.strip().upper() in phonenumbers.SUPPORTED_REGIONS


def is_extension(raw: str) -> bool:
    """Whether ``raw`` (surrounding spaces ignored) is a short internal extension: 2–5 digits."""
    return _EXTENSION.fullmatch(raw.strip()) is not None


def digits(raw: str) -> str:
    """The digits of ``raw`` only, in order: ``"+375 (29) 1-2"`` → ``"3752912"``."""
    return _NON_DIGITS.sub("", raw)


def normalize(raw: str, region: str = DEFAULT_REGION) -> str:
    """``raw`` as E.164, or kept as an extension, or reduced to its digits (see the module)."""
    return normalize_ex(raw, region)[0]


def normalize_ex(raw: str, region: str = DEFAULT_REGION) -> tuple[str, bool]:
    """Like :func:`normalize`, and whether the result is trustworthy.

    Returns ``(value, True)`` for an E.164 number or an extension kept as it is (also for
    an empty input: nothing to log), ``(digits, False)`` when ``raw`` could not be parsed
    as a possible number in ``region`` — the case callers log. An unknown ``region`` makes
    only numbers with an explicit ``+`` or a recognisable country code parse.
    """
    return _normalize(raw.strip(), region.strip().upper())


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _normalize(raw: str, region: str) -> tuple[str, bool]:
    if raw == "":
        return "", True
    if _EXTENSION.fullmatch(raw):
        return raw, True
    number = _best_parse(raw, region)
    if number is None:
        return digits(raw), False
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), True


def _best_parse(raw: str, region: str) -> phonenumbers.PhoneNumber | None:
    """The most plausible reading of ``raw``: a valid one first, else a merely possible one.

    Readings tried, in order: as dialled in ``region`` (national formats, the region's
    international prefix, a leading country code); with a ``+`` added to its digits (a
    foreign number written without ``+``, e.g. ``79161234567`` from a BY line); with a
    ``00`` international prefix replaced by ``+`` (common in caller ids, not BY's prefix).
    """
    # Each reading is parsed only when the ones before it are not valid: most numbers are
    # valid as dialled, and a reading that does not parse costs an exception.
    as_dialled = _parse(raw, region)
    if as_dialled is not None and phonenumbers.is_valid_number(as_dialled):
        return as_dialled
    if not raw.startswith("+"):
        only = digits(raw)
        others = ("+" + only, "+" + only[2:]) if only.startswith("00") else ("+" + only,)
        for text in others:
            number = _parse(text, region)
            if number is not None and phonenumbers.is_valid_number(number):
                return number
    if as_dialled is not None and phonenumbers.is_possible_number(as_dialled):
        return as_dialled
    return None


def _parse(raw: str, region: str) -> phonenumbers.PhoneNumber | None:
    try:
        return phonenumbers.parse(raw, region if region in phonenumbers.SUPPORTED_REGIONS else None)
    except phonenumbers.NumberParseException as exc:
        # libphonenumber keeps the exception's traceback in a local of the frame that
        # re-raises it (``sys.exc_info()``): a reference cycle that would hold its frames,
        # and every frame of ours up the stack, until the cyclic garbage collector runs.
        # Cleared now, refcounting frees them at once.
        traceback.clear_frames(exc.__traceback__)
        return None
