"""daemon.phones: E.164 for what parses, extensions kept, digits (flagged) for the rest."""

from __future__ import annotations

import gc

import phonenumbers
import pytest

from daemon import phones


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        # Belarus, every way a caller id or a dialled number really comes
        ("+375291234567", "BY", "+375291234567"),
        ("375291234567", "BY", "+375291234567"),
        ("80291234567", "BY", "+375291234567"),
        ("291234567", "BY", "+375291234567"),
        ("8 (029) 123-45-67", "BY", "+375291234567"),
        ("8017 234-56-78", "BY", "+375172345678"),
        ("810375291234567", "BY", "+375291234567"),  # BY's own international prefix
        ("00375291234567", "BY", "+375291234567"),  # the 00 prefix other countries use
        ("  +375 29 111-22-33 ", "BY", "+375291112233"),
        # a foreign number written without +, seen from a BY line
        ("79161234567", "BY", "+79161234567"),
        ("+79161234567", "BY", "+79161234567"),
        # the region decides local formats
        ("89161234567", "RU", "+79161234567"),
        ("9161234567", "RU", "+79161234567"),
        ("291234567", "by", "+375291234567"),  # region in any case
        # internal extensions are never phones
        ("150", "BY", "150"),
        ("12", "BY", "12"),
        ("15000", "BY", "15000"),
        (" 151 ", "BY", "151"),
        # what cannot be a number: its digits only
        ("12345678901234567", "BY", "12345678901234567"),
        ("291234567", "RU", "291234567"),
        ("anonymous", "BY", ""),
        ("", "BY", ""),
        ("7", "BY", "7"),
    ],
)
def test_normalize(raw: str, region: str, expected: str) -> None:
    assert phones.normalize(raw, region) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+375291234567", ("+375291234567", True)),
        ("80291234567", ("+375291234567", True)),
        ("150", ("150", True)),
        ("", ("", True)),
        ("12345678901234567", ("12345678901234567", False)),
        ("anonymous", ("", False)),
        ("+7 (12", ("712", False)),
    ],
)
def test_normalize_ex_tells_what_to_log(raw: str, expected: tuple[str, bool]) -> None:
    assert phones.normalize_ex(raw, "BY") == expected


def test_default_region_is_belarus() -> None:
    assert phones.normalize("80291234567") == "+375291234567"


def test_unknown_region_still_parses_international_numbers() -> None:
    assert phones.normalize_ex("+375291234567", "XX") == ("+375291234567", True)
    assert phones.normalize_ex("375291234567", "XX") == ("+375291234567", True)
    assert phones.normalize_ex("80291234567", "XX") == ("80291234567", False)


@pytest.mark.parametrize(
    ("code", "expected"),
    [("BY", True), ("RU", True), ("by", True), (" KZ ", True), ("", False), ("ZZ", False),
     ("XX", False), ("BLR", False), ("375", False)],
)
def test_is_valid_region(code: str, expected: bool) -> None:
    assert phones.is_valid_region(code) is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("150", True), ("12", True), ("15000", True), ("1", False), ("150000", False),
     ("15a", False), ("", False), (" 150 ", True)],
)
def test_is_extension(raw: str, expected: bool) -> None:
    assert phones.is_extension(raw) is expected


def test_digits() -> None:
    assert phones.digits("+375 (29) 1-2") == "3752912"


def test_a_number_that_does_not_parse_leaves_nothing_to_the_cyclic_collector() -> None:
    """A reading libphonenumber refuses raises inside it; its frames must not outlive the
    call (they would hold every caller's frame up to the delivery until a collection)."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for n in range(5):
            assert phones.normalize_ex(f"anonymous-{n}", "BY") == (str(n), False)
            assert phones.normalize_ex(f"802912{n}", "XX") == (f"802912{n}", False)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, phonenumbers.NumberParseException)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
