"""``integrations_config->'retailcrm'`` parsing: the domain, and what configs share."""

from __future__ import annotations

import base64
import json

import pytest

from daemon.crypto import Crypto
from daemon.errors import ConfigError
from daemon.integrations.retailcrm import config as cfg

CRYPTO = Crypto((base64.urlsafe_b64encode(b"k" * 32).decode(),), "s" * 32)


@pytest.mark.parametrize(("raw", "domain"), [
    ("https://demo.retailcrm.ru", "https://demo.retailcrm.ru"),  # already normalized
    ("https://shop-1.example.com", "https://shop-1.example.com"),
    ("demo.retailcrm.ru/", "https://demo.retailcrm.ru"),
    (" https://Demo.RetailCRM.ru ", "https://demo.retailcrm.ru"),
    ("https://demo.retailcrm.ru:8443/", "https://demo.retailcrm.ru:8443"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("https://[::1]:9", "https://[::1]:9"),
])
def test_normalize_domain(raw: str, domain: str) -> None:
    assert cfg.normalize_domain(raw) == domain


@pytest.mark.parametrize(("raw", "message"), [
    ("", "is required"),
    ("http://demo.retailcrm.ru", "must use https"),
    ("ftp://demo.retailcrm.ru", "must use https"),
    ("https://demo.retailcrm.ru/api", "without a path"),
    ("https://demo.retailcrm.ru\n", None),  # not the fast path: a newline is not a host
    ("https://user@demo.retailcrm.ru", "account address"),
    ("https://demo.retailcrm.ru:99999", "account address"),  # urlsplit: port out of range
    ("https://demo.retailcrm.ru:abc", "account address"),
    ("https://[::1", "account address"),  # urlsplit: invalid IPv6 URL
])
def test_normalize_domain_refuses(raw: str, message: str | None) -> None:
    if message is None:
        assert cfg.normalize_domain(raw) == "https://demo.retailcrm.ru"
        return
    with pytest.raises(ConfigError, match=message):
        cfg.normalize_domain(raw)


def _stored(n: int) -> dict[str, object]:
    """A config as the database hands it over: decoded JSON, every string a new object."""
    stored: dict[str, object] = json.loads(json.dumps({
        "enabled": True, "domain": f"https://shop{n}.retailcrm.ru",
        "api_key": CRYPTO.encrypt(f"key-{n}"), "time_zone": "Europe/Minsk", "region": "by",
        "user_extensions": {"12": "151"}, "external_phones": {"0001363": "+375172000000"},
        "site_code": "main", "last_sync": "2026-11-26T12:00:00+00:00"}))
    return stored


def test_configs_share_their_short_strings() -> None:
    one, two = cfg.parse(_stored(1), CRYPTO), cfg.parse(_stored(2), CRYPTO)
    assert one.time_zone == "Europe/Minsk" and one.region == "BY"
    for field in ("time_zone", "crm_time_zone", "region", "site_code", "last_sync"):
        assert getattr(one, field) is getattr(two, field), field
    assert next(iter(one.user_extensions.values())) is next(iter(two.user_extensions.values()))
    assert next(iter(one.external_phones)) is next(iter(two.external_phones))
