"""Settings: every required variable missing or malformed is an error naming it."""

from __future__ import annotations

import pytest

from daemon.settings import SettingsError, load, mask_url_password

GOOD = {
    "CRM_BRIDGE_DATABASE_URL": "postgresql://crm:pw@db.internal:5432/platform",
    "CRM_BRIDGE_SECRET_KEY": "k" * 40,
    "CRM_BRIDGE_ENCRYPTION_KEYS": "hHTp3ZkJ7l7yG4Yh8hB8n6dO5S6dC3m4fS9Xf2h7gKk=",
    "CRM_BRIDGE_SERVICE_TOKEN": "t" * 30,
    "CRM_BRIDGE_PUBLIC_URL": "https://crm-bridge.example.by/",
}


def test_a_complete_environment_loads() -> None:
    settings = load(GOOD)
    assert settings.public_url == "https://crm-bridge.example.by"
    assert settings.port == 8019 and settings.integration == "retailcrm"
    assert settings.generated == ()
    assert "kkkk" not in repr(settings) and "tttt" not in repr(settings)
    assert settings.describe()["database_url"] == "postgresql://crm:***@db.internal:5432/platform"


@pytest.mark.parametrize(
    "variable",
    ["CRM_BRIDGE_DATABASE_URL", "CRM_BRIDGE_SECRET_KEY", "CRM_BRIDGE_ENCRYPTION_KEYS",
     "CRM_BRIDGE_SERVICE_TOKEN", "CRM_BRIDGE_PUBLIC_URL"],
)
def test_each_required_variable_missing_is_named(variable: str) -> None:
    env = {k: v for k, v in GOOD.items() if k != variable}
    with pytest.raises(SettingsError) as info:
        load(env)
    assert info.value.variable == variable
    assert variable in str(info.value) and "required" in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("CRM_BRIDGE_DATABASE_URL", "mysql://x/y", "postgresql://"),
        ("CRM_BRIDGE_SECRET_KEY", "short", "at least 32"),
        ("CRM_BRIDGE_ENCRYPTION_KEYS", "not-a-key", "not a Fernet key"),
        ("CRM_BRIDGE_SERVICE_TOKEN", "short", "at least 24"),
        ("CRM_BRIDGE_PUBLIC_URL", "crm-bridge.example.by", "absolute http(s) URL"),
        ("CRM_BRIDGE_PORT", "eighty", "integer"),
        ("CRM_BRIDGE_PORT", "70000", "0-65535"),
        ("CRM_BRIDGE_POLL_INTERVAL_S", "0", "greater than 0"),
        ("CRM_BRIDGE_NOTIFY", "maybe", "true/false"),
        ("CRM_BRIDGE_LOG_FORMAT", "xml", "one of"),
        ("CRM_BRIDGE_LEASE_S", "4", "twice"),
        ("CRM_BRIDGE_INTEGRATION", "retail crm!", "adapter name"),
        ("CRM_BRIDGE_PBX_URL", "pbx.internal:8018", "absolute http(s) URL"),
        ("CRM_BRIDGE_PBX_TIMEOUT_S", "0", "greater than 0"),
        ("CRM_BRIDGE_MAKE_CALL_RATE", "fast", "a number"),
        ("CRM_BRIDGE_SMART_REDIRECT_DEADLINE_S", "30", "at most 10"),
    ],
)
def test_each_malformed_variable_is_named(variable: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as info:
        load({**GOOD, variable: value})
    assert info.value.variable == variable
    assert says in str(info.value)
    if "KEY" in variable or "TOKEN" in variable:
        assert value not in str(info.value), "a rejected secret is not echoed"


def test_the_telephony_settings_and_their_defaults() -> None:
    settings = load(GOOD)
    assert settings.pbx_url == "http://127.0.0.1:8018"
    assert (settings.pbx_timeout_s, settings.make_call_rate) == (5.0, 5.0)
    assert settings.smart_redirect_deadline_s == 1.5
    tuned = load({**GOOD, "CRM_BRIDGE_PBX_URL": "http://pbx.internal:8018/",
                  "CRM_BRIDGE_MAKE_CALL_RATE": "2.5",
                  "CRM_BRIDGE_SMART_REDIRECT_DEADLINE_S": "0.8"})
    assert tuned.pbx_url == "http://pbx.internal:8018"
    assert (tuned.make_call_rate, tuned.smart_redirect_deadline_s) == (2.5, 0.8)


def test_no_fallback_secrets_outside_dev_mode() -> None:
    env = {"CRM_BRIDGE_DATABASE_URL": GOOD["CRM_BRIDGE_DATABASE_URL"]}
    with pytest.raises(SettingsError):
        load(env)
    dev = load({**env, "CRM_BRIDGE_DEV_MODE": "1"})
    assert set(dev.generated) == {"CRM_BRIDGE_SECRET_KEY", "CRM_BRIDGE_ENCRYPTION_KEYS",
                                  "CRM_BRIDGE_SERVICE_TOKEN"}
    assert dev.public_url == "http://127.0.0.1:8019"
    assert load({**env, "CRM_BRIDGE_DEV_MODE": "1"}).secret_key != dev.secret_key


def test_private_crms_are_off_unless_asked_for_or_in_development_mode() -> None:
    assert load(GOOD).allow_private_crm is False
    assert load({**GOOD, "CRM_BRIDGE_ALLOW_PRIVATE_CRM": "1"}).allow_private_crm is True
    dev = {**GOOD, "CRM_BRIDGE_DEV_MODE": "1"}
    assert load(dev).allow_private_crm is True  # the simulator on 127.0.0.1
    assert load({**dev, "CRM_BRIDGE_ALLOW_PRIVATE_CRM": "0"}).allow_private_crm is False
    with pytest.raises(SettingsError) as info:
        load({**GOOD, "CRM_BRIDGE_MAX_RESPONSE_BYTES": "1000"})
    assert info.value.variable == "CRM_BRIDGE_MAX_RESPONSE_BYTES"
    settings = load(GOOD)
    assert (settings.max_response_bytes, settings.http_header_timeout_s,
            settings.http_body_timeout_s, settings.http_max_connections) == (
        1_048_576, 5.0, 10.0, 1000)
    assert settings.adapter_settings()["allow_private_crm"] is False


def test_mask_url_password() -> None:
    assert mask_url_password("postgresql://u@h/db") == "postgresql://u@h/db"
    assert mask_url_password("postgresql://u:p%40ss@h/db") == "postgresql://u:***@h/db"
