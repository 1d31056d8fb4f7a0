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
    ("https://магазин.рф", "https://xn--80aairftm.xn--p1ai"),  # stored in its ASCII form
    ("https://demo.retailcrm.ru\n", "https://demo.retailcrm.ru"),  # trailing space stripped
])
def test_normalize_domain(raw: str, domain: str) -> None:
    assert cfg.normalize_domain(raw) == domain
    assert cfg.normalize_domain(raw, allow_private=True) == domain


@pytest.mark.parametrize(("raw", "message"), [
    ("", "is required"),
    ("ftp://demo.retailcrm.ru", "must use https"),
    ("https://demo.retailcrm.ru/api", "without a path"),
    ("https://demo.retailcrm.ru?apiKey=1", "without a path"),
    ("https://demo.retailcrm.ru#x", "without a path"),
    ("https://user@demo.retailcrm.ru", "user name or password"),
    ("https://user:pw@demo.retailcrm.ru", "user name or password"),
    ("https://demo.retailcrm.ru:99999", "account address"),  # urlsplit: port out of range
    ("https://demo.retailcrm.ru:abc", "account address"),
    ("https://demo.retailcrm.ru:0", "account address"),
    ("https://[::1", "account address"),  # urlsplit: invalid IPv6 URL
    ("https://demo retailcrm.ru", "spaces or control characters"),
    ("https://demo.retailcrm.ru\x00.evil", "spaces or control characters"),
    ("https://demo\tretailcrm.ru", "spaces or control characters"),
    ("https://demo.retailcrm.ru%00", "valid host name"),
    ("https://demo%2eretailcrm.ru", "valid host name"),
    ("https://-demo.retailcrm.ru", "valid host name"),
    ("https://demo..retailcrm.ru", "valid host name"),
    ("https://" + "a" * 64 + ".ru", "valid host name"),
    ("https://demo_1.retailcrm.ru", "valid host name"),
    ("https://2130706433", "valid host name"),  # 127.0.0.1 to a resolver
    ("https://127.1", "valid host name"),
    ("https://0x7f.0.0.1", "valid host name"),
])
def test_normalize_domain_refuses(raw: str, message: str) -> None:
    for allow_private in (False, True):
        with pytest.raises(ConfigError, match=message) as info:
            cfg.normalize_domain(raw, allow_private=allow_private)
        assert info.value.field == "domain"


@pytest.mark.parametrize(("raw", "message", "allowed"), [
    ("https://169.254.169.254", "not an IP address", "https://169.254.169.254"),
    ("https://10.0.0.1:6379", "not an IP address", "https://10.0.0.1:6379"),
    ("http://127.0.0.1:5432", "must use https", "http://127.0.0.1:5432"),
    ("https://[::1]:9", "not an IP address", "https://[::1]:9"),
    ("https://[::ffff:127.0.0.1]", "not an IP address", "https://[::ffff:7f00:1]"),
    ("https://8.8.8.8", "not an IP address", "https://8.8.8.8"),
    ("https://localhost:8020", "must not be localhost", "https://localhost:8020"),
    ("https://crm.localhost", "must not be localhost", "https://crm.localhost"),
    ("http://crm.internal:8080", "must use https", "http://crm.internal:8080"),
])
def test_private_targets_only_when_the_operator_allows_them(
    raw: str, message: str, allowed: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg.normalize_domain(raw)
    assert cfg.normalize_domain(raw, allow_private=True) == allowed


def test_a_stored_private_domain_makes_the_config_invalid() -> None:
    stored = {"enabled": True, "domain": "http://127.0.0.1:5432",
              "api_key": CRYPTO.encrypt("key")}
    with pytest.raises(ConfigError, match="must use https"):
        cfg.parse(stored, CRYPTO)
    assert cfg.parse(stored, CRYPTO, allow_private=True).domain == "http://127.0.0.1:5432"


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
