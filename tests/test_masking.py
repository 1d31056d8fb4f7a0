"""Secrets are masked wherever they could leak: log rows, log lines."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging

import structlog
from structlog.testing import capture_logs

from daemon.logconfig import configure, hide, redact, redact_value
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


def test_mask_hides_secrets_in_keys_too_and_keeps_rows_storable() -> None:
    client_id = "c1ient-1d-0123456789abcdef"
    answer = {"errors": {client_id: "unknown", f"id={client_id}": [client_id]},
              "text": "NUL\x00 and a lone \ud800 surrogate", "k\x00": 1}
    masked = mask(answer, ["api-KEY-0123456789", client_id])
    assert client_id not in repr(masked)
    assert masked["errors"] == {"***": "unknown", "id=***": ["***"]}
    assert masked["text"] == "NUL\\u0000 and a lone \\ud800 surrogate"
    assert masked["k\\u0000"] == 1
    json.dumps(masked, ensure_ascii=False).encode("utf-8")  # storable: no surrogate left


def test_hidden_secrets_are_masked_by_value_in_every_field_key_and_traceback() -> None:
    def unit_of_work() -> list[dict[str, object]]:
        hide(["s3cret-API-key-0123456789", "client-ID-abcdef0123456789"])
        try:
            raise RuntimeError("failed with client-ID-abcdef0123456789")
        except RuntimeError:
            with capture_logs(processors=[structlog.processors.format_exc_info, redact]) as logs:
                structlog.get_logger("t").exception(
                    "answer s3cret-API-key-0123456789", body={
                        "client-ID-abcdef0123456789": ["s3cret-API-key-0123456789"]},
                    **{"key=s3cret-API-key-0123456789": 1})
        return logs

    logs = contextvars.copy_context().run(unit_of_work)  # as a task would: its own context
    text = json.dumps(logs)
    assert "s3cret" not in text and "client-ID" not in text
    assert logs[0]["event"] == "answer ***" and logs[0]["body"] == {"***": ["***"]}
    assert "failed with ***" in logs[0]["exception"]


async def test_hidden_secrets_belong_to_the_task_that_declared_them() -> None:
    seen: dict[str, list[dict[str, object]]] = {}

    async def unit(name: str, secret: str, other: str) -> None:
        hide([secret])
        await asyncio.sleep(0.01)  # the other task runs meanwhile
        with capture_logs(processors=[redact]) as logs:
            structlog.get_logger("t").info("x", mine=secret, theirs=other)
        seen[name] = logs

    await asyncio.gather(asyncio.create_task(unit("a", "secret-of-a-123", "secret-of-b-456")),
                         asyncio.create_task(unit("b", "secret-of-b-456", "secret-of-a-123")))
    assert seen["a"][0]["mine"] == "***" and seen["a"][0]["theirs"] == "secret-of-b-456"
    assert seen["b"][0]["mine"] == "***" and seen["b"][0]["theirs"] == "secret-of-a-123"
