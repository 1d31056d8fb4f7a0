"""Secrets are masked wherever they could leak: log rows, log lines."""

from __future__ import annotations

import logging

import structlog

from daemon.logconfig import configure, redact, redact_value
from daemon.logs import mask


def test_mask_by_key_by_value_and_by_pattern() -> None:
    value = {
        "apiKey": "k1", "X-API-KEY": "k2", "clientId": "c1", "nested": {"token": "t"},
        "text": "answer said key=AbC123 and c-secret-value",
        "url": "https://x.retailcrm.ru/api/v5/x?apiKey=LEAK&limit=20",
        "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abcdefghijk",
        "list": ["AbC123", 5, None],
    }
    masked = mask(value, ["AbC123", "c-secret-value"])
    text = repr(masked)
    for secret in ("k1", "k2", "c1", "'t'", "AbC123", "c-secret-value", "LEAK", "eyJhbGci"):
        assert secret not in text
    assert masked["list"] == ["***", 5, None]
    assert "limit=20" in masked["url"]


def test_redact_processor_masks_secret_fields_and_patterns() -> None:
    event = redact(None, "info", {
        "event": "x", "api_key": "k", "headers": {"Authorization": "Bearer abcdefghijkl"},
        "url": "/admin?token=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abcdefghijk",
        "note": "Bearer abcdefghijklmnop",
    })
    assert event["api_key"] == "***"
    assert event["headers"]["Authorization"] == "***"
    assert "eyJ" not in event["url"]
    assert "abcdefghijklmnop" not in event["note"]
    assert redact_value("plain text") == "plain text"


def test_standard_library_logs_go_through_the_same_redaction(capsys) -> None:
    configure("json", "info")
    logging.getLogger("aiohttp.server").warning("GET /x?apiKey=TOPSECRET failed")
    structlog.get_logger("t").info("hello", client_id="C-SECRET")
    out = capsys.readouterr().out
    assert "TOPSECRET" not in out
    assert "C-SECRET" not in out
    assert '"logger": "aiohttp.server"' in out
