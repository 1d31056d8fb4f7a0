"""Secrets are masked wherever they could leak: log rows, log lines."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
from datetime import UTC, datetime

import structlog
from structlog.testing import capture_logs

from daemon.calls import StoredEvent
from daemon.integrations.base import DeliveryContext, Exchange
from daemon.logconfig import configure, hide, redact, redact_value
from daemon.logs import attempt_row, mask, masked_exchange


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


# ---------------------------------------------------------------------- attempt rows

SECRETS = ("rcrm-KEY-0123456789", "cid-abcdef0123456789")
DEEP_ANSWER: object = {"rcrm-KEY-0123456789": "echoed as a key", "errors": ["x\x00y"]}
for _ in range(12):  # deeper than mask() follows: what lies below is masked whole
    DEEP_ANSWER = {"level": [DEEP_ANSWER]}


def _exchanges() -> list[Exchange]:
    return [
        Exchange("POST", "/api/v5/telephony/call/event",
                 {"event": {"phone": "+375291234567", "codes": ["150"],
                            "note": "clientId=cid-abcdef0123456789", "apiKey": "k",
                            "deep": [[[[[[[["below the depth limit"]]]]]]]]}},
                 200, {"success": True, "echo": "rcrm-KEY-0123456789"}, 0.0123),
        Exchange("POST", "/api/v5/telephony/calls/upload",
                 {"calls": [{"externalId": "1757.1", "recordUrl": "https://r/x?token=abc"}]},
                 460, DEEP_ANSWER, 0.5),
        Exchange("GET", "/api/v5/telephony/manager", {"phone": "+37529"}, None, None, 3.0),
    ]


def _whole_row(exchanges: list[Exchange]) -> tuple[object, object]:
    """The attempt's row masked as a whole, the way it was built before exchanges were
    masked as they were recorded: the reference the row must equal."""
    request = {"unique_id": "1757.1", "event_id": 7, "attempt": 2,
               "requests": [{"method": x.method, "path": x.path, "request": x.request,
                             "status": x.status, "duration_ms": round(x.duration_s * 1000, 1)}
                            for x in exchanges],
               "outcome": "call uploaded; cid-abcdef0123456789", "steps_done": ["popup", "upload"]}
    response = [{"path": x.path, "status": x.status, "body": x.response} for x in exchanges]
    return mask(request, SECRETS), mask(response, SECRETS)


def test_exchanges_masked_as_recorded_make_the_same_row_as_masking_it_whole() -> None:
    event = StoredEvent(7, "hangup", "1757.1", {}, None, "live", datetime.now(UTC))
    ctx = DeliveryContext(
        enterprise="0367", config=None, event=event, attempt=2, http=None,  # type: ignore[arg-type]
        timeout_s=3.0, gate=None, load_call=None,  # type: ignore[arg-type]
        keep=functools.partial(masked_exchange, secrets=SECRETS))
    for exchange in _exchanges():
        ctx.record(exchange)
    row = attempt_row("0367", event, 2, ctx.exchanges, {"upload", "popup"}, SECRETS, ok=True,
                      error=None, detail="call uploaded; cid-abcdef0123456789")
    assert (row.request, row.response) == _whole_row(_exchanges())
    assert not any(secret in json.dumps([row.request, row.response]) for secret in SECRETS)
    # An exchange an adapter kept without recording it is masked all the same.
    raw = attempt_row("0367", event, 2, _exchanges(), {"upload", "popup"}, SECRETS, ok=True,
                      error=None, detail="call uploaded; cid-abcdef0123456789")
    assert (raw.request, raw.response) == (row.request, row.response)


def test_a_recorded_exchange_is_a_copy_of_what_was_sent() -> None:
    sent = {"event": {"codes": ["150"]}}
    ctx = DeliveryContext(
        enterprise="0367", config=None, event=None, attempt=1, http=None,  # type: ignore[arg-type]
        timeout_s=3.0, gate=None, load_call=None,  # type: ignore[arg-type]
        keep=functools.partial(masked_exchange, secrets=SECRETS))
    ctx.record(Exchange("POST", "/x", sent, 200, {"success": True}, 0.01))
    sent["event"]["codes"].append("151")  # the caller's object changes afterwards
    assert ctx.exchanges[0].request == {"event": {"codes": ["150"]}}
