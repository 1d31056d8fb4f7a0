"""Admin links: signed, expiring, revocable by token_version; never quoted in an error."""

from __future__ import annotations

import time

import asyncpg
import jwt
import pytest

from daemon import links
from tests.conftest import TEST_SECRET_KEY
from tests.support.seed import add_enterprise

NOW = 1_760_000_000.0


def test_a_link_carries_its_claims() -> None:
    token = links.create(TEST_SECRET_KEY, "0367", "retailcrm", 4, ttl_s=3600, now=NOW)
    claims = links.verify(TEST_SECRET_KEY, token, 4, now=NOW + 10)
    assert claims == links.LinkClaims("0367", "retailcrm", 4, int(NOW), int(NOW) + 3600)
    raw = jwt.decode(token, options={"verify_signature": False})
    assert raw["aud"] == links.AUDIENCE
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_the_default_lifetime_is_seven_days() -> None:
    token = links.create(TEST_SECRET_KEY, "0367", "retailcrm", 0)
    claims = links.decode(TEST_SECRET_KEY, token)
    assert claims.expires_at - claims.issued_at == 7 * 86_400
    assert abs(claims.issued_at - time.time()) < 5


@pytest.mark.parametrize(
    ("token_of", "reason"),
    [
        (lambda: links.create("another-secret-key-0123456789abcdef", "0367", "retailcrm", 0,
                              now=NOW), "bad_signature"),
        (lambda: links.create(TEST_SECRET_KEY, "0367", "retailcrm", 0, ttl_s=60,
                              now=NOW - 61), "expired"),
        (lambda: links.create(TEST_SECRET_KEY, "0367", "retailcrm", 1, now=NOW), "revoked"),
        (lambda: "not-a-jwt", "malformed"),
        (lambda: jwt.encode({"enterprise": "0367", "source": "retailcrm", "token_version": 0,
                             "iat": int(NOW), "exp": int(NOW) + 60}, TEST_SECRET_KEY,
                            algorithm="HS256"), "malformed"),  # no audience: not a link
        (lambda: jwt.encode({"source": "retailcrm", "token_version": 0, "iat": int(NOW),
                             "exp": int(NOW) + 60, "aud": links.AUDIENCE}, TEST_SECRET_KEY,
                            algorithm="HS256"), "malformed"),  # no enterprise
        (lambda: jwt.encode({"enterprise": "0367", "source": "retailcrm", "token_version": 0,
                             "iat": int(NOW), "exp": int(NOW) + 60, "aud": links.AUDIENCE},
                            None, algorithm="none"), "malformed"),  # unsigned: refused
    ],
)
def test_bad_links_are_refused_with_a_reason(token_of: object, reason: str) -> None:
    assert callable(token_of)
    token = token_of()
    with pytest.raises(links.InvalidLink) as info:
        links.verify(TEST_SECRET_KEY, token, 0, now=NOW)
    assert info.value.reason == reason
    assert token not in str(info.value)


def test_no_configuration_means_no_valid_link() -> None:
    token = links.create(TEST_SECRET_KEY, "0367", "retailcrm", 0, now=NOW)
    with pytest.raises(links.InvalidLink) as info:
        links.verify(TEST_SECRET_KEY, token, None, now=NOW)
    assert info.value.reason == "revoked"


@pytest.mark.parametrize("ttl_s", [0, -1, links.MAX_TTL_S + 1])
def test_lifetimes_out_of_range_are_refused(ttl_s: float) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        links.create(TEST_SECRET_KEY, "0367", "retailcrm", 0, ttl_s=ttl_s)


async def test_verify_stored_follows_the_stored_token_version(pool: asyncpg.Pool) -> None:
    await add_enterprise(pool, "0367", config={"retailcrm": {"token_version": 2}})
    await add_enterprise(pool, "0400", config={})
    token = links.create(TEST_SECRET_KEY, "0367", "retailcrm", 2)
    assert (await links.verify_stored(pool, TEST_SECRET_KEY, token)).enterprise == "0367"
    await pool.execute(
        "UPDATE enterprises SET integrations_config = jsonb_set(integrations_config, "
        "'{retailcrm,token_version}', '3') WHERE number = '0367'")
    with pytest.raises(links.InvalidLink) as info:
        await links.verify_stored(pool, TEST_SECRET_KEY, token)
    assert info.value.reason == "revoked"
    unconfigured = links.create(TEST_SECRET_KEY, "0400", "retailcrm", 0)
    with pytest.raises(links.InvalidLink):
        await links.verify_stored(pool, TEST_SECRET_KEY, unconfigured)
    first = links.create(TEST_SECRET_KEY, "0401", "retailcrm", 0)  # no such enterprise
    with pytest.raises(links.InvalidLink):
        await links.verify_stored(pool, TEST_SECRET_KEY, first)
